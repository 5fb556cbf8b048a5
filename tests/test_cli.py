"""The command line as a user meets it: the tiny demo end to end (mp4 read back), and every bad
input answered with one line, exit code 2, no traceback and no file written."""
import os
import subprocess
import sys

import pytest
from PIL import Image

from mova_rt.media import probe_mp4


def cli(*args, env_extra=None, cwd=None):
    env = dict(os.environ, PYTHONWARNINGS="default")
    env.update(env_extra or {})
    return subprocess.run([sys.executable, "-m", "mova_rt", *args], capture_output=True, text=True,
                          env=env, cwd=cwd, timeout=300)


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    return str(tmp_path_factory.mktemp("cache"))


def test_tiny_demo_end_to_end(tmp_path, cache):
    out = tmp_path / "o" / "demo.mp4"
    lat = tmp_path / "lat.safetensors"
    r = cli("generate", "--output_path", str(out), "--num_inference_steps", "8", "--save_latents",
            str(lat), env_extra={"MOVA_RT_CACHE": cache})
    assert r.returncode == 0, r.stderr
    assert "random weights" in r.stderr and "white first frame" in r.stderr
    assert "s/step" in r.stderr and "peak host RSS" in r.stderr and "16 forwards" in r.stderr
    info = probe_mp4(str(out))
    assert info["frames"] == 17 and info["fps"] == pytest.approx(24.0)
    assert (info["width"], info["height"]) == (96, 64)
    assert info["video_codec"] == "h264" and info["pix_fmt"] == "yuv420p"
    assert info["audio_codec"] == "aac" and info["audio_sample_rate"] == 48000
    assert info["audio_channels"] == 1
    assert abs(info["audio_duration"] - 17 / 24) <= 1 / 24 + 1e-6
    assert abs(info["video_duration"] - 17 / 24) <= 1 / 24 + 1e-6
    assert sorted(os.listdir(out.parent)) == ["demo.mp4"]  # no temp file left
    from safetensors import safe_open
    with safe_open(str(lat), "pt") as f:
        assert f.get_tensor("video_latents").shape == (1, 16, 5, 8, 12)
        assert f.get_tensor("audio_latents").shape == (1, 16, 36)


def test_demo_with_reference_image_and_checkpoint(tmp_path, tiny_ckpt):
    img = tmp_path / "ref.png"
    Image.new("RGB", (200, 100), (200, 30, 30)).save(img)
    out = tmp_path / "x.mp4"
    r = cli("generate", "--ckpt_path", tiny_ckpt, "--prompt", "a red wall", "--ref_path", str(img),
            "--height", "32", "--width", "48", "--num_frames", "9", "--num_inference_steps", "3",
            "--output_path", str(out), "--dtype", "fp32", "--cfg_scale", "1")
    assert r.returncode == 0, r.stderr
    assert "white first frame" not in r.stderr and "3 forwards" in r.stderr
    assert probe_mp4(str(out))["frames"] == 9


def nan_checkpoint(src, dst):
    import shutil
    import torch
    from safetensors.torch import load_file, save_file
    shutil.copytree(src, dst)
    path = os.path.join(dst, "audio_dit", "diffusion_pytorch_model.safetensors")
    t = load_file(path)
    t["head.head.bias"] = torch.full_like(t["head.head.bias"], float("nan"))
    save_file(t, path)
    return dst


