"""The flags of every command, checked once in `mova_rt.cli.main` before the command runs.

- numbers: finite and in range (argparse's `type=float` takes "nan", "inf" and "1e999"; Python's
  ints have no upper bound). The ranges are wide: a clip's real limit is the device memory,
  checked against the memory plan (memory.py) once the checkpoint's config is known;
- `--device`: a device mova-rt runs on (cpu, cuda, cuda:N that exists; `meta` only to plan);
- input paths that exist must be what they claim: a regular file (an image, a LoRA, a results
  file) or a folder (a checkpoint, an engine, fp8 weights). A FIFO or a device would be read
  forever;
- output paths must not touch an input: not the same file as one (also through a link), not a
  file of an input folder, and nowhere inside the checkpoint folder (a new file there changes its
  fingerprint, so engines and fp8 weights built for it would be refused).
A missing input path is left to the code that reads it, which names what it expected there.
"""

from __future__ import annotations

import os
import stat

from ..errors import MovaInputError
from .schema import Int, Real, file_kind

SEED = Int(-(1 << 63), (1 << 64) - 1)      # torch.Generator.manual_seed's range
SIZE = Int(1, (1 << 31) - 1)               # pixels or frames: tensor sizes are int32-safe
FPS = Real(0.0, 240.0, lo_open=True)
STEPS = Int(1, 100000)          # far past any schedule; a test runs "forever" with 100000
SCALE = Real(0.0, 100.0)
SECONDS = Real(0.0, 7 * 24 * 3600.0, lo_open=True)
GIB = Real(0.0, 1 << 20, lo_open=True)

# dest -> (rule, an example of a good value)
NUMBERS = {
    "height": (SIZE, "720"), "width": (SIZE, "1280"), "num_frames": (SIZE, "193"),
    "fps": (FPS, "24"), "seed": (SEED, "42"), "num_inference_steps": (STEPS, "50"),
    "cfg_scale": (SCALE, "5"), "bridge_cfg_scale": (SCALE, "1"),
    "cache_threshold": (Real(0.0, 100.0), "0.1"),
    "cp_size": (Int(1, 4096), "2"), "ulysses_degree": (Int(1, 4096), "2"),
    "ring_degree": (Int(1, 4096), "2"), "dist_timeout": (SECONDS, "600"),
    "offload_depth": (Int(1, 1024), "1"), "vram_budget": (GIB, "24"),
    "lora_alpha": (Real(0.0, 1e4, lo_open=True), "16"), "lora_scale": (Real(-100.0, 100.0), "1"),
    "opt_batch": (Int(1, 64), "2"), "calib_steps": (STEPS, "8"),
    "warmup": (Int(0, 10000), "2"), "steps": (Int(0, 100000), "3"),
    "cold_steps": (Int(2, 10000), "3"), "config_timeout": (SECONDS, "900"),
    "child_of": (Int(1, (1 << 31) - 1), "1"), "op_seconds": (Real(0.0, 3600.0, lo_open=True), "1"),
}
# argparse dest -> the flag as typed, where they differ
SPELLING = {"vram_budget": "--vram-budget", "cold_steps": "--cold-steps",
            "config_timeout": "--config-timeout", "child_of": "--child-of",
            "op_seconds": "--op-seconds"}

# dest -> what the path must be, per command
FILE, FOLDER, EITHER = "a regular file", "a folder", "a regular file or a folder"
INPUTS = {
    "generate": {"ckpt_path": FOLDER, "ref_path": FILE, "lora_path": EITHER, "engine": FOLDER,
                 "fp8_weights": FOLDER},
    "build": {"ckpt_path": FOLDER, "fp8_weights": FOLDER},
    "quantize": {"ckpt_path": FOLDER, "ref_path": FILE},
    "bench": {"ckpt_path": FOLDER, "engine": FOLDER, "render": FILE},
}
OUTPUTS = {
    "generate": ("output_path", "save_latents"),
    "build": ("out",), "quantize": ("out",), "make-checkpoint": ("out",),
    "bench": ("json", "chart"),
}
WHAT = {"ckpt_path": "the checkpoint", "ref_path": "the reference image", "lora_path": "the LoRA",
        "engine": "the engine", "fp8_weights": "the fp8 weights", "render": "the results file"}


def flag(dest: str) -> str:
    return SPELLING.get(dest, f"--{dest}")


