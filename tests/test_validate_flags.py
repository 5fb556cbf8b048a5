"""The flags layer (mova_rt/validate/flags.py) and the memory fit (validate/memory.py), on every
command: non-finite and out-of-range numbers, clips that cannot fit, devices nothing runs on,
special files given as inputs, outputs that would destroy an input. Each refused in one
`error:` line, exit code 2, nothing written. In process, on the tiny checkpoint."""
import hashlib
import os
import shutil
import signal

import pytest
import torch
from safetensors.torch import save_file

from helpers import refused
from mova_rt.validate import memory


@pytest.fixture
def cmd(tiny_ckpt, tmp_path):
    """Arguments of each command that would run, writing under tmp_path/out."""
    out = tmp_path / "out"
    clip = ["--height", "32", "--width", "48", "--num_frames", "5"]
    return {
        "generate": ["generate", "--ckpt_path", tiny_ckpt, "--prompt", "x", *clip,
                     "--num_inference_steps", "1", "--output_path", out / "o.mp4",
                     "--no-progress"],
        "build": ["build", "--ckpt_path", tiny_ckpt, *clip, "--device", "cpu", "--out",
                  out / "engine"],
        "bench": ["bench", "--preset", "tiny", "--device", "meta", "--json", out / "b.json",
                  "--no-progress"],
        "quantize": ["quantize", "--ckpt_path", tiny_ckpt, "--out", out / "fp8"],
        "calibrate": ["quantize", "--ckpt_path", tiny_ckpt, "--out", out / "fp8", "--calibrate",
                      "--prompt", "x", *clip, "--device", "cpu"],
        "make-checkpoint": ["make-checkpoint", "--out", out / "ckpt"],
    }


def nothing_written(tmp_path):
    out = tmp_path / "out"
    assert not out.exists() or os.listdir(out) == []


@pytest.fixture
def lora(tmp_path):
    path = tmp_path / "lora.safetensors"
    save_file({"video_dit.blocks.0.self_attn.q.lora_A.weight": torch.full((2, 64), 0.01),
               "video_dit.blocks.0.self_attn.q.lora_B.weight": torch.full((64, 2), 0.01)}, path)
    return path


# ---------------------------------------------------------------------------------------------
# 1. non-finite and overflowing numbers
# ---------------------------------------------------------------------------------------------
NUMBERS = [
    ("generate", ["--fps", "nan"], "--fps nan must be a finite number"),
    ("generate", ["--fps", "inf"], "--fps inf must be a finite number"),
    ("generate", ["--fps", "1e9"], "--fps 1e+09 must be a finite number in (0, 240]"),
    ("build", ["--fps", "nan"], "--fps nan must be a finite number"),
    ("build", ["--fps", "1e9"], "--fps 1e+09 must be a finite number in (0, 240]"),
    ("bench", ["--fps", "inf"], "--fps inf must be a finite number"),
    ("generate", ["--seed", str(2 ** 70)], "--seed 1180591620717411303424 must be an integer"),
    ("make-checkpoint", ["--seed", str(2 ** 64)], "--seed 18446744073709551616 must be an integer"),
    ("calibrate", ["--seed", str(-2 ** 64)], "at least -9223372036854775808"),
    ("generate", ["--dist_timeout", "nan"], "--dist_timeout nan must be a finite number"),
    ("generate", ["--lora_scale", "inf", "--lora_path", "{lora}"], "--lora_scale inf must be"),
    ("generate", ["--lora_alpha", "nan", "--lora_path", "{lora}"], "--lora_alpha nan must be"),
    ("generate", ["--cfg_scale", "1e308"], "--cfg_scale 1e+308 must be a finite number in [0,"),
    ("generate", ["--bridge_cfg_scale=-inf"], "--bridge_cfg_scale -inf must be a finite number in"),
    ("generate", ["--cache_threshold", "nan"], "--cache_threshold nan must be a finite number in"),
    ("generate", ["--num_inference_steps", str(10 ** 12)], "--num_inference_steps"),
    ("bench", ["--config-timeout", "nan"], "--config-timeout nan must be a finite number"),
    ("bench", ["--vram-budget", "inf"], "--vram-budget inf must be a finite number"),
    ("bench", ["--warmup", str(2 ** 80)], "--warmup"),
    ("calibrate", ["--calib_steps", str(10 ** 12)], "--calib_steps"),
    ("build", ["--opt_batch", str(2 ** 40)], "--opt_batch"),
]


