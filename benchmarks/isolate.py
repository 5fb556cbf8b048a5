"""One process per configuration: the default of the step benchmark.

The first GPU run measured four configurations in one process: the first one's weights, caches
and allocator blocks counted against the others, two of them ran out of memory beside it, and
one that hung took the rest of the run with it. So by default every configuration of
`--configs` runs in a child process of its own (`mova-rt bench ... --configs NAME` with the
hidden flag `--child-of`), which builds its own copy of the same weights (the same seed: the same
values), takes its steps and writes its row; the parent gathers the rows, computes TFLOP/s and
ratios to the first configuration, and reports each one's peak memory (allocator peak, device-wide
peak, host RSS: its own process's, nothing else's).

`--config-timeout S` bounds each child: a child past it is killed (its whole process group) and
reported with status "timeout" and the steps it had finished (the child rewrites its row after
every step). A child that dies (a CUDA abort, a signal) is reported as "crashed" with its exit
status; either way the other configurations still run. `--same-process` keeps the older mode (all
configurations side by side in one process, steps alternating), which shares the weights.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import tempfile
import time

# flags of the parent forwarded to every child unchanged (argparse dest -> flag)
_FORWARDED = {"preset": "--preset", "ckpt_path": "--ckpt_path", "height": "--height",
              "width": "--width", "num_frames": "--num_frames", "fps": "--fps",
              "warmup": "--warmup", "steps": "--steps",
              "num_inference_steps": "--num_inference_steps", "cfg_scale": "--cfg_scale",
              "vram_budget": "--vram-budget", "device": "--device", "engine": "--engine",
              "seed": "--seed"}


def child_command(args, name: str, out_json: str, forward: str | None = None) -> list:
    cmd = [sys.executable, "-m", "mova_rt", "bench", "--configs", name, "--json", out_json,
           "--child-of", str(os.getpid())]
    if forward:
        cmd += ["--save-forward", forward]
    for dest, flag in _FORWARDED.items():
        value = getattr(args, dest, None)
        if value is not None:
            cmd += [flag, str(value)]
    if not args.progress:
        cmd.append("--no-progress")
    return cmd


def _run_child(cmd: list, timeout: float | None) -> tuple[str, str, float]:
    """(status, message, seconds): ok, timeout or crashed. The child leads its own process group,
    so a timeout kills whatever it started too."""
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, start_new_session=True)
    try:
        rc = proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
        return "timeout", f"killed after its time limit of {timeout:g} s", time.perf_counter() - t0
    except BaseException:                  # interrupted: take the child down with us
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
        raise
    seconds = time.perf_counter() - t0
    if rc == 0:
        return "ok", "", seconds
    how = f"killed by signal {-rc}" if rc < 0 else f"exited with code {rc}"
    return "crashed", f"its process {how}", seconds


def _read_row(path: str) -> tuple[dict | None, dict | None]:
    """(row, build) of a child's results file, (None, None) when it wrote none (yet)."""
    try:
        with open(path, encoding="utf-8") as fh:
            data = json.load(fh)
    except (OSError, ValueError):
        return None, None
    rows = data.get("configs") or [None]
    return rows[0], data.get("build")


def run_isolated(args, configs: list, log, forwards: dict | None = None) -> tuple[list[dict],
                                                                                 dict]:
    """Each configuration in its own process; returns (rows, builds by configuration).
    forwards: name -> where the child saves its forward (--forward-error), or None."""
    rows, builds = [], {}
    with tempfile.TemporaryDirectory(prefix="mova-bench-") as tmp:
        for rc in configs:
            out = os.path.join(tmp, f"{rc.name}.json")
            log(f"{rc.name}: own process" + (f", limit {args.config_timeout:g} s"
                                             if args.config_timeout else ""))
            cmd = child_command(args, rc.name, out, (forwards or {}).get(rc.name))
            status, message, seconds = _run_child(cmd, args.config_timeout)
            row, build = _read_row(out)
            if row is None:
                row = {"name": rc.name, "description": rc.description, "status": status,
                       "message": message or "it wrote no result"}
            elif status != "ok":
                row["status"] = status
                row["message"] = "; ".join(m for m in (message, row.get("message")) if m)
            row["process_s"] = seconds
            rows.append(row)
            builds[rc.name] = build
            log(f"{rc.name}: {row['status']}" + (f" ({row['message']})" if row.get("message")
                                                 else ""))
    return rows, builds


def finish_rows(rows: list[dict], flops_per_forward: float, ceilings: dict) -> list[dict]:
    """TFLOP/s, fraction of the matmul ceiling and ratio to the first configuration, computed
    in the parent from the rows the children wrote (ratios: None without a first time)."""
    first = rows[0].get("step_s", {}).get("median") if rows else None
    matmul = ceilings.get("matmul", {}).get("value")
    for row in rows:
        s = row.get("step_s")
        if not s:
            continue
        row["tflops"] = row["forwards_per_step"] * flops_per_forward / s["median"] / 1e12
        row["fraction_of_matmul_ceiling"] = row["tflops"] / matmul if matmul else None
        row["ratio_to_first"] = s["median"] / first if first else None
    return rows