def check_numbers(args) -> None:
    for dest, (rule, example) in NUMBERS.items():
        value = getattr(args, dest, None)
        if value is None or isinstance(value, bool) or rule.ok(value):
            continue
        shown = f"{value:g}" if isinstance(value, float) else str(value)
        raise MovaInputError(f"{flag(dest)} {shown} must be {rule.want}: pass e.g. "
                             f"{flag(dest)} {example}")


def check_device(name: str | None, allow_meta: bool = False) -> None:
    """`--device`: cpu, cuda, cuda:N of this machine (and meta where a command only plans)."""
    import torch

    if name is None:
        return
    uses = "cpu, cuda, cuda:N" + (" or meta (plan only)" if allow_meta else "")
    try:
        dev = torch.device(name)
    except (RuntimeError, ValueError):
        raise MovaInputError(f"--device {name} is not a device: use {uses}") from None
    if dev.type == "meta" and not allow_meta:
        raise MovaInputError(f"--device {name} holds no data, so nothing can run on it: use cpu "
                             "or cuda (`mova-rt bench --device meta` plans a run without one)")
    if dev.type not in ("cpu", "cuda", "meta"):
        raise MovaInputError(f"--device {name} is not supported by mova-rt: use {uses}")
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise MovaInputError(f"--device {name} requested but CUDA is not available: use "
                                 "--device cpu" + (" or --device meta (plan only)"
                                                   if allow_meta else ""))
        count = torch.cuda.device_count()
        if dev.index is not None and dev.index >= count:
            raise MovaInputError(f"--device {name}: this machine has {count} GPU(s), cuda:0 to "
                                 f"cuda:{count - 1}: pass one of them")


def _kind_ok(mode: int, want: str) -> bool:
    if want == FILE:
        return stat.S_ISREG(mode)
    if want == FOLDER:
        return stat.S_ISDIR(mode)
    return stat.S_ISREG(mode) or stat.S_ISDIR(mode)


def check_inputs(command: str, args) -> dict:
    """Existing input paths of the right kind. Returns {dest: path} of those given."""
    given = {}
    for dest, want in INPUTS.get(command, {}).items():
        path = getattr(args, dest, None)
        if path is None:
            continue
        given[dest] = path
        try:
            mode = os.stat(path).st_mode
        except OSError:
            continue            # missing: the reader says what it expected there
        if not _kind_ok(mode, want):
            kind = "a regular file" if stat.S_ISREG(mode) else file_kind(mode)
            raise MovaInputError(f"{flag(dest)} {path} is {kind}, not {want}: pass "
                                 f"{WHAT[dest]} itself")
    return given


def _inside(path: str, folder: str) -> bool:
    return os.path.commonpath([path, folder]) == folder


def _same_file(a: str, b: str) -> bool:
    try:
        return os.path.samefile(a, b)
    except OSError:
        return False


def check_outputs(command: str, args, inputs: dict) -> None:
    """No output path may overwrite an input or land inside an input folder."""
    for dest in OUTPUTS.get(command, ()):
        out = getattr(args, dest, None)
        if not out:
            continue
        real_out = os.path.realpath(out)
        for src_dest, src in inputs.items():
            real_src = os.path.realpath(src)
            what = f"{WHAT[src_dest]} ({flag(src_dest)} {src})"
            if real_out == real_src or _same_file(out, src):
                raise MovaInputError(f"{flag(dest)} {out} is {what}: writing it would destroy "
                                     f"an input; choose another {flag(dest)}")
            if not (os.path.isdir(real_src) and _inside(real_out, real_src)):
                continue
            if src_dest == "ckpt_path":       # any new file changes the checkpoint's fingerprint
                raise MovaInputError(f"{flag(dest)} {out} is inside the folder of {what}: "
                                     f"writing there would change that input; choose a path "
                                     "outside it")
            if os.path.lexists(out):          # elsewhere only what the folder holds matters
                raise MovaInputError(f"{flag(dest)} {out} is a file of {what}: writing it would "
                                     f"destroy an input; choose another {flag(dest)}")


def check_flags(command: str, args) -> None:
    """Every check of this module for `command`'s parsed arguments."""
    check_numbers(args)
    if hasattr(args, "device"):
        check_device(args.device, allow_meta=command == "bench")
    inputs = check_inputs(command, args)
    check_outputs(command, args, inputs)