@pytest.mark.parametrize("command, extra, needle", NUMBERS)
def test_numbers_must_be_finite_and_in_range(command, extra, needle, cmd, lora, tmp_path, capsys):
    argv = cmd[command] + [a.format(lora=lora) for a in extra]
    line = refused(capsys, argv)
    assert needle in line and ": pass e.g. " in line, line
    nothing_written(tmp_path)


def _lora_file(path, value=0.01, alpha=None):
    save_file({"video_dit.blocks.0.self_attn.q.lora_A.weight": torch.full((2, 64), value),
               "video_dit.blocks.0.self_attn.q.lora_B.weight": torch.full((64, 2), 0.01)}, path,
              metadata=None if alpha is None else {"alpha": alpha})
    return path


@pytest.mark.parametrize("value, alpha, scale, needle", [
    (0.01, "nan", "1", "stores alpha nan"),
    (float("nan"), None, "1", "holds NaN or Inf values"),
    (3e38, "16", "100", "overflows bfloat16"),
])
def test_a_lora_that_would_make_nan_weights_is_refused(value, alpha, scale, needle, cmd,
                                                       tmp_path, capsys):
    """Refused when merged, before the denoise: not blamed on NaN latents afterwards."""
    path = _lora_file(tmp_path / "bad.safetensors", value, alpha)
    line = refused(capsys, cmd["generate"] + ["--lora_path", path, "--lora_scale", scale])
    assert needle in line and "latents" not in line, line
    nothing_written(tmp_path)


# ---------------------------------------------------------------------------------------------
# 2. clips that cannot fit: refused from the memory plan, with the figure and the limit
# ---------------------------------------------------------------------------------------------
@pytest.fixture
def host_24gib(monkeypatch):
    """A 24 GiB host, whatever this one has (the figures in the messages are then fixed)."""
    monkeypatch.setattr(memory, "host_memory_gib", lambda: 24.0)


@pytest.mark.parametrize("command, extra, part", [
    ("generate", ["--height", "16384", "--width", "16384"], "decoded frames"),
    ("generate", ["--height", "64", "--width", "96", "--num_frames", "100001"], "decoded frames"),
    ("generate", ["--fps", "1e-6"], "waveform"),
    ("calibrate", ["--height", "16384", "--width", "16384"], "decoded frames"),
    ("build", ["--height", "65536", "--width", "65536"], "latents"),
])
def test_a_clip_that_cannot_fit_is_refused_up_front(command, extra, part, cmd, host_24gib,
                                                    tmp_path, capsys):
    line = refused(capsys, cmd[command] + extra)
    assert "needs about" in line and part in line and "more than the 24.0 GiB" in line, line
    nothing_written(tmp_path)


def test_the_plan_itself_decides_below_the_floor(cmd, monkeypatch, tmp_path, capsys):
    """A small clip on a machine too small for the weights: the memory plan's estimate (weights
    and one forward) is what refuses it."""
    monkeypatch.setattr(memory, "host_memory_gib", lambda: 0.5)
    line = refused(capsys, cmd["generate"])
    assert "memory plan of `mova-rt bench --device meta`" in line and "0.5 GiB" in line, line
    nothing_written(tmp_path)


def test_bench_meta_refuses_what_no_plan_can_count(cmd, tmp_path, capsys):
    line = refused(capsys, cmd["bench"] + ["--height", "16384", "--width", "16384",
                                           "--num_frames", "100001"])
    assert "needs about" in line and "4096 GiB" in line, line
    line = refused(capsys, cmd["bench"] + ["--height", "16384", "--width", "16384",
                                           "--num_frames", "4397"])    # 1.15e9 video tokens
    assert "too large to plan" in line, line
    nothing_written(tmp_path)


