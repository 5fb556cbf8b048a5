"""`mova-rt` command line: generate, build, quantize, make-checkpoint, info, bench.

Bad input ends with one line `error: <problem and fix>` on stderr, exit code 2, no traceback and
no output file. The flags of `generate` are the reference script's (scripts/inference_single.py,
spec 6), with its defaults when a checkpoint is given; without --ckpt_path the embedded tiny model
runs at small default sizes.
"""

from __future__ import annotations

import argparse
import datetime
import importlib
import os
import platform
import resource
import signal
import sys
import time
import warnings

from . import __version__
from .errors import MovaInputError

EXIT_BAD_INPUT = 2
EXIT_COMM_FAILURE = 3     # under torchrun: another rank failed or hung
REFERENCE_DEFAULTS = {"height": 720, "width": 1280, "num_frames": 193}


def _generate_parser(sub):
    from .config import DEFAULT_NEGATIVE_PROMPT

    p = sub.add_parser("generate", help="prompt (+ first frame) -> mp4 with video and audio")
    p.add_argument("--ckpt_path", default=None,
                   help="MOVA checkpoint folder (official layout); default: the embedded tiny model")
    p.add_argument("--prompt", default=None, help="text prompt (required with --ckpt_path)")
    p.add_argument("--negative_prompt", default=DEFAULT_NEGATIVE_PROMPT)
    p.add_argument("--ref_path", default=None,
                   help="first-frame image; without it a white frame is used (text-to-video-audio)")
    p.add_argument("--output_path", default="./data/samples/output.mp4")
    p.add_argument("--num_frames", type=int, default=None, help="default 193 (tiny model: 17)")
    p.add_argument("--fps", type=float, default=24.0)
    p.add_argument("--height", type=int, default=None, help="default 720 (tiny model: 64)")
    p.add_argument("--width", type=int, default=None, help="default 1280 (tiny model: 96)")
    p.add_argument("--seed", type=int, default=42)
    p.add_argument("--num_inference_steps", type=int, default=50)
    p.add_argument("--cfg_scale", type=float, default=5.0,
                   help="text guidance scale s_T (1: one pass per step)")
    p.add_argument("--bridge_cfg_scale", type=float, default=1.0,
                   help="Dual CFG bridge scale s_B (paper 5.1; 1 = the released text CFG, e.g. 3.5 "
                        "for stronger audio-video sync, 3 passes per step)")
    p.add_argument("--cache", choices=("off", "auto", "schedule"), default="off",
                   help="step caching (approximate): reuse the DiT stack's residual on steps "
                        "predicted to change little (auto) or every other step (schedule)")
    p.add_argument("--cache_threshold", type=float, default=0.1,
                   help="--cache auto: reuse below this relative change of the first layer")
    p.add_argument("--no-cfg-batch", dest="cfg_batch", action="store_const", const=False,
                   default=None, help="run the guidance passes one after the other (as the "
                                      "reference; default: as one batch, sequential on OOM)")
    p.add_argument("--sigma_shift", type=float, default=None,
                   help="not supported: the reference ignores it; the shift comes from "
                        "scheduler/scheduler_config.json")
    p.add_argument("--cp_size", type=int, default=1,
                   help="context parallelism: ranks sharing each forward's tokens (under torchrun)")
    p.add_argument("--ulysses_degree", type=int, default=None,
                   help="Ulysses (all-to-all over heads) part of --cp_size; must divide 40 video "
                        "and 12 audio heads (default: the largest that does, 4 for MOVA)")
    p.add_argument("--ring_degree", type=int, default=None,
                   help="ring (K/V blocks passed around) part of --cp_size: ulysses x ring = cp")
    p.add_argument("--cfg_parallel", action="store_true",
                   help="run the guidance passes on separate rank groups (world size = cp_size x "
                        "passes)")
    p.add_argument("--dist_timeout", type=float, default=600.0, metavar="S",
                   help="under torchrun: seconds a rank waits for the others before it fails")
    p.add_argument("--offload", choices=("none", "cpu", "group"), default=None,
                   help="none: all weights on the GPU; cpu: components take turns on it; group: "
                        "blocks stream through it (default: none, or what --vram-budget picks)")
    p.add_argument("--offload_depth", type=int, default=1,
                   help="--offload group: blocks prefetched ahead of the one computing")
    p.add_argument("--vram-budget", dest="vram_budget", type=float, default=None, metavar="GB",
                   help="GPU memory to stay within (GiB): picks the least offload that fits and "
                        "caps the process there")
    p.add_argument("--stream_from_disk", action="store_true",
                   help="--offload group: read the streamed blocks from the checkpoint files at "
                        "each use instead of holding them in host RAM")
    p.add_argument("--offload_to_disk_path", default=None)
    p.add_argument("--remove_video_dit", action="store_true",
                   help="free the high-noise expert at the expert switch")
    p.add_argument("--lora_path", default=None)
    p.add_argument("--lora_alpha", type=float, default=None)
    p.add_argument("--lora_scale", type=float, default=1.0)
    p.add_argument("--device", default=None, help="cpu, cuda or cuda:N (default: cuda if present)")
    p.add_argument("--dtype", choices=("bf16", "fp32"), default="bf16")
    p.add_argument("--precision", choices=("bf16", "fp8"), default=None,
                   help="GEMMs of the DiTs and the bridge: bf16 (the checkpoint's --dtype; the "
                        "default, or the engine's) or fp8 (e4m3 weights per channel, activations "
                        "per token)")
    p.add_argument("--fp8_weights", default=None, metavar="DIR",
                   help="--precision fp8: weights written by `mova-rt quantize` (default: "
                        "quantize on load)")
    p.add_argument("--kernels", default=None,
                   help="kernel set: auto (the default, or the engine's: per op the fastest "
                        "measured on this GPU that keeps the reference's bf16 fidelity), "
                        "reference (exact), sdpa, triton (mova-rt's kernels), flash-attn, "
                        "triton-int8attn (8-bit attention, approximate)")
    p.add_argument("--compile", action="store_true",
                   help="torch.compile every block and bridge layer (regional; compiled at the "
                        "first steps)")
    p.add_argument("--engine", default=None, metavar="DIR",
                   help="run the towers' compiled units from an engine written by `mova-rt "
                        "build` (checked against this request, checkpoint and machine)")
    p.add_argument("--save_latents", default=None, metavar="PATH",
                   help="also write the final video/audio latents as safetensors")
    p.add_argument("--no-progress", dest="progress", action="store_false")
    return p


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="mova-rt", description=__doc__.splitlines()[0])
    ap.add_argument("--version", action="version", version=f"mova-rt {__version__}")
    sub = ap.add_subparsers(dest="command", required=True)
    _generate_parser(sub)
    m = sub.add_parser("make-checkpoint", help="write a random-weight checkpoint in the official layout")
    m.add_argument("--preset", default="tiny")
    m.add_argument("--out", required=True)
    m.add_argument("--seed", type=int, default=0)
    from .models.tiny_tokenizer import TOKENIZER_STYLES
    m.add_argument("--tokenizer", default="always", choices=TOKENIZER_STYLES,
                   help="tokenizer.json variant: Metaspace prepend_scheme always/first/never, or "
                        "the real umt5-xxl tokenizer's settings")
    qp = sub.add_parser("quantize", help="write the fp8 weights of a checkpoint (for "
                                         "generate --precision fp8 --fp8_weights)")
    qp.add_argument("--ckpt_path", required=True, help="MOVA checkpoint folder (official layout)")
    qp.add_argument("--out", required=True, help="new folder for the fp8 weights and manifest")
    qp.add_argument("--calibrate", action="store_true",
                    help="also calibrate static per-tensor activation scales (nvidia-modelopt, "
                         "max calibration) over short generations: what TensorRT fp8 engines "
                         "need; without it activations are quantized per token at run time")
    qp.add_argument("--prompt", action="append", default=None,
                    help="--calibrate: a calibration prompt (repeat for several)")
    qp.add_argument("--ref_path", default=None, help="--calibrate: the first frame (default "
                                                     "white)")
    qp.add_argument("--height", type=int, default=None,
                    help="--calibrate: clip height, best the engine's (default 720)")
    qp.add_argument("--width", type=int, default=None, help="--calibrate: default 1280")
    qp.add_argument("--num_frames", type=int, default=None, help="--calibrate: default 193")
    qp.add_argument("--calib_steps", type=int, default=None,
                    help="--calibrate: denoising steps per prompt, all of them calibrate "
                         "(default 8)")
    qp.add_argument("--seed", type=int, default=42)
    qp.add_argument("--device", default=None, help="--calibrate: cpu, cuda or cuda:N (default: "
                                                   "cuda if present)")
    _build_parser(sub)
    sub.add_parser("info", help="version, devices and optional backends")
    from .benchmarks.suite import add_parser as add_bench_parser
    add_bench_parser(sub)
    return ap


