"""Outputs land whole or not at all, on every exit path: a full disk (while writing the mp4,
or the latents after the mp4), SIGTERM and SIGHUP (handled like SIGINT), and the commit of
several outputs, which puts back what it replaced if a rename fails."""
import errno
import json
import os
import subprocess
import sys

import pytest

from helpers import refused
from mova_rt import files


# Stands in for the model: the outputs are what these tests are about, so a run goes straight
# to writing a 5-frame clip (noise: it does not compress) and its latents. Source text, so the
# subprocess below defines the same class.
FAKE = """
class FakePipeline:
    device, engine, load_seconds = None, None, 0.0
    def __init__(self):
        import torch
        self.device = torch.device("cpu")
    @classmethod
    def from_pretrained(cls, *args, **kwargs):
        return cls()
    def __call__(self, *args, **kwargs):
        import numpy as np, torch
        from mova_rt.pipeline import MovaOutput
        noise = np.random.default_rng(0).integers(0, 256, (5, 32, 48, 3), dtype=np.uint8)
        return MovaOutput(frames=noise,
            waveform=np.zeros(10000, np.float32), sample_rate=48000, fps=24.0,
            video_latents=torch.zeros(1, 16, 2, 4, 6), audio_latents=torch.zeros(1, 16, 11),
            forwards=2, timings={"text": 0.0, "vae_encode": 0.0, "denoise": 0.0, "decode": 0.0})
"""
_namespace: dict = {}
exec(FAKE, _namespace)
FakePipeline = _namespace["FakePipeline"]


@pytest.fixture
def gen(tiny_ckpt, tmp_path, monkeypatch):
    import mova_rt.pipeline
    monkeypatch.setattr(mova_rt.pipeline, "MovaPipeline", FakePipeline)
    out = tmp_path / "out"
    out.mkdir()
    (out / "o.mp4").write_bytes(b"the previous run's video")
    return out, ["generate", "--ckpt_path", tiny_ckpt, "--prompt", "x", "--height", "32",
                 "--width", "48", "--num_frames", "5", "--num_inference_steps", "1",
                 "--output_path", out / "o.mp4", "--save_latents", out / "l.safetensors",
                 "--no-progress"]


def untouched(out):
    assert sorted(os.listdir(out)) == ["o.mp4"]            # no temporary file, no latents
    assert (out / "o.mp4").read_bytes() == b"the previous run's video"


def test_a_full_disk_while_writing_the_video(gen, monkeypatch, capsys):
    from mova_rt import media
    real = media._encode

    def full(tmp, *args):
        real(tmp, *args)                  # the temporary file exists, then the disk is full
        raise OSError(errno.ENOSPC, "No space left on device", tmp)
    monkeypatch.setattr(media, "_encode", full)
    out, argv = gen
    line = refused(capsys, argv)
    assert "no space left on the device" in line and str(out / "o.mp4") in line, line
    assert "nothing was written" in line
    untouched(out)


def test_the_latents_failing_after_the_video_keep_the_old_video(gen, monkeypatch, capsys):
    """The reported case: --save_latents fails once the mp4 is written. Both land together, so
    the previous mp4 stays and neither new file appears."""
    import safetensors.torch

    def full(tensors, path, metadata=None):
        with open(path, "wb") as fh:
            fh.write(b"partial")
        raise RuntimeError("Error while serializing: I/O error: No space left on device "
                           "(os error 28)")                # what safetensors raises
    monkeypatch.setattr(safetensors.torch, "save_file", full)
    out, argv = gen
    line = refused(capsys, argv)
    assert "no space left on the device" in line, line
    untouched(out)


def test_commit_puts_back_what_it_replaced_when_a_rename_fails(tmp_path, monkeypatch):
    a, b = tmp_path / "a.mp4", tmp_path / "b.safetensors"
    a.write_text("old a")
    real = os.replace

    def replace(src, dst):
        if str(dst) == str(b):
            raise OSError(errno.EIO, "Input/output error")
        real(src, dst)
    with pytest.raises(OSError):
        with files.StagedOutputs() as staged:
            open(staged.stage(str(a)), "w").write("new a")
            open(staged.stage(str(b)), "w").write("new b")
            monkeypatch.setattr(os, "replace", replace)
            staged.commit()
    assert sorted(os.listdir(tmp_path)) == ["a.mp4"] and a.read_text() == "old a"