def test_on_a_gpu_the_least_offload_must_fit(monkeypatch):
    """The CUDA branch (simulated: no GPU here): the least-offload estimate against the GPU."""
    from mova_rt.benchmarks.flops import clip_shapes
    from mova_rt.config import preset_config
    from mova_rt.errors import MovaInputError
    cfg = preset_config("tiny")
    shapes = clip_shapes(cfg, 64, 96, 17)
    monkeypatch.setattr(memory, "device_limit", lambda d: (8.0, "the 8.0 GiB of this GPU"))
    est = memory.check_fits(cfg, shapes, "cuda", batch=2)
    assert set(est) == {"none", "cpu", "group"} and 0 < min(est.values()) < 8
    monkeypatch.setattr(memory, "device_limit", lambda d: (0.1, "the 0.1 GiB of this GPU"))
    with pytest.raises(MovaInputError, match=r"with --offload \w+, the least of the memory plan"):
        memory.check_fits(cfg, shapes, "cuda", batch=2)


# ---------------------------------------------------------------------------------------------
# 8. devices: named as the problem, never blamed on the checkpoint
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("command, device, needle", [
    ("generate", "meta", "holds no data"),
    ("build", "meta", "holds no data"),
    ("calibrate", "meta", "holds no data"),
    ("generate", "xpu", "is not supported by mova-rt"),
    ("bench", "vulkan", "is not supported by mova-rt"),
    ("generate", "cuda:7", "cuda:7"),
    ("generate", "nonsense", "is not a device"),
])
def test_a_device_problem_is_named_as_such(command, device, needle, cmd, tmp_path, capsys):
    if device == "cuda:7" and torch.cuda.device_count() > 7:
        pytest.skip("this machine has 8 GPUs")
    argv = [a for a in cmd[command]]
    if "--device" in argv:
        argv[argv.index("--device") + 1] = device
    else:
        argv += ["--device", device]
    line = refused(capsys, argv)
    assert needle in line and "download" not in line and "checkpoint" not in line, line
    nothing_written(tmp_path)


# ---------------------------------------------------------------------------------------------
# 9. special files as inputs: refused, not read forever
# ---------------------------------------------------------------------------------------------
@pytest.fixture
def no_hang():
    """A regression would block on the FIFO: fail after 30 s instead of hanging the suite."""
    def timeout(signum, frame):
        raise AssertionError("blocked reading a special file")
    old = signal.signal(signal.SIGALRM, timeout)
    signal.alarm(30)
    yield
    signal.alarm(0)
    signal.signal(signal.SIGALRM, old)


@pytest.mark.parametrize("command, flag, kind", [
    ("generate", "--ref_path", "fifo"), ("generate", "--ref_path", "/dev/zero"),
    ("calibrate", "--ref_path", "fifo"), ("generate", "--lora_path", "fifo"),
    ("generate", "--ref_path", "folder"), ("bench", "--render", "fifo"),
    ("generate", "--ckpt_path", "file"),
])
def test_special_files_are_refused(command, flag, kind, cmd, tmp_path, no_hang, capsys):
    path = {"fifo": tmp_path / "in.fifo", "folder": tmp_path, "file": tmp_path / "f.png",
            "/dev/zero": "/dev/zero"}[kind]
    if kind == "fifo":
        os.mkfifo(path)
    if kind == "file":
        path.write_bytes(b"x")
    argv = [a for a in cmd[command]]
    if flag in argv:
        argv[argv.index(flag) + 1] = path
    else:
        argv += [flag, path]
    line = refused(capsys, argv)
    what = {"fifo": "is a FIFO", "/dev/zero": "is a character device", "folder": "is a folder",
            "file": "is a regular file, not a folder"}[kind]
    assert f"{flag} {path} {what}" in line, line
    nothing_written(tmp_path)