def _build_parser(sub):
    from .engine import BACKENDS, KERNELS, MAX_BATCH
    b = sub.add_parser("build", help="compile the towers ahead of time for one clip size and "
                                     "precision (an engine for generate --engine)")
    b.add_argument("--ckpt_path", default=None,
                   help="MOVA checkpoint folder (default: the embedded tiny model)")
    b.add_argument("--preset", default=None,
                   help="instead of a checkpoint: a preset's architecture with random weights "
                        "(mova-360p, mova-720p), an engine for `mova-rt bench --engine` only")
    b.add_argument("--height", type=int, default=None, help="default 720 (tiny model: 64)")
    b.add_argument("--width", type=int, default=None, help="default 1280 (tiny model: 96)")
    b.add_argument("--num_frames", type=int, default=None, help="default 193 (tiny model: 17)")
    b.add_argument("--fps", type=float, default=24.0)
    b.add_argument("--precision", choices=("bf16", "fp8"), default="bf16")
    b.add_argument("--fp8_weights", default=None, metavar="DIR",
                   help="--precision fp8: weights written by `mova-rt quantize` (default: "
                        "quantized here, per-token activations); --backend tensorrt needs "
                        "them calibrated (`mova-rt quantize --calibrate`)")
    b.add_argument("--backend", choices=BACKENDS, default="inductor",
                   help="inductor (torch.export + AOTInductor; default) or tensorrt (ONNX -> "
                        "TensorRT engines; needs the tensorrt package and a GPU)")
    b.add_argument("--kernels", choices=("auto",) + KERNELS, default=None,
                   help="the ops traced into the engine: auto (the default: sdpa), reference "
                        "(exact RoPE in float64; not with tensorrt) or sdpa (RoPE in float32)")
    b.add_argument("--device", default=None, help="cuda or cpu (default: cuda if present): "
                                                   "build on the kind of machine that will run it")
    b.add_argument("--no-autotune", dest="autotune", action="store_false",
                   help="inductor on CUDA: skip GEMM/kernel autotuning (faster build)")
    b.add_argument("--opt_batch", type=int, default=2,
                   help=f"tensorrt: the batch (1..{MAX_BATCH}) the engine is tuned for (2: CFG "
                        "batched)")
    b.add_argument("--out", required=True, help="new folder for the engine, e.g. "
                                                "build/engines/mova-360p-bf16")