def test_commit_lands_every_output(tmp_path):
    a, b = tmp_path / "a.mp4", tmp_path / "b.safetensors"
    a.write_text("old a")
    with files.StagedOutputs() as staged:
        open(staged.stage(str(a)), "w").write("new a")
        open(staged.stage(str(b)), "w").write("new b")
        staged.commit()
    assert sorted(os.listdir(tmp_path)) == ["a.mp4", "b.safetensors"]
    assert a.read_text() == "new a" and b.read_text() == "new b"


# A separate process (a signal that is not handled would stop the test runner itself): each
# scenario makes the command signal itself at the worst moment, with its temporary output on
# disk, and main() must return 128 + the signal with nothing left behind. Then a real file size
# limit (EFBIG from the kernel, through PyAV) in the same process.
SCENARIOS = FAKE + r"""
import json, os, resource, signal, sys, time
import mova_rt.engine as engine
import mova_rt.media as media
import mova_rt.pipeline as pipeline
from mova_rt.cli import main

real_pipeline = pipeline.MovaPipeline      # the build loads the real towers
pipeline.MovaPipeline = FakePipeline

ckpt, out = sys.argv[1], sys.argv[2]
clip = ["--height", "32", "--width", "48", "--num_frames", "5"]
results = {}

real_encode = media._encode
def encode_then_term(tmp, *a):
    real_encode(tmp, *a)
    os.kill(os.getpid(), signal.SIGTERM)
    time.sleep(5)
media._encode = encode_then_term
results["generate_sigterm"] = main(["generate", "--ckpt_path", ckpt, "--prompt", "x", *clip,
    "--num_inference_steps", "1", "--output_path", os.path.join(out, "g", "o.mp4"),
    "--no-progress"])
media._encode = real_encode

def unit_then_hup(spec, path, *a):            # no compiler: a unit file, then the signal
    with open(path, "wb") as fh:
        fh.write(b"unit")
    os.kill(os.getpid(), signal.SIGHUP)
    time.sleep(5)
engine.build_inductor = unit_then_hup
pipeline.MovaPipeline = real_pipeline
results["build_sighup"] = main(["build", "--ckpt_path", ckpt, *clip, "--device", "cpu",
                                "--out", os.path.join(out, "b", "engine")])

pipeline.MovaPipeline = FakePipeline
signal.signal(signal.SIGXFSZ, signal.SIG_IGN)    # past the limit: EFBIG instead of a kill
resource.setrlimit(resource.RLIMIT_FSIZE, (8192, 8192))
results["generate_efbig"] = main(["generate", "--ckpt_path", ckpt, "--prompt", "x", *clip,
    "--num_inference_steps", "1", "--output_path", os.path.join(out, "f", "o.mp4"),
    "--no-progress"])
results["handlers_back"] = signal.getsignal(signal.SIGTERM) == signal.SIG_DFL
print("RESULTS " + json.dumps(results))
"""


def test_signals_and_a_real_size_limit_leave_nothing(tiny_ckpt, tmp_path):
    out = tmp_path / "out"
    for sub in "gbf":
        (out / sub).mkdir(parents=True)
    r = subprocess.run([sys.executable, "-c", SCENARIOS, tiny_ckpt, str(out)],
                       capture_output=True, text=True, timeout=300)
    lines = [l for l in r.stdout.splitlines() if l.startswith("RESULTS ")]
    assert r.returncode == 0 and lines, r.stderr[-3000:]
    results = json.loads(lines[0][len("RESULTS "):])
    assert results == {"generate_sigterm": 143, "build_sighup": 129, "generate_efbig": 2,
                       "handlers_back": True}, r.stderr[-3000:]
    errors = [l for l in r.stderr.splitlines() if l.startswith("error:")]
    assert errors[0] == "error: interrupted (SIGTERM); no output was written"
    assert errors[1] == "error: interrupted (SIGHUP); no output was written"
    assert "file too large" in errors[2] and len(errors) == 3, errors
    assert "Traceback" not in r.stderr
    for sub in "gbf":
        assert os.listdir(out / sub) == [], (sub, os.listdir(out / sub))
