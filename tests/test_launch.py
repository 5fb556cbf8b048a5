"""`mova-rt generate` under torchrun (gloo on the CPU): the launch, the output, and the faults.

Each rank here is a real process running the real command line; the tiny model is the embedded
one, written on first use by whichever rank gets there first."""
import os
import select
import shutil
import signal
import socket
import subprocess
import sys
import time

import pytest
import torch
from safetensors.torch import load_file

from mova_rt.launch import checkpoint_fingerprint, disagreement

SMALL = ["--num_inference_steps", "3", "--no-progress", "--dtype", "fp32"]


def _env(tmp_path, **extra):
    env = dict(os.environ, MOVA_RT_CACHE=str(tmp_path / "cache"), OMP_NUM_THREADS="1",
               PYTHONWARNINGS="ignore")
    env.update({k: str(v) for k, v in extra.items()})
    return env


def _cli(tmp_path, *args, launcher=(sys.executable, "-m", "mova_rt"), env=None, timeout=300):
    return subprocess.run([*launcher, "generate", *args], capture_output=True, text=True,
                          env=env or _env(tmp_path), timeout=timeout, cwd=tmp_path)


def _torchrun(n, target):
    return (sys.executable, "-m", "torch.distributed.run", "--standalone",
            f"--nproc_per_node={n}", *target)


def _latents(path):
    t = load_file(path)
    return t["video_latents"], t["audio_latents"]


@pytest.fixture(scope="module")
def single(tmp_path_factory):
    """One process's latents (fp32, the exact path) for the small clip."""
    tmp = tmp_path_factory.mktemp("single")
    r = _cli(tmp, *SMALL, "--no-cfg-batch", "--output_path", str(tmp / "one.mp4"),
             "--save_latents", str(tmp / "one.safetensors"))
    assert r.returncode == 0, r.stderr
    return _latents(tmp / "one.safetensors")


@pytest.mark.parametrize("launcher, flags", [
    (("-m", "mova_rt"), ["--cp_size", "2"]),
    (("ENTRY",), ["--cfg_parallel"]),
], ids=["module-cp2", "entry-point-cfg-parallel"])
def test_torchrun_generate_equals_one_process(tmp_path, single, launcher, flags):
    if launcher == ("ENTRY",):           # the `mova-rt` console script, as torchrun's target
        entry = shutil.which("mova-rt", path=os.path.dirname(sys.executable))
        assert entry, "mova-rt is not installed next to this Python"
        launcher = (entry,)
    out = tmp_path / "out"
    r = _cli(tmp_path, *SMALL, *flags, "--output_path", str(out / "clip.mp4"),
             "--save_latents", str(out / "clip.safetensors"), launcher=_torchrun(2, launcher))
    assert r.returncode == 0, r.stderr[-3000:]
    assert "notice: 2 ranks" in r.stderr and r.stderr.count("wrote ") == 1   # rank 0 alone
    assert sorted(os.listdir(out)) == ["clip.mp4", "clip.safetensors"]       # no partial files
    got = _latents(out / "clip.safetensors")
    for a, b in zip(got, single):
        assert (a - b).abs().max().item() <= 1e-5 * b.abs().max().item()


def test_torchrun_bad_layout_is_refused_before_loading(tmp_path):
    r = _cli(tmp_path, *SMALL, "--cp_size", "4", "--output_path", str(tmp_path / "x.mp4"),
             launcher=_torchrun(2, ("-m", "mova_rt")))
    assert r.returncode != 0
    assert "error: rank 0/2: 2 processes launched, but --cp_size 4 needs 4" in r.stderr
    assert not os.path.exists(tmp_path / "x.mp4")


def test_cp_without_torchrun_says_how_to_launch(tmp_path):
    r = _cli(tmp_path, *SMALL, "--cp_size", "2", "--output_path", str(tmp_path / "x.mp4"))
    assert r.returncode == 2 and "Traceback" not in r.stderr
    assert r.stderr.strip().splitlines()[-1] == (
        "error: --cp_size 2 needs 2 processes: launch with torchrun --nproc_per_node=2 -m "
        "mova_rt generate ...")