def cmd_build(args) -> int:
    from .config import PRESET_SIZES, PRESETS
    from .engine import BuildRequest, build
    from .tiny import embedded_tiny_checkpoint

    if args.preset is not None:
        if args.ckpt_path is not None:
            raise MovaInputError("--preset builds from random weights: drop --ckpt_path or "
                                 "--preset")
        if args.preset not in PRESETS:
            raise MovaInputError(f"unknown --preset {args.preset}: choose one of "
                                 f"{', '.join(PRESETS)}")
    tiny = args.ckpt_path is None and args.preset is None
    defaults = dict(zip(("height", "width", "num_frames"), PRESET_SIZES[args.preset or "tiny"])) \
        if args.ckpt_path is None else REFERENCE_DEFAULTS
    for k, v in defaults.items():
        if getattr(args, k) is None:
            setattr(args, k, v)
    ckpt = embedded_tiny_checkpoint() if tiny else args.ckpt_path
    from .regional import kernels_for
    kernels = kernels_for(args.kernels)           # auto (the default): sdpa, traced and fused
    req = BuildRequest(ckpt, args.height, args.width, args.num_frames, args.fps, args.precision,
                       args.backend, kernels, args.device, args.autotune, args.opt_batch,
                       preset=args.preset, fp8_weights=args.fp8_weights)
    _check_build_fits(args, ckpt)
    t0 = time.perf_counter()
    manifest = build(req, args.out, log=lambda m: print(f"build: {m}", file=sys.stderr))
    size = sum(a["bytes"] for a in manifest["artifacts"].values())
    print(f"wrote engine {args.out}: {', '.join(manifest['units'])} ({args.backend}, "
          f"{args.precision}, {manifest['machine']['name']}), {size / 1024 ** 2:.1f} MiB in "
          f"{time.perf_counter() - t0:.1f} s")
    return 0


