"""The benchmark suite: the full-size path on the meta device against the spec's numbers, the
whole suite small on the CPU (a smoke test, nothing timed is asserted), side-by-side alternation,
out-of-memory as a result, and bad input answered with one line."""
import json
import os
import subprocess
import sys

import pytest
import torch

from mova_rt.benchmarks import bench_step, configs as bench_configs
from mova_rt.benchmarks.flops import SPEC_PARAMS, clip_shapes, forward_flops
from mova_rt.benchmarks.plan import LiveBytes, meta_plan
from mova_rt.benchmarks.suite import SCHEMA
from mova_rt.cli import main
from mova_rt.config import PRESET_SIZES, preset_config

T = 1e12


@pytest.fixture(scope="module")
def plan_360p():
    cfg = preset_config("mova-360p")
    s = clip_shapes(cfg, *PRESET_SIZES["mova-360p"])
    return s, meta_plan(cfg, s)


def test_360p_tokens_params_and_shapes_on_meta(plan_360p):
    s, plan = plan_360p
    assert (s.L_v, s.L_a, s.L_t) == (43120, 403, 512)
    assert s.latent_grid == (49, 44, 80) and s.video_grid == (49, 22, 40)
    for name, spec in SPEC_PARAMS.items():          # spec 2.1, given to 3 decimals of a billion
        assert plan["params"][name] == pytest.approx(spec, abs=0.0005e9), name
    assert sum(plan["params"].values()) == pytest.approx(18.37e9, rel=1e-3)
    assert plan["forward_output_shapes"] == [[1, 16, 49, 44, 80], [1, 128, 403]]


def test_360p_flops_formula_matches_spec_and_counted(plan_360p):
    _, plan = plan_360p
    f = plan["flops_formula"]
    # Spec 4.3, in TFLOP per forward.
    assert f["video_linear"] / T == pytest.approx(1033, abs=1)
    assert f["video_self_attention"] / T == pytest.approx(1523, abs=1)
    assert f["video_text_attention"] / T == pytest.approx(18, abs=0.5)
    assert f["bridge_linear"] / T == pytest.approx(177, abs=0.5)
    assert f["bridge_attention"] / T == pytest.approx(14, abs=0.5)
    assert f["audio_linear"] / T == pytest.approx(1.15, abs=0.01)
    assert f["audio_attention"] / T == pytest.approx(0.07, abs=0.005)
    assert f["embeddings_heads"] / T == pytest.approx(0.15, abs=0.01)
    assert plan["flops_formula_total"] / 1e15 == pytest.approx(2.77, abs=0.005)
    # torch's FlopCounterMode over the real forward counts exactly the formula, tower by tower.
    assert plan["flops_counted_total"] == plan["flops_formula_total"]
    assert plan["flops_counted_towers"] == plan["flops_formula_towers"]


def test_360p_memory_estimate_is_plausible(plan_360p):
    s, plan = plan_360p
    assert plan["weights_gib"] == pytest.approx(18.368e9 * 2 / 2 ** 30, rel=1e-3)
    ffn_hidden = s.L_v * 13824 * 2 / 2 ** 30        # one bf16 FFN intermediate, 1.1 GiB
    assert 2 * ffn_hidden < plan["activation_peak_gib"] < 12
    assert plan["vram_estimate_gib"] < 48        # the reference needs 48 GB at 360p


def test_720p_on_meta():
    cfg = preset_config("mova-720p")
    s = clip_shapes(cfg, *PRESET_SIZES["mova-720p"])
    assert s.L_v == 176400 and s.L_a == 403
    f = forward_flops(cfg, s)
    assert sum(f.values()) / 1e15 == pytest.approx(30.56, abs=0.01)
    assert f["video_self_attention"] / sum(f.values()) == pytest.approx(0.83, abs=0.01)


