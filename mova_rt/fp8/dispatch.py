"""Which GEMM runs each quantizable Linear on the fp8 path: torch._scaled_mm (cuBLASLt e4m3,
row-wise scales, bias epilogue) or the layer left in bf16 (cuBLAS), per (N, K) and kind of rows
on a GPU model, from committed GPU measurements.

The first H200 run (benchmarks/results/2026-11-30_nvidia-h200_mova-360p_ops.json) measured, at
360p: e4m3 `_scaled_mm` 1.15-1.5x faster than bf16 on the video-row GEMMs (43,120 rows), and 2-3x
slower on the 403-row audio and bridge GEMMs, where launch and quantization costs dominate; and
mova-rt's Triton fp8 GEMM no faster than bf16 on any shape, so it was removed. Hence "bf16" is a
choice here: such layers stay nn.Linear.

Rows: a layer's input rows are video tokens (the video DiTs; the bridge's a2v q/o and v2a k/v) or
audio tokens (the audio DiT; a2v k/v, v2a q/o): `rows_of`. Unmeasured shapes: video rows take
`scaled_mm`, audio rows `bf16` (what the measured ones chose).

The table (mova_rt/data/fp8_dispatch.json, format `mova-rt-fp8-dispatch/2`) is built from the
`linear.*` rows (backends `torch` and `fp8-scaled_mm`) of `mova-rt bench --ops` results by

    python -m mova_rt.fp8.dispatch benchmarks/results/<run>_ops.json [...] --out mova_rt/data/fp8_dispatch.json
"""

from __future__ import annotations

import functools
import json
import os
import re
import sys

FORMAT = "mova-rt-fp8-dispatch/2"
BACKENDS = {"torch": "bf16", "fp8-scaled_mm": "scaled_mm"}
DEFAULT = {"video": "scaled_mm", "audio": "bf16"}
VIDEO_ROWS = 4096          # a GEMM with at least this many rows was measured on video tokens
TABLE = os.path.join(os.path.dirname(os.path.dirname(__file__)), "data", "fp8_dispatch.json")
_SHAPE = re.compile(r"^\[(\d+), (\d+)\] x \[(\d+), (\d+)\]")
_AUDIO_ROWS = re.compile(r"^(audio_to_video_conditioners\.\d+\.inner\.(k|v)|"
                         r"video_to_audio_conditioners\.\d+\.inner\.(q|o))$")


def rows_of(component: str, layer: str) -> str:
    """"video" or "audio": the tokens a quantizable layer's input rows are."""
    if component == "audio_dit":
        return "audio"
    if component == "dual_tower_bridge" and _AUDIO_ROWS.match(layer):
        return "audio"
    return "video"


def build(results: list[tuple[str, dict]]) -> dict:
    """The table from (file name, bench result dict) pairs. Raises ValueError for a file without
    both GEMM backends (not an --ops run on a GPU)."""
    best: dict[tuple, dict] = {}
    sources = []
    for name, data in results:
        env = data.get("environment", {})
        if env.get("device_type") != "cuda":
            raise ValueError(f"{name} was measured on {env.get('device_type')}, not a GPU")
        gpu = env.get("device_name")
        times: dict[tuple, dict] = {}
        for row in data.get("ops", []):
            shape = _SHAPE.match(row.get("shape", ""))
            if not row.get("op", "").startswith("linear.") or shape is None or \
                    row.get("status") != "ok" or row.get("backend") not in BACKENDS:
                continue
            m, k, _, n = (int(g) for g in shape.groups())
            rows = "video" if m >= VIDEO_ROWS else "audio"
            times.setdefault((gpu, n, k, rows), {"m": m, "ms": {}})["ms"][
                BACKENDS[row["backend"]]] = row["median_ms"]
        found = 0
        for (g, n, k, rows), t in times.items():
            if len(t["ms"]) == len(BACKENDS):
                best[(g, n, k, rows)] = {"device_name": g, "sm": env.get("sm"), "n": n, "k": k,
                                         "rows": rows, "m": t["m"], "ms": t["ms"],
                                         "pick": min(t["ms"], key=t["ms"].get)}
                found += 1
        if not found:
            raise ValueError(f"{name} has no linear.* rows with both bf16 and fp8-scaled_mm: "
                             "run mova-rt bench --ops on a GPU")
        sources.append({"file": os.path.basename(name), "commit": env.get("commit"),
                        "device_name": gpu})
    return {"format": FORMAT, "sources": sources,
            "entries": sorted(best.values(), key=lambda e: (e["device_name"], e["rows"], e["n"],
                                                            e["k"]))}


@functools.lru_cache(maxsize=None)
def _entries(path: str) -> tuple:
    """({(device_name, n, k, rows): pick}, {(sm, n, k, rows): pick}) of the table at `path`."""
    if not os.path.exists(path):
        return {}, {}
    with open(path, encoding="utf-8") as fh:
        table = json.load(fh)
    if table.get("format") != FORMAT:
        raise ValueError(f"{path} is not a {FORMAT} table")
    by_name, by_sm = {}, {}
    for e in table["entries"]:
        by_name[(e["device_name"], e["n"], e["k"], e["rows"])] = e["pick"]
        by_sm.setdefault((e["sm"], e["n"], e["k"], e["rows"]), e["pick"])
    return by_name, by_sm


def pick(n: int, k: int, rows: str, gpu: tuple | None, path: str | None = None) -> str:
    """"scaled_mm" or "bf16" for an [N, K] weight on `rows` tokens on `gpu` = (name, sm) (None:
    no GPU, the defaults); measured on that GPU model first, else on its compute capability."""
    if gpu is not None:
        by_name, by_sm = _entries(path or TABLE)
        key = (n, k, rows)
        got = by_name.get((gpu[0], *key)) or by_sm.get((gpu[1], *key))
        if got:
            return got
    return DEFAULT[rows]


def device_name(device) -> tuple | None:
    """(name, sm) of a CUDA device, None otherwise."""
    import torch
    dev = torch.device(device)
    if dev.type != "cuda":
        return None
    p = torch.cuda.get_device_properties(dev)
    return p.name, f"sm_{p.major}{p.minor}"


def main(argv=None) -> int:
    from ..measured import table_main
    return table_main(argv, "python -m mova_rt.fp8.dispatch",
                      "Build the fp8 GEMM dispatch table from bench results",
                      build, TABLE,
                      lambda e: f"{e['device_name']}: [{e['n']}, {e['k']}] on {e['m']} "
                                f"{e['rows']} rows -> {e['pick']} ({e['ms']})")


if __name__ == "__main__":
    sys.exit(main())