def _check_build_fits(args, ckpt) -> None:
    """A build holds the towers and traces one layer at a time: refused up front only when the
    clip cannot fit the device at all (mova_rt.validate.memory), before any weight is read."""
    from .benchmarks.flops import clip_shapes
    from .config import load_config, preset_config
    from .validate.memory import check_fits

    cfg = preset_config(args.preset) if args.preset is not None else load_config(ckpt)
    shapes = clip_shapes(cfg, args.height, args.width, args.num_frames, args.fps)
    check_fits(cfg, shapes, _resolve_device(args.device), batch=args.opt_batch, decode=False,
               towers_only=True)


def _unsupported(args):
    """Accepted flags whose features are not built yet fail loudly instead of being ignored."""
    if args.offload_to_disk_path:
        raise MovaInputError("--offload_to_disk_path is not needed by mova-rt: with --offload "
                             "group --stream_from_disk the blocks stream straight from the "
                             "checkpoint files; leave the flag out")
    if args.sigma_shift is not None:
        raise MovaInputError("--sigma_shift is not supported: the reference ignores it and so "
                             "would we; edit scheduler/scheduler_config.json to change the shift")


def _resolve_device(name):
    """--device (checked with the other flags), or the default: cuda if present."""
    import torch

    if name is None:
        return "cuda" if torch.cuda.is_available() else "cpu"
    return name


def _plan_parallel(args, ckpt, where):
    """The parallel layout (mova_rt.parallel.ParallelConfig) of this launch, or None for one
    process; checked from the checkpoint's config files alone, before any weight is loaded."""
    from .config import load_config
    from .parallel import head_counts, plan
    from .sampler import Guidance

    if (where.world_size == 1 and args.cp_size == 1 and not args.cfg_parallel
            and args.ulysses_degree in (None, 1) and args.ring_degree in (None, 1)):
        return None
    passes = len(Guidance(args.cfg_scale, args.bridge_cfg_scale).passes())
    return plan(args.cp_size, args.ulysses_degree, args.ring_degree, args.cfg_parallel, passes,
                head_counts(load_config(ckpt)), where.world_size)


def cmd_generate(args) -> int:
    from . import launch
    try:
        return _generate(args, launch.from_env())
    finally:
        launch.finish()