BAD = {
    "height": (["--height", "65"], "multiples of 16"),
    "frames": (["--num_frames", "18"], "multiple of 4"),
    "ckpt": (["--ckpt_path", "/nonexistent/ckpt", "--prompt", "x"], "does not exist"),
    "image": (["--ref_path", "{bad_image}"], "cannot read reference image"),
    "missing_image": (["--ref_path", "/nonexistent.png"], "cannot read reference image"),
    "output": (["--output_path", "{file}/sub/x.mp4"], "output video"),
    "suffix": (["--output_path", "{tmp}/x.avi"], ".mp4"),
    "offload_disk": (["--offload_to_disk_path", "/tmp/x"], "--stream_from_disk"),
    "disk_needs_group": (["--stream_from_disk"], "needs --offload group"),
    "offload_depth": (["--offload", "group", "--offload_depth", "0"], "at least 1"),
    "budget_cpu": (["--vram-budget", "12", "--device", "cpu"], "needs a CUDA device"),
    "cp": (["--cp_size", "2"], "needs 2 processes: launch with torchrun --nproc_per_node=2"),
    "ulysses": (["--cp_size", "2", "--ulysses_degree", "3"], "--ulysses_degree 3 does not divide --cp_size 2"),
    "sigma_shift": (["--sigma_shift", "3"], "scheduler_config.json"),
    "lora": (["--lora_path", "{lora}"], "matches no Linear"),
    "nan": (["--ckpt_path", "{nan_ckpt}", "--prompt", "x", "--height", "64", "--width", "96",
             "--num_frames", "17", "--num_inference_steps", "2"], "NaN/Inf"),
    "kernels": (["--kernels", "nope"], "unknown --kernels"),
}


@pytest.mark.parametrize("case", sorted(BAD))
def test_bad_input_one_line_exit_2_no_output(case, tmp_path, cache, tiny_ckpt):
    import torch
    from safetensors.torch import save_file
    args, match = BAD[case]
    bad_image = tmp_path / "bad.png"
    bad_image.write_bytes(os.urandom(300))
    a_file = tmp_path / "plainfile"
    a_file.write_text("x")
    save_file({"video_dit.blocks.7.self_attn.q.lora_A.weight": torch.ones(2, 64),
               "video_dit.blocks.7.self_attn.q.lora_B.weight": torch.ones(64, 2)},
              tmp_path / "lora.safetensors")
    subs = dict(bad_image=bad_image, file=a_file, tmp=tmp_path, lora=tmp_path / "lora.safetensors",
                nan_ckpt=nan_checkpoint(tiny_ckpt, str(tmp_path / "nanck")) if case == "nan" else "")
    args = [a.format(**subs) for a in args]
    out = tmp_path / "out" / "result.mp4"
    if "--output_path" not in args:
        args += ["--output_path", str(out)]
    r = cli("generate", "--no-progress", *args, env_extra={"MOVA_RT_CACHE": cache})
    assert r.returncode == 2, r.stderr
    assert "Traceback" not in r.stderr
    errors = [l for l in r.stderr.splitlines() if l.startswith("error:")]
    assert len(errors) == 1 and match in errors[0], r.stderr
    assert not out.exists()
    if out.parent.exists():
        assert os.listdir(out.parent) == []


def test_info():
    r = cli("info")
    assert r.returncode == 0
    assert "mova-rt" in r.stdout and "triton:" in r.stdout and "flash-attn: no" in r.stdout
    assert "tensorrt:" in r.stdout and "kernel sets: reference, sdpa" in r.stdout


def test_make_checkpoint_refuses_existing_and_full_size(tmp_path):
    r = cli("make-checkpoint", "--out", str(tmp_path))
    assert r.returncode == 2 and "already exists" in r.stderr
    r = cli("make-checkpoint", "--preset", "mova-360p", "--out", str(tmp_path / "big"))
    assert r.returncode == 2 and "only the 'tiny' preset" in r.stderr


def test_dual_cfg_and_sequential_guidance_flags(tmp_path, cache):
    out = tmp_path / "dual.mp4"
    r = cli("generate", "--output_path", str(out), "--num_inference_steps", "2",
            "--bridge_cfg_scale", "3.5", "--no-cfg-batch", env_extra={"MOVA_RT_CACHE": cache})
    assert r.returncode == 0, r.stderr
    assert "6 forwards" in r.stderr and out.exists()       # three passes per step
    r = cli("generate", "--output_path", str(out), "--bridge_cfg_scale", "nan",
            env_extra={"MOVA_RT_CACHE": cache})
    assert r.returncode == 2 and "--bridge_cfg_scale nan must be a finite number" in r.stderr