# ---------------------------------------------------------------------------------------------
# Faults: ranks started by hand (what torchrun does), so each rank's own output is seen
# ---------------------------------------------------------------------------------------------
def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _ranks(tmp_path, per_rank_args, timeout_s=5):
    port, n = _free_port(), len(per_rank_args)
    procs = []
    for rank, args in enumerate(per_rank_args):
        env = _env(tmp_path, RANK=rank, LOCAL_RANK=rank, WORLD_SIZE=n, MASTER_ADDR="127.0.0.1",
                   MASTER_PORT=port)
        procs.append(subprocess.Popen(
            [sys.executable, "-m", "mova_rt", "generate", *SMALL, "--dist_timeout",
             str(timeout_s), "--output_path", str(tmp_path / "clip.mp4"), *args],
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env, cwd=tmp_path))
    return procs


def _finish(proc, timeout=120):
    out, err = proc.communicate(timeout=timeout)
    return proc.returncode, err


def test_ranks_with_different_flags_are_stopped_before_loading(tmp_path):
    procs = _ranks(tmp_path, [["--cfg_parallel", "--seed", "1"], ["--cfg_parallel", "--seed", "2"]])
    for p in procs:
        code, err = _finish(p)
        assert code == 2 and "Traceback" not in err, err
        assert "ranks disagree on --seed (rank 0: 1, rank 1: 2)" in err.strip().splitlines()[-1]
    assert not os.path.exists(tmp_path / "clip.mp4")


def test_fingerprint_tells_checkpoints_apart(tmp_path, tiny_ckpt):
    from mova_rt.checkpoint import make_checkpoint
    other = str(tmp_path / "seed1")
    make_checkpoint("tiny", other, seed=1)       # same files and sizes, other weights
    flags = {"seed": 1}
    a = {"flags": flags, "checkpoint": checkpoint_fingerprint(tiny_ckpt), "versions": {}}
    b = {"flags": flags, "checkpoint": checkpoint_fingerprint(other), "versions": {}}
    assert disagreement([a, dict(a)]) is None
    assert "ranks 0 and 1 read different checkpoint files" in disagreement([a, b])


def test_a_rank_that_fails_early_stops_the_others(tmp_path):
    """Rank 1 exits on bad input before joining; rank 0 gives up after --dist_timeout."""
    t0 = time.monotonic()
    procs = _ranks(tmp_path, [["--cfg_parallel"], ["--cfg_parallel", "--ref_path", "missing.png"]])
    code1, err1 = _finish(procs[1])
    code0, err0 = _finish(procs[0])
    assert code1 == 2 and "missing.png" in err1
    assert code0 == 3 and "Traceback" not in err0, err0
    assert "error: rank 0/2: lost contact with the other ranks" in err0
    assert time.monotonic() - t0 < 60
    assert not os.path.exists(tmp_path / "clip.mp4")


@pytest.mark.parametrize("sig", [signal.SIGKILL, signal.SIGSTOP], ids=["dies", "hangs"])
def test_a_rank_that_dies_or_hangs_mid_run_stops_the_others(tmp_path, sig):
    procs = _ranks(tmp_path, [["--cfg_parallel", "--num_inference_steps", "100000"]] * 2)
    try:
        seen, deadline = "", time.monotonic() + 120
        while "notice: 2 ranks" not in seen:       # both ranks joined and agreed: denoising
            assert time.monotonic() < deadline and procs[0].poll() is None, seen
            if select.select([procs[0].stderr], [], [], 1.0)[0]:
                seen += procs[0].stderr.readline()
        time.sleep(1.0)
        t0 = time.monotonic()
        procs[1].send_signal(sig)
        code0, err0 = _finish(procs[0], timeout=60)
        assert time.monotonic() - t0 < 5 + 30        # --dist_timeout 5, plus teardown
        assert code0 == 3 and "Traceback" not in err0, err0
        assert "lost contact with the other ranks" in err0
        assert not os.path.exists(tmp_path / "clip.mp4")
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()


def test_rank_device_assignment():
    from mova_rt.errors import MovaInputError
    from mova_rt.launch import Launch, device_for
    assert device_for(Launch(1, 2, 1), "cpu") == "cpu"
    assert device_for(Launch(0, 1, 0), "cuda:1") == "cuda:1"
    if not torch.cuda.is_available():
        return
    with pytest.raises(MovaInputError, match="pass --device cuda"):
        device_for(Launch(1, 2, 1), "cuda:0")