def _generate(args, where) -> int:
    from . import launch
    from .config import PRESET_SIZES
    from .media import check_output_path, load_reference_image, save_latents, write_mp4
    from .config import check_sizes
    from .files import StagedOutputs
    from .parallel import Mesh
    from .pipeline import MovaPipeline
    from .tiny import embedded_tiny_checkpoint

    flags = {k: v for k, v in vars(args).items()}   # as given: compared across ranks
    writer = where.rank == 0
    if not writer:
        launch.quiet_unless_writer(where)
    _unsupported(args)
    tiny = args.ckpt_path is None
    defaults = dict(zip(("height", "width", "num_frames"), PRESET_SIZES["tiny"])) if tiny \
        else REFERENCE_DEFAULTS
    for k, v in defaults.items():
        if getattr(args, k) is None:
            setattr(args, k, v)
    if args.prompt is None:
        if not tiny:
            raise MovaInputError("--prompt is required with --ckpt_path")
        args.prompt = "A dog barks at a passing train while rain falls on a tin roof."
    check_sizes(args.height, args.width, args.num_frames)
    if writer:
        check_output_path(args.output_path)
        if args.save_latents:
            check_output_path(args.save_latents, suffix=".safetensors")
    device = launch.device_for(where, _resolve_device(args.device))
    image = None
    if args.ref_path is not None:  # read before the weights, so a bad image fails fast
        image = load_reference_image(args.ref_path, args.height, args.width)
    else:
        warnings.warn("no --ref_path: generating text-to-video-audio from a white first frame, "
                      "as the reference workflow does (expect weaker results than with an image)")
    if tiny and writer:
        print("notice: no --ckpt_path, running the embedded tiny model with random weights: the "
              "output is noise, useful only to check the installation", file=sys.stderr)
    ckpt = embedded_tiny_checkpoint() if tiny else args.ckpt_path

    engine = None
    if args.engine is not None:       # refused before any weight is read
        from .engine import open_engine
        from .sampler import Guidance
        engine = open_engine(args.engine)
        engine.check_machine(device)
        engine.check_model(ckpt, args.precision, args.kernels, lora=bool(args.lora_path))
        passes = len(Guidance(args.cfg_scale, args.bridge_cfg_scale).passes())
        engine.check_request(args.height, args.width, args.num_frames, args.fps,
                             passes if args.cfg_batch is not False else 1, ckpt)
    if args.fp8_weights and args.precision == "fp8":    # its manifest, before any weight
        from .validate.manifests import check_fp8_manifest, read_fp8_manifest
        redo = f"mova-rt quantize --ckpt_path {ckpt} --out NEW_FOLDER"
        check_fp8_manifest(read_fp8_manifest(args.fp8_weights, redo), args.fp8_weights, redo)
    layout = _plan_parallel(args, ckpt, where)
    estimates = _check_fits(args, ckpt, device, layout, decode=writer)
    launch.init(where, device, args.dist_timeout)
    launch.check_agreement(where, flags, ckpt)
    mesh = None
    if layout is not None:
        mesh = Mesh(layout, where.rank, datetime.timedelta(seconds=args.dist_timeout))
    if mesh is not None and writer:
        print(f"notice: {where.world_size} ranks: context parallel {layout.cp_size} (Ulysses "
              f"{layout.ulysses} x ring {layout.ring})" + (
                  f", {layout.cfg_groups} guidance passes in parallel" if layout.cfg_groups > 1
                  else ""), file=sys.stderr)
    offload = _plan_offload(args, ckpt, device, estimates)
    t_start = time.perf_counter()
    try:
        pipe = MovaPipeline.from_pretrained(
            ckpt, device=device, dtype=args.dtype, kernels=args.kernels, lora_path=args.lora_path,
            lora_alpha=args.lora_alpha, lora_scale=args.lora_scale, offload=offload,
            offload_depth=args.offload_depth, stream_from_disk=args.stream_from_disk, mesh=mesh,
            precision=args.precision, fp8_weights=args.fp8_weights, engine=engine,
            compile=args.compile)
        out = pipe(args.prompt, image, height=args.height, width=args.width,
                   negative_prompt=args.negative_prompt,
                   num_frames=args.num_frames, fps=args.fps, seed=args.seed,
                   num_inference_steps=args.num_inference_steps, cfg_scale=args.cfg_scale,
                   remove_video_dit=args.remove_video_dit, progress=args.progress and writer,
                   bridge_cfg_scale=args.bridge_cfg_scale, cfg_batch=args.cfg_batch,
                   cache=args.cache, cache_threshold=args.cache_threshold, decode=writer)
    except Exception as e:
        if type(e).__name__ != "OutOfMemoryError":
            raise
        import torch
        total = torch.cuda.get_device_properties(torch.device(device)).total_memory / 1024 ** 3
        raise MovaInputError(_oom_advice(args, ckpt, total, offload)) from None
    if not writer:            # every rank holds the same latents; rank 0 alone decodes and writes
        return 0
    t0 = time.perf_counter()
    with StagedOutputs() as outputs:    # the mp4 and the latents land together, or neither
        write_mp4(outputs.stage(args.output_path), out.frames, out.waveform, args.fps,
                  out.sample_rate)
        out.timings["mux"] = time.perf_counter() - t0
        if args.save_latents:
            save_latents(outputs.stage(args.save_latents), out.video_latents, out.audio_latents,
                         {"seed": str(args.seed), "prompt": args.prompt,
                          "ckpt": os.path.abspath(ckpt), "steps": str(args.num_inference_steps),
                          "cfg_scale": str(args.cfg_scale), "dtype": args.dtype,
                          "mova_rt": __version__})
        outputs.commit()
    _summary(pipe, out, args, time.perf_counter() - t_start)
    return 0