def test_live_bytes_tracks_allocations_views_and_frees():
    with LiveBytes() as tracker:
        a = torch.empty(1000, device="meta")
        assert tracker.live == 4000
        b = a * 2                      # a new tensor
        v = b.view(10, 100)            # a view: no bytes
        assert tracker.live == 8000
        del b
        assert tracker.live == 8000    # the view keeps b's storage alive
        del v
        assert tracker.live == 4000
        c = a.float().sum()            # float() of fp32 is a no-op alias; sum is 4 bytes
        assert tracker.live == 4004 and tracker.peak == 8000
        del a, c
    assert tracker.live == 0


# ---------------------------------------------------------------------------------------------
# The whole suite, small, on the CPU
# ---------------------------------------------------------------------------------------------
def test_whole_suite_small_on_cpu(tmp_path, capsys):
    js = tmp_path / "r" / "tiny.json"
    os.makedirs(js.parent)
    rc = main(["bench", "--preset", "tiny", "--device", "cpu", "--configs", "reference,sdpa",
               "--warmup", "1", "--steps", "2", "--ops", "--time-stages", "--json", str(js),
               "--no-progress"])
    assert rc == 0
    out = capsys.readouterr().out
    assert "ceilings (this run)" in out and "reference" in out and "attention.video_self" in out
    data = json.loads(js.read_text())
    assert data["schema"] == SCHEMA and data["complete"] is True
    env = data["environment"]
    for key in ("device_name", "torch", "triton", "commit", "gpu_memory_gib", "driver"):
        assert key in env
    assert data["shapes"]["L_v"] == 120 and data["shapes"]["L_a"] == 36
    assert set(data["ceilings"]) == {"matmul", "copy_d2d"}          # no pinned H2D on a CPU
    assert all(c["value"] > 0 for c in data["ceilings"].values())
    assert data["build"]["status"] == "ok"
    ref, sdpa = data["configs"]
    assert (ref["name"], sdpa["name"]) == ("reference", "sdpa")
    for c in (ref, sdpa):
        assert c["status"] == "ok" and len(c["step_s"]["samples"]) == 2
        assert len(c["warmup_s"]) == 1 and c["forwards_per_step"] == 2
        assert c["tflops"] > 0 and c["peak_rss_gib"] > 0
        assert set(c["towers_s_per_forward"]) == {"video_blocks", "audio_blocks", "bridge", "rest"}
        assert c["towers_s_per_forward"]["video_blocks"] > 0
    assert ref["ratio_to_first"] == 1.0 and sdpa["ratio_to_first"] > 0
    # each configuration ran in a process of its own (the default) and reports that process's peak
    assert all(c["process_s"] > 0 and c["peak_rss_process_gib"] > 0 for c in (ref, sdpa))
    ops = {(r["op"], r["backend"]): r for r in data["ops"]}
    for op in ("attention.video_self", "attention.audio_self", "attention.bridge_a2v",
               "attention.bridge_v2a", "attention.video_text", "linear.video_ffn_up",
               "rope.video_interleaved", "norm.layernorm_modulate", "norm.gated_residual"):
        assert any(k[0] == op and r["status"] == "ok" for k, r in ops.items()), op
    # Backends of one op agree: eager fp32 softmax vs SDPA in bf16.
    assert ops[("attention.video_self", "eager")]["max_abs_diff_vs_first"] < 0.05
    assert ops[("attention.video_self", "flash-attn")]["status"] in ("skipped", "ok")
    assert set(data["stages"]) == {"text", "vae_encode", "vae_decode", "audio_decode"}
    assert all(r["status"] == "ok" for r in data["stages"].values())
    png = js.with_suffix(".png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n"
    assert sorted(os.listdir(js.parent)) == ["tiny.json", "tiny.png"]   # no temporary left


def test_bench_loads_a_checkpoint(tiny_ckpt, tmp_path):
    js = tmp_path / "c.json"
    rc = main(["bench", "--preset", "tiny", "--device", "cpu", "--ckpt_path", tiny_ckpt,
               "--warmup", "0", "--steps", "1", "--json", str(js), "--no-progress"])
    assert rc == 0
    data = json.loads(js.read_text())
    assert data["build"]["source"] == tiny_ckpt and data["configs"][0]["status"] == "ok"
    # Without warm-up the tower breakdown comes from one extra, untimed step.
    assert data["configs"][0]["towers_s_per_forward"]["video_blocks"] > 0


def test_render_redraws_a_results_file(tmp_path, capsys):
    js = tmp_path / "m.json"
    assert main(["bench", "--preset", "tiny", "--device", "cpu", "--steps", "1", "--warmup", "0",
                 "--json", str(js), "--no-progress"]) == 0
    os.remove(js.with_suffix(".png"))
    capsys.readouterr()
    assert main(["bench", "--render", str(js)]) == 0
    assert "auto" in capsys.readouterr().out          # the default configuration
    assert js.with_suffix(".png").exists()


def test_meta_device_is_the_plan_only(tmp_path, capsys):
    js = tmp_path / "p.json"
    assert main(["bench", "--preset", "mova-360p", "--device", "meta", "--json", str(js),
                 "--no-progress"]) == 0
    out = capsys.readouterr().out
    assert "2.766 PFLOP per forward" in out and "agrees exactly" in out
    data = json.loads(js.read_text())
    assert data["complete"] and "ceilings" not in data and "configs" not in data


# ---------------------------------------------------------------------------------------------
# Side by side and out of memory
# ---------------------------------------------------------------------------------------------
class _FakeStep:
    forwards_per_step = 2

    def __init__(self, name, calls, fail_on=None):
        self.name, self.calls, self.fail_on = name, calls, fail_on

    def __call__(self, dit, i, latents, audio, condition, pos, neg):
        self.calls.append(self.name)
        if self.fail_on is not None and len([c for c in self.calls if c == self.name]) == self.fail_on:
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
        return latents + 1, audio + 1


def _fake_config(name, calls, fail_on=None):
    def prepare(shared, cfg, sched, cfg_scale, fps):
        m = torch.nn.Module()
        m.blocks = torch.nn.ModuleList()
        return bench_configs.Runner(m, m, torch.nn.Module(), _FakeStep(name, calls, fail_on))
    return bench_configs.RuntimeConfig(name, f"fake {name}", prepare)


def test_configurations_alternate_and_oom_is_a_result():
    cfg = preset_config("tiny")
    s = clip_shapes(cfg, *PRESET_SIZES["tiny"])
    calls, logs = [], []
    inputs = bench_step.make_inputs(cfg, s, torch.device("cpu"), 0)
    runs = bench_step.run_steps(
        cfg, s, torch.device("cpu"),
        [_fake_config("A", calls), _fake_config("B", calls, fail_on=3), _fake_config("C", calls)],
        warmup=1, steps=3, shared={}, inputs=inputs, cfg_scale=5.0, num_inference_steps=50,
        log=logs.append)
    # Round robin: one warm-up round, then timed rounds; B runs out of memory at its 3rd step
    # and drops out while A and C go on.
    assert calls == ["A", "B", "C", "A", "B", "C", "A", "B", "C", "A", "C"]
    a, b, c = runs
    assert a.status == c.status == "ok" and len(a.step_s) == len(c.step_s) == 3
    assert b.status == "oom" and "out of memory during timed step 2" in b.message
    assert len(b.step_s) == 1
    rows = bench_step.summarise(runs, flops_per_forward=1e9, ceilings={})
    assert rows[1]["status"] == "oom" and rows[1]["ratio_to_first"] == pytest.approx(
        rows[1]["step_s"]["median"] / rows[0]["step_s"]["median"])
    assert any("out of memory" in line for line in logs)


def test_weight_build_out_of_memory_is_reported(monkeypatch, tmp_path, capsys):
    def boom(*a, **k):
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 28.00 GiB")
    monkeypatch.setattr(bench_step, "build_shared_weights", boom)
    js = tmp_path / "o.json"       # in this process, where the monkeypatch reaches
    assert main(["bench", "--preset", "tiny", "--device", "cpu", "--json", str(js),
                 "--no-progress", "--same-process"]) == 0
    data = json.loads(js.read_text())
    assert data["build"]["status"] == "oom" and "estimate for one forward" in data["build"]["message"]
    assert data["configs"][0]["status"] == "oom"
    assert "chart skipped" in capsys.readouterr().out


# ---------------------------------------------------------------------------------------------
# Bad input
# ---------------------------------------------------------------------------------------------
def _cli(*args, cwd=None):
    return subprocess.run([sys.executable, "-m", "mova_rt", "bench", *args], capture_output=True,
                          text=True, timeout=120, cwd=cwd)


@pytest.mark.parametrize("args, needle", [
    (["--vram-budget", "12", "--device", "cpu"], "needs --device cuda"),
    (["--configs", "reference,warp9"], "unknown configuration(s) warp9"),
    (["--configs", "reference,reference"], "twice"),
    (["--height", "100"], "multiples of 16"),
    (["--device", "tpu"], "--device tpu"),
    (["--steps", "-1"], "0 or more"),
    (["--json", "blocker/x.json"], "blocker"),
    (["--json", "x.txt"], ".json"),
    (["--ckpt_path", "/nonexistent-ckpt"], "not a folder"),
    (["--render", "/nonexistent.json"], "no such results file"),
])
def test_bad_input_is_one_line(args, needle, tmp_path, monkeypatch, capsys):
    """In process (an uncaught exception would fail the test); the subprocess path is below."""
    (tmp_path / "blocker").write_text("a file where a folder would have to be")
    monkeypatch.chdir(tmp_path)
    rc = main(["bench", "--preset", "tiny", "--device", "cpu", *args])   # later flags win
    err = capsys.readouterr().err
    assert rc == 2, err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and needle in lines[0], err
    assert sorted(os.listdir(tmp_path)) == ["blocker"]


def test_cuda_without_a_gpu_is_refused(tmp_path):
    if torch.cuda.is_available():
        pytest.skip("a GPU is present")
    r = _cli("--preset", "tiny", "--device", "cuda", cwd=tmp_path)
    assert r.returncode == 2 and "CUDA is not available" in r.stderr
    assert len(r.stderr.strip().splitlines()) == 1 and not os.listdir(tmp_path)


def test_runs_with_only_the_gpu_machines_packages(tmp_path):
    """The GPU machine has torch, safetensors and transformers but no PyAV, Pillow, diffusers,
    ftfy or matplotlib (environment.md): the suite must run there, skipping what needs them."""
    js = tmp_path / "g.json"
    code = f"""
import sys
class Block:
    def find_spec(self, name, path=None, target=None):
        if name.split('.')[0] in ('av', 'PIL', 'diffusers', 'ftfy', 'matplotlib'):
            raise ImportError('blocked: not installed on the GPU machine: ' + name)
sys.meta_path.insert(0, Block())
from mova_rt.cli import main
sys.exit(main(['bench', '--preset', 'tiny', '--device', 'cpu', '--warmup', '0', '--steps', '1',
               '--ops', '--time-stages', '--json', {str(js)!r}, '--no-progress']))
"""
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    data = json.loads(js.read_text())
    assert data["configs"][0]["status"] == "ok"
    assert data["stages"]["vae_decode"]["status"] == "skipped"
    assert data["stages"]["text"]["status"] == "ok"
    assert "chart skipped: matplotlib is not installed" in r.stdout


def test_runtime_feature_configs_side_by_side(tmp_path):
    js = tmp_path / "f.json"
    assert main(["bench", "--preset", "tiny", "--device", "cpu", "--configs",
                 "reference,cfg-batch,cache,offload-group", "--warmup", "1", "--steps", "2",
                 "--json", str(js), "--no-progress", "--same-process"]) == 0
    rows = json.loads(js.read_text())["configs"]
    assert [r["name"] for r in rows] == ["reference", "cfg-batch", "cache", "offload-group"]
    assert all(r["status"] == "ok" and len(r["step_s"]["samples"]) == 2 for r in rows)
    assert [r["forwards_per_step"] for r in rows] == [2, 2, 2, 2]


def test_fp8_config_beside_reference(tmp_path):
    """fp8-cublas runs here; `fp8` (the Triton fp8 GEMMs) and `triton` are registered the same
    way and take minutes through the interpreter, so they are exercised in
    tests/test_quantize.py on one forward instead."""
    js = tmp_path / "fp8.json"
    assert main(["bench", "--preset", "tiny", "--device", "cpu", "--configs",
                 "reference,fp8-cublas", "--warmup", "0", "--steps", "1",
                 "--json", str(js), "--no-progress", "--same-process"]) == 0
    rows = json.loads(js.read_text())["configs"]
    assert [r["name"] for r in rows] == ["reference", "fp8-cublas"]
    assert "fp8" in bench_configs.CONFIGS
    assert all(r["status"] == "ok" for r in rows), [r.get("message") for r in rows]


def test_each_configuration_has_its_own_time_limit_and_a_crash_is_a_result(tmp_path,
                                                                           monkeypatch):
    """--config-timeout kills a configuration's process past its limit (0.5 s: less than a
    child needs to import torch) and reports it; a child that dies is reported as crashed; the
    run itself goes on and exits 0."""
    from mova_rt.benchmarks import isolate
    js = tmp_path / "t.json"
    assert main(["bench", "--preset", "tiny", "--device", "cpu", "--configs", "reference",
                 "--steps", "1", "--warmup", "0", "--config-timeout", "0.5", "--json", str(js),
                 "--no-progress"]) == 0
    row = json.loads(js.read_text())["configs"][0]
    assert row["status"] == "timeout" and "0.5 s" in row["message"]

    real = isolate.child_command
    monkeypatch.setattr(isolate, "child_command", lambda args, name, out, forward=None: (
        [sys.executable, "-c", "import os; os.abort()"] if name == "sdpa" else
        real(args, name, out, forward)))
    assert main(["bench", "--preset", "tiny", "--device", "cpu", "--configs", "sdpa,reference",
                 "--steps", "1", "--warmup", "0", "--json", str(js), "--no-progress"]) == 0
    crashed, ok = json.loads(js.read_text())["configs"]
    assert crashed["status"] == "crashed" and "signal 6" in crashed["message"]
    assert ok["status"] == "ok" and ok["ratio_to_first"] is None     # no first time to compare


@pytest.mark.parametrize("mode", [[], ["--same-process"]])
def test_forward_error_against_the_first_configuration(tmp_path, mode):
    """--forward-error: one forward of each configuration on the same weights and inputs (in its
    own process: the same seed gives the same weights), its error against the first's per
    tower: 0 for the first, 0 for sdpa on the CPU tiny model (float32 RoPE agrees here), and
    an fp8 configuration's within its tiny-model bound."""
    js = tmp_path / "e.json"
    assert main(["bench", "--preset", "tiny", "--device", "cpu", "--configs",
                 "reference,sdpa,fp8-cublas", "--steps", "1", "--warmup", "0",
                 "--forward-error", "--json", str(js), "--no-progress", *mode]) == 0
    rows = {r["name"]: r["forward_error_vs_first"] for r in json.loads(js.read_text())["configs"]}
    assert rows["reference"] == {"video": 0.0, "audio": 0.0}
    assert rows["sdpa"]["video"] < 1e-2 and rows["sdpa"]["audio"] < 1e-2
    assert 0 < rows["fp8-cublas"]["video"] < 0.08 and 0 < rows["fp8-cublas"]["audio"] < 0.08
