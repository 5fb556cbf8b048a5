"""benchmarks/device_check.sh in its CPU smoke mode (--preset tiny --device cpu): every part runs
(the GPU tests skip without a GPU), each in its own process under its own limit, and the summary
holds every part, every configuration and the targets, so the script the next GPU session runs
first cannot rot. A part cut off by the budget reports itself and the rest still run."""
import json
import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT = os.path.join(ROOT, "benchmarks", "device_check.sh")


def _run(out, budget):
    env = dict(os.environ, PYTHON=sys.executable, MOVA_CHECK_BUDGET=str(budget))
    env.pop("TRITON_INTERPRET", None)       # as on the GPU machine: the script sets what it needs
    return subprocess.run(["bash", SCRIPT, str(out), "--preset", "tiny", "--device", "cpu"],
                          env=env, capture_output=True, text=True, timeout=budget + 120)


def test_smoke_run_on_the_cpu(tmp_path):
    r = _run(tmp_path / "out", 900)
    assert r.returncode == 0, r.stderr[-2000:]
    out = tmp_path / "out"
    assert sorted(os.listdir(out)) == ["attn8.json", "compile.json", "log.txt", "offload.json",
                                       "ops.json", "steps.json", "summary.json", "summary.md"]
    s = json.loads((out / "summary.json").read_text())
    parts = {p["part"]: p["status"] for p in s["parts"]}
    assert parts == {"gpu_tests": "ok", "steps": "ok", "ops": "ok", "compile": "ok",
                     "offload": "ok", "attn8": "ok"}, parts
    assert s["gpu_tests"]["tests"] == s["gpu_tests"]["skipped"] > 0      # no GPU here
    rows = {r["name"]: r for r in s["configs"]}
    assert list(rows) == ["reference", "auto", "fp8", "compile", "offload-group", "fp8-attn8",
                          "fp8-cudnnattn"]
    assert rows.pop("fp8-cudnnattn")["status"] == "unavailable"       # no GPU, no cuDNN frontend
    assert all(r["status"] == "ok" and r["step_s"]["median"] > 0 for r in rows.values())
    assert rows["reference"]["forward_error_vs_first"] == {"video": 0.0, "audio": 0.0}
    assert 0 < rows["fp8"]["forward_error_vs_first"]["video"] < 0.08
    assert 0 < rows["fp8-attn8"]["forward_error_vs_first"]["video"] < 0.15
    assert len(s["targets"]) == 12 and {t["status"] for t in s["targets"]} == {"not applicable"}
    assert "| auto |" in (out / "summary.md").read_text() and "| auto |" in r.stdout


def test_a_part_out_of_budget_is_reported_and_the_rest_still_summarised(tmp_path):
    """A 30-second budget: the first parts run (or are cut off), the later ones are skipped for
    want of time, and the summary is still written."""
    r = _run(tmp_path / "out", 30)
    assert r.returncode == 0, r.stderr[-2000:]
    s = json.loads((tmp_path / "out" / "summary.json").read_text())
    statuses = {p["part"]: p["status"] for p in s["parts"]}
    assert statuses["attn8"] == "skipped" and statuses["compile"] == "skipped"
    assert set(statuses.values()) <= {"ok", "timeout", "skipped"}