def test_special_files_inside_inputs_are_refused(tiny_copy, cmd, tmp_path, no_hang, capsys):
    """A config file, an engine manifest or an fp8 manifest that is a FIFO."""
    cfg = os.path.join(tiny_copy, "scheduler", "scheduler_config.json")
    os.remove(cfg)
    os.mkfifo(cfg)
    argv = [tiny_copy if a == cmd["generate"][2] else a for a in cmd["generate"]]
    assert "is a FIFO" in refused(capsys, argv)
    for flag, extra in (("--engine", []), ("--fp8_weights", ["--precision", "fp8"])):
        folder = tmp_path / flag.strip("-")
        folder.mkdir()
        os.mkfifo(folder / "manifest.json")
        line = refused(capsys, cmd["generate"] + [flag, folder] + extra)
        assert "manifest.json is a FIFO" in line, line
    nothing_written(tmp_path)


# ---------------------------------------------------------------------------------------------
# 10. no output path may overwrite or enter an input
# ---------------------------------------------------------------------------------------------
def _digest(folder) -> str:
    h = hashlib.sha256()
    for root, dirs, files in sorted(os.walk(folder)):
        dirs.sort()
        for f in sorted(files):
            p = os.path.join(root, f)
            h.update(os.path.relpath(p, folder).encode())
            with open(p, "rb") as fh:
                h.update(fh.read())
    return h.hexdigest()


def test_outputs_never_touch_inputs(tiny_copy, lora, tmp_path, capsys):
    from PIL import Image
    image = tmp_path / "ref.mp4"                  # an image named like an output
    Image.new("RGB", (48, 32), (200, 30, 30)).save(image, format="PNG")
    os.link(image, tmp_path / "link.mp4")
    lora_dir = tmp_path / "trainer_run"               # a trainer's folder: weights and more
    lora_dir.mkdir()
    shutil.copy(lora, lora_dir / "lora_weights.pt")
    shutil.copy(lora, lora_dir / "kept.safetensors")
    before = _digest(tiny_copy), image.read_bytes(), lora.read_bytes(), _digest(lora_dir)
    gen = ["generate", "--ckpt_path", tiny_copy, "--prompt", "x", "--height", "32", "--width",
           "48", "--num_frames", "5", "--num_inference_steps", "1", "--no-progress"]
    weight = os.path.join(tiny_copy, "audio_dit", "diffusion_pytorch_model.safetensors")
    cases = [
        (gen + ["--output_path", os.path.join(tiny_copy, "x.mp4")], "inside the folder of the "
         "checkpoint"),
        (gen + ["--output_path", tmp_path / "o.mp4", "--save_latents", weight], "--save_latents"),
        (gen + ["--ref_path", image, "--output_path", image], "is the reference image"),
        (gen + ["--ref_path", image, "--output_path", tmp_path / "link.mp4"], "is the reference"),
        (gen + ["--lora_path", lora, "--output_path", tmp_path / "o.mp4", "--save_latents", lora],
         "is the LoRA"),
        (gen + ["--lora_path", lora_dir, "--output_path", tmp_path / "o.mp4", "--save_latents",
                lora_dir / "kept.safetensors"], "is a file of the LoRA"),
        (["bench", "--preset", "tiny", "--device", "meta", "--ckpt_path", tiny_copy, "--json",
          os.path.join(tiny_copy, "text_encoder", "config.json")], "inside the folder"),
        (["build", "--ckpt_path", tiny_copy, "--device", "cpu", "--out",
          os.path.join(tiny_copy, "engine")], "inside the folder"),
        (["quantize", "--ckpt_path", tiny_copy, "--out", os.path.join(tiny_copy, "fp8")],
         "inside the folder"),
    ]
    for argv, needle in cases:
        line = refused(capsys, argv)
        assert needle in line and "choose" in line, line
    assert (_digest(tiny_copy), image.read_bytes(), lora.read_bytes(), _digest(lora_dir)) == \
        before
    assert not (tmp_path / "o.mp4").exists()
