"""The summary of `benchmarks/device_check.sh`: every part's status, the step table (each
configuration's median step time with its spread, ratio to reference, peak memory, per-forward
error against reference per tower), the GPU tests, and the issues' targets, each met, missed or
not measured. Writes OUTDIR/summary.json and OUTDIR/summary.md and prints the markdown.

    python -m mova_rt.benchmarks.device_summary OUTDIR --work WORKDIR --preset mova-360p

Reads what device_check.sh left: OUTDIR/{steps,compile,offload,attn8,ops}.json and, in WORKDIR,
parts.jsonl, gpu_tests.xml, kernel_table.json and fp8_dispatch.json (the tables this run's op
measurements build; a GPU session commits them to mova_rt/data/ when they should change what
`auto` and the fp8 path run).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import xml.etree.ElementTree as ET

SCHEMA = "mova-rt-device-check/1"
ORIGINAL_S_PER_STEP = 9.845        # OpenMOSS/MOVA as released, same H200, 360p (performance.md)
GIB_TARGETS = {"auto": 40.0, "fp8": 26.0}


def _load(path: str):
    try:
        with open(path, encoding="utf-8") as fh:
            return json.load(fh)
    except (OSError, ValueError):
        return None


def _parts(work: str) -> list:
    rows = []
    try:
        with open(os.path.join(work, "parts.jsonl"), encoding="utf-8") as fh:
            for line in fh:
                if line.strip():
                    rows.append(json.loads(line))
    except (OSError, ValueError):
        pass
    return rows


def _tests(work: str) -> dict | None:
    try:
        root = ET.parse(os.path.join(work, "gpu_tests.xml")).getroot()
    except (OSError, ET.ParseError):
        return None
    suite = root if root.tag == "testsuite" else root.find("testsuite")
    out = {k: int(suite.get(k, 0)) for k in ("tests", "failures", "errors", "skipped")}
    out["failed"] = [f"{c.get('name')}: {(c.find('failure') if c.find('failure') is not None else c.find('error')).get('message', '')[:200]}"
                     for c in suite.iter("testcase")
                     if c.find("failure") is not None or c.find("error") is not None]
    return out


def _configs(out: str) -> list:
    rows = []
    for name in ("steps", "compile", "offload", "attn8"):
        data = _load(os.path.join(out, f"{name}.json"))
        for r in (data or {}).get("configs", []):
            rows.append(dict(r, file=f"{name}.json"))
    return rows


def _row(rows: list, name: str) -> dict | None:
    return next((r for r in rows if r.get("name") == name), None)


def _median(r):
    return r["step_s"]["median"] if r and r.get("step_s") else None


def _target(what: str, goal: str, measured, ok) -> dict:
    status = "not measured" if measured is None else ("met" if ok else "missed")
    return {"what": what, "goal": goal, "measured": measured, "status": status}


def applicable(preset: str, env: dict) -> bool:
    """The targets are for 360p on a Hopper GPU; a smoke run reports them as not applicable."""
    return preset == "mova-360p" and env.get("device_type") == "cuda"


def targets(rows: list, tables: dict, ops: dict | None = None) -> list:
    """The targets of issues 16 and 17 (360p on an H100 / H200)."""
    auto, fp8, ref = _row(rows, "auto"), _row(rows, "fp8"), _row(rows, "reference")
    off = _row(rows, "offload-group")
    t = []
    a = _median(auto)
    t.append(_target("auto s/step", f"<= 9.0 (stretch 8.0; the original {ORIGINAL_S_PER_STEP})",
                     a and round(a, 3), a is not None and a <= 9.0))
    for name, row in (("auto", auto), ("fp8", fp8)):
        peak = row.get("peak_vram_allocated_gib") if row and row.get("step_s") else None
        t.append(_target(f"{name} peak allocated GiB", f"<= {GIB_TARGETS[name]:g}",
                         peak and round(peak, 2), peak is not None and peak <= GIB_TARGETS[name]))
    o = _median(off)
    ratio = o / a if o and a else None
    t.append(_target("offload-group (24 GiB budget) / auto", "<= 1.15",
                     ratio and round(ratio, 3), ratio is not None and ratio <= 1.15))
    f = _median(fp8)
    t.append(_target("fp8 s/step", "<= 6.0 (stretch 4.5)", f and round(f, 3),
                     f is not None and f <= 6.0))
    err = (fp8 or {}).get("forward_error_vs_first")
    worst = max(err.values()) if err and ref and rows.index(ref) == 0 else None
    t.append(_target("fp8 per-forward error vs bf16 reference (worst tower)", "<= 0.03",
                     worst and round(worst, 4), worst is not None and worst <= 0.03))
    a8 = _row(rows, "fp8-attn8")
    err8 = (a8 or {}).get("forward_error_vs_first")
    worst8 = max(err8.values()) if err8 else None
    t.append(_target("fp8-attn8 per-forward error vs bf16 reference (worst tower)", "<= 0.03",
                     worst8 and round(worst8, 4), worst8 is not None and worst8 <= 0.03))
    times = {r["backend"]: r["median_ms"] for r in (ops or {}).get("ops", [])
             if r.get("op") == "attention.video_self" and r.get("status") == "ok"}
    cudnn = times.get("sdpa-priority") or times.get("sdpa-cudnn") or times.get("sdpa")
    for name in ("fp8", "cudnn-fp8", "triton"):
        mine = times.get(name)
        goal = "<= 1.0 (faster than cuDNN bf16)"
        t.append(_target(f"video self-attention {name} / cuDNN bf16 (ms ratio)", goal,
                         mine and cudnn and round(mine / cudnn, 3),
                         bool(mine and cudnn) and mine <= cudnn))
    slower = _auto_slower_than_library(tables.get("kernel_table"))
    t.append(_target("kernels auto picks slower than the library op (this run)", "none",
                     slower, slower is not None and not slower))
    fp8_slower = _fp8_slower(tables.get("fp8_dispatch"))
    t.append(_target("fp8 GEMMs in the fp8 path slower than bf16 (this run)", "none",
                     fp8_slower, fp8_slower is not None and not fp8_slower))
    return t


def _auto_slower_than_library(table: dict | None):
    if not table:
        return None
    from mova_rt.autoselect import OURS
    out = []
    for e in table["entries"]:
        lib = [v for k, v in e["ms"].items() if k not in OURS]
        if lib and e["ms"][e["pick"]] > min(lib) * 1.03:
            out.append(f"{e['kind']}: {e['pick']}")
    return out


def _fp8_slower(table: dict | None):
    if not table:
        return None
    return [f"[{e['n']}, {e['k']}] {e['rows']}" for e in table["entries"]
            if e["pick"] == "scaled_mm" and e["ms"]["scaled_mm"] > e["ms"]["bf16"]]


def markdown(s: dict) -> str:
    lines = [f"# device check: {s['device']} ({s['preset']}), commit {s['commit']}", ""]
    lines += ["| part | status | seconds | limit |", "|---|---|---|---|"]
    lines += [f"| {p['part']} | {p['status']} | {p['seconds']} | {p['limit']} |"
              for p in s["parts"]]
    tests = s["gpu_tests"]
    lines += ["", "GPU tests: " + ("no result" if tests is None else
                                   f"{tests['tests']} run, {tests['failures'] + tests['errors']} "
                                   f"failed, {tests['skipped']} skipped")]
    for f in (tests or {}).get("failed", []):
        lines.append(f"- FAILED {f}")
    lines += ["", "| config | s/step median [min-max] | x reference | TFLOP/s | peak alloc GiB "
                  "| peak RSS GiB | error vs reference video/audio | status |",
              "|---|---|---|---|---|---|---|---|"]
    ref = _median(_row(s["configs"], "reference"))
    for r in s["configs"]:
        m = _median(r)
        err = r.get("forward_error_vs_first")
        lines.append(
            f"| {r['name']} | " + (f"{m:.3f} [{r['step_s']['min']:.3f}-{r['step_s']['max']:.3f}]"
                                   if m else "-") +
            (f" | {m / ref:.3f}" if m and ref else " | -") +
            (f" | {r['tflops']:.0f}" if m else " | -") +
            (f" | {r['peak_vram_allocated_gib']:.2f} | {r.get('peak_rss_process_gib', r.get('peak_rss_gib', 0)):.2f}"
             if m else " | - | -") +
            (f" | {err['video']:.4f} / {err['audio']:.4f}" if err else " | -") +
            f" | {r['status']}" + (f": {r['message']}" if r.get("message") else "") + " |")
    lines += ["", "| target | goal | measured | status |", "|---|---|---|---|"]
    lines += [f"| {t['what']} | {t['goal']} | {t['measured']} | {t['status']} |"
              for t in s["targets"]]
    if s["preset"] != "mova-360p":
        lines += ["", "(targets are for mova-360p on an H100 / H200: this run is a smoke test)"]
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m mova_rt.benchmarks.device_summary")
    ap.add_argument("out")
    ap.add_argument("--work", default=None)
    ap.add_argument("--preset", default="mova-360p")
    args = ap.parse_args(argv)
    work = args.work or args.out
    steps = _load(os.path.join(args.out, "steps.json")) or {}
    env = steps.get("environment") or (_load(os.path.join(args.out, "ops.json")) or {}).get(
        "environment", {})
    tables = {k: _load(os.path.join(work, f"{k}.json")) for k in ("kernel_table", "fp8_dispatch")}
    rows = _configs(args.out)
    s = {"schema": SCHEMA, "preset": args.preset,
         "device": env.get("device_name", "unknown"), "commit": env.get("commit", "unknown"),
         "parts": _parts(work), "gpu_tests": _tests(work), "configs": rows,
         "ceilings": steps.get("ceilings"),
         "targets": [dict(t, status="not applicable") if not applicable(args.preset, env)
                     else t for t in targets(rows, tables,
                                             _load(os.path.join(args.out, "ops.json")))],
         "tables": tables}
    with open(os.path.join(args.out, "summary.json"), "w", encoding="utf-8") as fh:
        json.dump(s, fh, indent=1)
    text = markdown(s)
    with open(os.path.join(args.out, "summary.md"), "w", encoding="utf-8") as fh:
        fh.write(text)
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
