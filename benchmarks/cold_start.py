"""Cold start (`mova-rt bench --cold-start`): from process start to the first denoising step, and
the first steps, with and without an engine.

Each mode runs in a fresh Python process, started here (the clock starts just before the spawn):
imports, `MovaPipeline.from_pretrained` (weights read), text encoding and the conditioning VAE
encode, then `--cold-steps` denoising steps timed by the pipeline's step callback. Modes:
- eager: the reference kernels, nothing compiled;
- triton: mova-rt's Triton kernels (compiled and autotuned at their first call; CUDA only);
- inductor-jit: every block and bridge layer under torch.compile (compiled at the first step);
- engine: `--engine DIR`, the units compiled ahead of time (`mova-rt build`).
The weights bound: the checkpoint's bytes over the disk read bandwidth, measured here by reading
the weight files once (after dropping the page cache when this process may; the JSON says whether
it could: without it, a second read comes from memory and the bound is the memory copy's).
"""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
import time

MODES = ("eager", "triton", "inductor-jit", "engine")
MARK = "MOVA_RT_COLD_START "


def drop_page_cache() -> bool:
    """Asks the kernel to drop clean page-cache pages (root only); True when it did."""
    try:
        os.sync()
        with open("/proc/sys/vm/drop_caches", "w") as fh:
            fh.write("3\n")
        return True
    except OSError:
        return False


def weight_files(ckpt: str) -> list:
    out = []
    for root, _, files in os.walk(ckpt):
        out += [os.path.join(root, f) for f in sorted(files) if f.endswith(".safetensors")]
    return out


def disk_read(ckpt: str) -> dict:
    """Sequential read of every weight file of the checkpoint (what a start must read)."""
    dropped = drop_page_cache()
    files = weight_files(ckpt)
    total, t0 = 0, time.perf_counter()
    buf = bytearray(64 << 20)
    for path in files:
        with open(path, "rb", buffering=0) as fh:
            while True:
                n = fh.readinto(buf)
                if not n:
                    break
                total += n
    dt = time.perf_counter() - t0
    return {"bytes": total, "seconds": dt, "gb_per_s": total / dt / 1e9 if dt > 0 else None,
            "page_cache_dropped": dropped, "files": len(files)}


# ---------------------------------------------------------------------------------------------
def child(spec: dict) -> dict:
    """One mode, in this (fresh) process: times since the parent's spawn clock."""
    import torch

    from mova_rt.pipeline import MovaPipeline
    t_imported = time.time()
    device = torch.device(spec["device"])
    pipe = MovaPipeline.from_pretrained(
        spec["ckpt"], device=device, dtype="bf16",
        kernels=None if spec["mode"] == "engine" else spec["kernels"],
        precision=None if spec["mode"] == "engine" else spec["precision"],
        engine=spec.get("engine") if spec["mode"] == "engine" else None)
    if spec["mode"] == "inductor-jit":
        from mova_rt.regional import compile_layers
        for dit in (pipe.video_dit, pipe.video_dit_2):
            compile_layers(dit, pipe.audio_dit, pipe.bridge, device, autotune=True)
    t_loaded = time.time()
    marks = []
    out = pipe("A dog barks at a passing train.", height=spec["height"], width=spec["width"],
               num_frames=spec["num_frames"], fps=spec["fps"],
               num_inference_steps=spec["steps"], progress=False, decode=False,
               step_callback=lambda i: marks.append(time.time()))
    peak = torch.cuda.max_memory_allocated(device) if device.type == "cuda" else 0
    return {"t_imported": t_imported, "t_loaded": t_loaded, "load_s": pipe.load_seconds,
            "marks": marks, "timings": out.timings, "peak_vram_bytes": peak}


def run_mode(spec: dict, timeout: float) -> dict:
    drop_page_cache()
    t0 = time.time()
    proc = subprocess.run([sys.executable, "-m", "mova_rt.benchmarks.cold_start",
                           json.dumps(spec)], capture_output=True, text=True, timeout=timeout,
                          env=dict(os.environ, PYTHONWARNINGS="ignore"))
    lines = [line for line in proc.stdout.splitlines() if line.startswith(MARK)]
    row = {"mode": spec["mode"]}
    if proc.returncode != 0 or not lines:
        err = [line for line in proc.stderr.strip().splitlines() if line.strip()]
        row.update(status="failed", message=(err[-1] if err else f"exit {proc.returncode}")[:300])
        return row
    r = json.loads(lines[-1][len(MARK):])
    marks = r["marks"]
    steps = [b - a for a, b in zip(marks, marks[1:])]
    row.update(status="ok", process_to_first_step_s=marks[0] - t0,
               import_s=r["t_imported"] - t0, load_s=r["load_s"],
               text_and_vae_s=r["timings"].get("text", 0) + r["timings"].get("vae_encode", 0),
               first_step_s=steps[0], later_steps_s=steps[1:],
               later_step_median_s=statistics.median(steps[1:]) if len(steps) > 1 else None,
               peak_vram_gib=r["peak_vram_bytes"] / 1024 ** 3)
    return row


def run_cold_start(ckpt: str, engine: str | None, shapes, device, steps: int, kernels_ok: bool,
                   log, timeout: float = 1800.0) -> dict:
    """The cold-start table: every mode that applies on this machine."""
    precision = "bf16"
    if engine:
        from mova_rt.engine import open_engine
        precision = open_engine(engine).precision
    read = disk_read(ckpt)
    log(f"cold start: checkpoint {read['bytes'] / 1e9:.2f} GB read in {read['seconds']:.2f} s "
        f"({read['gb_per_s']:.2f} GB/s, page cache {'dropped' if read['page_cache_dropped'] else 'not dropped: no permission'})")
    rows = []
    for mode in MODES:
        if mode == "triton" and not kernels_ok:
            continue
        if mode == "engine" and not engine:
            continue
        spec = {"mode": mode, "ckpt": ckpt, "engine": engine, "device": str(device),
                "kernels": "triton" if mode == "triton" else "reference",
                "precision": precision, "height": shapes.height, "width": shapes.width,
                "num_frames": shapes.num_frames, "fps": shapes.fps, "steps": steps}
        log(f"cold start: {mode}")
        try:
            row = run_mode(spec, timeout)
        except subprocess.TimeoutExpired:
            row = {"mode": mode, "status": "timeout", "message": f"over {timeout:.0f} s"}
        if row["status"] == "ok":
            log(f"cold start: {mode}: first step at {row['process_to_first_step_s']:.2f} s, "
                f"first step {row['first_step_s']:.2f} s")
        else:
            log(f"cold start: {mode}: {row['status']}: {row.get('message')}")
        rows.append(row)
    bound = read["seconds"] if read["gb_per_s"] else None
    return {"steps": steps, "precision": precision, "disk_read": read,
            "weights_read_bound_s": bound, "modes": rows}


if __name__ == "__main__":
    result = child(json.loads(sys.argv[1]))
    print(MARK + json.dumps(result), flush=True)