def _check_fits(args, ckpt, device, layout=None, decode=True) -> dict:
    """Refuses a clip that cannot fit the device (mova_rt.validate.memory) before any weight is
    read; returns the memory plan's estimates per offload mode (for --vram-budget)."""
    from .benchmarks.flops import clip_shapes
    from .config import load_config
    from .sampler import Guidance
    from .validate.memory import check_fits

    cfg = load_config(ckpt)
    shapes = clip_shapes(cfg, args.height, args.width, args.num_frames, args.fps)
    passes = len(Guidance(args.cfg_scale, args.bridge_cfg_scale).passes())
    batch = 1 if args.cfg_batch is False else passes
    cp = 1
    if layout is not None:
        cp = layout.cp_size
        batch = max(1, -(-batch // layout.cfg_groups))
    return check_fits(cfg, shapes, device, batch, args.kernels, decode=decode, cp_size=cp)


def _estimates(args, ckpt) -> dict:
    """GiB that each offload plan needs for this clip (weights + one forward's activations)."""
    from .benchmarks.flops import clip_shapes
    from .benchmarks.plan import meta_plan
    from .config import load_config
    from .offload import component_weights, plan_estimates
    from .sampler import Guidance

    cfg = load_config(ckpt)
    shapes = clip_shapes(cfg, args.height, args.width, args.num_frames, args.fps)
    guidance = Guidance(args.cfg_scale, args.bridge_cfg_scale)
    batch = 1 if args.cfg_batch is False else len(guidance.passes())
    try:
        act = meta_plan(cfg, shapes, kernels=args.kernels or "reference")["activation_peak_gib"]
    except Exception:   # a kernel set that cannot trace on meta: the reference path's estimate
        act = meta_plan(cfg, shapes)["activation_peak_gib"]
    return plan_estimates(component_weights(cfg), act, batch)


def _oom_advice(args, ckpt, total: float, offload) -> str:
    """One line for an out-of-memory on a `total` GiB GPU: what each plan needs for this clip and
    the budget flag that picks one that fits."""
    est = _estimates(args, ckpt)
    fits = [m for m in ("none", "cpu", "group") if est[m] <= total]
    advice = (f"pass --vram-budget {total:.0f} to pick --offload {fits[0]}" if fits
              else "make the clip smaller")
    return (f"out of GPU memory with --offload {offload} on this {total:.0f} GiB GPU; this clip "
            "needs about " + ", ".join(f"{g:.1f} GiB with --offload {m}" for m, g in est.items())
            + f": {advice}")


def _plan_offload(args, ckpt, device, est=None) -> str:
    """--offload as given, else the least offload that fits --vram-budget (which also caps the
    process, so a plan that does not fit fails with a clear message instead of overrunning)."""
    import torch

    from .offload import choose_plan
    if args.vram_budget is None:
        return args.offload or "none"
    if not device.startswith("cuda"):
        raise MovaInputError("--vram-budget caps GPU memory: it needs a CUDA device")
    total = torch.cuda.get_device_properties(torch.device(device)).total_memory / 1024 ** 3
    if not 0 < args.vram_budget <= total:
        raise MovaInputError(f"--vram-budget {args.vram_budget} must be in (0, {total:.1f}] GiB")
    est = est or _estimates(args, ckpt)
    mode = args.offload or choose_plan(est, args.vram_budget)
    if mode is None:
        raise MovaInputError(
            f"no plan fits --vram-budget {args.vram_budget:g} GiB for this clip (estimates: "
            + ", ".join(f"--offload {m} {g:.1f} GiB" for m, g in est.items())
            + "): raise the budget, or make the clip smaller")
    torch.cuda.set_per_process_memory_fraction(args.vram_budget / total, torch.device(device))
    print(f"notice: --vram-budget {args.vram_budget:g} GiB: --offload {mode} (estimate "
          f"{est[mode]:.1f} GiB)", file=sys.stderr)
    return mode


def _summary(pipe, out, args, total):
    import torch

    t = out.timings
    steps = args.num_inference_steps
    rss_gb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024 ** 2  # KiB on Linux
    vram = "n/a (cpu)"
    if pipe.device.type == "cuda":
        vram = f"{torch.cuda.max_memory_allocated(pipe.device) / 1024 ** 3:.2f} GiB"
    print(f"wrote {args.output_path}: {out.frames.shape[0]} frames {out.frames.shape[2]}x"
          f"{out.frames.shape[1]} @ {args.fps:g} fps + {out.sample_rate} Hz audio", file=sys.stderr)
    print(f"time: load {pipe.load_seconds:.2f}s | text {t['text']:.2f}s | vae encode "
          f"{t['vae_encode']:.2f}s | denoise {t['denoise']:.2f}s ({t['denoise'] / steps:.3f} s/step, "
          f"{out.forwards} forwards" + (f", {out.reused} reused by --cache {args.cache}"
                                        if args.cache != "off" else "") + f") | decode {t['decode']:.2f}s | mux {t['mux']:.2f}s | total "
          f"{total:.2f}s", file=sys.stderr)
    print(f"memory: peak VRAM {vram} | peak host RSS {rss_gb:.2f} GiB", file=sys.stderr)
    if pipe.ops is not None:
        print(f"kernels {pipe.ops.name}" + (" (compiled)" if args.compile else "") + ": " +
              ", ".join(f"{k} {v}" for k, v in pipe.ops.choices.items()), file=sys.stderr)
    if pipe.engine is not None:
        e = pipe.engine
        print(f"engine {e.path}: {e.backend}, {e.precision}, units "
              f"{', '.join(e.manifest['units'])} (built {e.manifest['created']})", file=sys.stderr)


def cmd_quantize(args) -> int:
    from .fp8 import SCHEME
    from .quantize_cmd import calibrate_checkpoint, quantize_checkpoint

    calib_only = [f"--{k}" for k in ("prompt", "ref_path", "height", "width", "num_frames",
                                     "calib_steps", "device") if getattr(args, k) is not None]
    if not args.calibrate:
        if calib_only:
            raise MovaInputError(f"{' '.join(calib_only)} describe calibration inputs: add "
                                 "--calibrate, or drop them")
        quantize_checkpoint(args.ckpt_path, args.out)
        print(f"wrote fp8 weights ({SCHEME}) of {args.ckpt_path} to {args.out}")
        return 0
    if not args.prompt:
        raise MovaInputError("--calibrate needs at least one --prompt (calibration runs short "
                             "generations; use prompts like the ones you will generate)")
    if args.calib_steps is None:
        args.calib_steps = 8
    for k, v in REFERENCE_DEFAULTS.items():
        if getattr(args, k) is None:
            setattr(args, k, v)
    from .benchmarks.flops import clip_shapes
    from .config import load_config
    from .validate.memory import check_fits
    device = _resolve_device(args.device)
    cfg = load_config(args.ckpt_path)       # calibration runs generations: they must fit
    check_fits(cfg, clip_shapes(cfg, args.height, args.width, args.num_frames), device)
    calibrate_checkpoint(args.ckpt_path, args.out, args.prompt, args.ref_path, args.height,
                         args.width, args.num_frames, args.calib_steps, args.seed, device,
                         log=lambda m: print(f"quantize: {m}", file=sys.stderr))
    print(f"wrote fp8 weights ({SCHEME}, static activation scales calibrated on "
          f"{len(args.prompt)} prompt(s) x {args.calib_steps} steps at {args.width}x"
          f"{args.height}, {args.num_frames} frames) of {args.ckpt_path} to {args.out}")
    return 0


def cmd_make_checkpoint(args) -> int:
    from .checkpoint import make_checkpoint

    make_checkpoint(args.preset, args.out, args.seed, tokenizer=args.tokenizer)
    print(f"wrote {args.preset} checkpoint to {args.out}")
    return 0


def _probe(module: str) -> str:
    try:
        mod = importlib.import_module(module)
        return f"yes ({getattr(mod, '__version__', 'version unknown')})"
    except Exception as e:  # an optional backend may fail in any way on import
        return f"no ({type(e).__name__}: {str(e).splitlines()[0][:100] if str(e) else ''})"


def cmd_info(args) -> int:
    import torch

    print(f"mova-rt {__version__} | python {platform.python_version()} | torch {torch.__version__}")
    if torch.cuda.is_available():
        for i in range(torch.cuda.device_count()):
            p = torch.cuda.get_device_properties(i)
            print(f"device cuda:{i}: {p.name}, {p.total_memory / 1024 ** 3:.1f} GiB, "
                  f"sm_{p.major}{p.minor}")
    else:
        print("device: cpu only (torch.cuda.is_available() is False)")
    print(f"triton: {_probe('triton')}")
    print(f"flash-attn: {_probe('flash_attn')}")
    print(f"tensorrt: {_probe('tensorrt')}")
    from .versions import library_lines
    print("\n".join(library_lines()))
    from .fp8.cuda_ext import available, build_info
    print(f"cuda extension (mova_rt._C): {build_info()}"
          + ("" if build_info() == "not built" else
             f" ({'kernels in use' if available() else 'no GPU: PyTorch fallbacks in use'})"))
    from .ops import KERNEL_SETS
    print(f"kernel sets: {', '.join(KERNEL_SETS)}")
    return 0


def cmd_bench(args) -> int:
    from .benchmarks.suite import run

    return run(args)


def _one_line_warning(message, category, filename, lineno, line=None):
    return f"warning: {message}\n"


def main(argv=None) -> int:
    from . import launch
    from .files import disk_full, signals_as_interrupts
    from .validate.flags import OUTPUTS, check_flags

    warnings.formatwarning = _one_line_warning
    args = build_parser().parse_args(argv)
    handler = {"generate": cmd_generate, "make-checkpoint": cmd_make_checkpoint,
               "info": cmd_info, "bench": cmd_bench, "quantize": cmd_quantize,
               "build": cmd_build}[args.command]
    where, who = launch.Launch(), ""
    try:
        with signals_as_interrupts():
            where = launch.from_env()
            who = f"rank {where.rank}/{where.world_size}: " if where.distributed else ""
            check_flags(args.command, args)     # every flag, before the command starts
            return handler(args)
    except MovaInputError as e:
        print(f"error: {who}{e}", file=sys.stderr)
        return EXIT_BAD_INPUT
    except Exception as e:
        full = disk_full(e)
        if full is not None:    # the outputs' temporary files are gone with the unwinding
            outs = [str(getattr(args, d)) for d in OUTPUTS.get(args.command, ())
                    if getattr(args, d, None)]
            print(f"error: {who}cannot write {' and '.join(outs) or 'the output'}: {full}; free "
                  "some space there or write to another disk (nothing was written)",
                  file=sys.stderr)
            return EXIT_BAD_INPUT
        if not (where.distributed and launch.is_comm_failure(e)):
            raise
        timeout = getattr(args, "dist_timeout", 0.0)
        print(f"error: {who}{launch.comm_failure_message(e, timeout)}", file=sys.stderr)
        return EXIT_COMM_FAILURE
    except KeyboardInterrupt as e:
        signum = getattr(e, "signum", signal.SIGINT)
        kept = ("a results file keeps what was measured, marked incomplete"
                if args.command == "bench" else "no output was written")
        print(f"error: {who}interrupted ({signal.Signals(signum).name}); {kept}",
              file=sys.stderr)
        return 128 + signum


if __name__ == "__main__":
    sys.exit(main())
