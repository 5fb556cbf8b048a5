"""Which fp8 GEMM runs each Linear shape (issue 5, item 3): mova-rt's Triton kernel (fused
epilogues) or torch._scaled_mm (cuBLASLt), picked per (N, K) on a GPU kind from committed
benchmark results.

The table is built from `mova-rt bench --ops` result files (their `linear.*` rows, backends
`fp8-triton` and `fp8-scaled_mm`) by `build`, and written by

    python -m mova_rt.fp8.dispatch benchmarks/results/<run>.json [...] --out mova_rt/data/fp8_dispatch.json

Format `mova-rt-fp8-dispatch/1`: {"format", "sources": [{"file", "commit", "device_name"}],
"entries": [{"device_name", "m", "n", "k", "pick", "ms": {backend: median}}]}. A shape is picked
for the backend with the lower median time; the Triton kernel also keeps the block's fused
producers and epilogues (mova_rt/fp8/block.py), so its time in the model is lower than in the
isolated row, and it wins ties.

`pick(n, k, device_name)` answers from the entry of that GPU name with that (N, K) (the largest
measured M when several); shapes or GPUs without a measurement get DEFAULT, and `coverage`
says how many of a model's shapes were measured.
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import re
import sys

FORMAT = "mova-rt-fp8-dispatch/1"
DEFAULT = "triton"
BACKENDS = {"fp8-triton": "triton", "fp8-scaled_mm": "scaled_mm"}
TABLE = os.path.join(os.path.dirname(os.path.dirname(__file__)), "data", "fp8_dispatch.json")
_SHAPE = re.compile(r"^\[(\d+), (\d+)\] x \[(\d+), (\d+)\]")


def build(results: list[tuple[str, dict]]) -> dict:
    """The table from (file name, bench result dict) pairs. Raises ValueError for a file without
    fp8 GEMM rows (not an --ops run on a GPU)."""
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
                    row.get("status") != "ok":
                continue
            m, k, _, n = (int(g) for g in shape.groups())
            times.setdefault((gpu, m, n, k), {})[row["backend"]] = row["median_ms"]
        rows = 0
        for key, ms in times.items():
            measured = {b: ms[b] for b in BACKENDS if b in ms}
            if len(measured) < len(BACKENDS):
                continue
            pick = min(measured, key=lambda b: (measured[b], b != "fp8-triton"))
            best[key] = {"device_name": key[0], "m": key[1], "n": key[2], "k": key[3],
                         "pick": BACKENDS[pick], "ms": ms}
            rows += 1
        if not rows:
            raise ValueError(f"{name} has no linear.* rows with both fp8 backends: run "
                             "mova-rt bench --ops on a GPU")
        sources.append({"file": os.path.basename(name), "commit": env.get("commit"),
                        "device_name": gpu})
    return {"format": FORMAT, "sources": sources,
            "entries": sorted(best.values(), key=lambda e: (e["device_name"], e["n"], e["k"],
                                                            e["m"]))}


@functools.lru_cache(maxsize=None)
def _entries(path: str) -> dict:
    """{(device_name, n, k): pick} of the table at `path` (empty when there is none)."""
    if not os.path.exists(path):
        return {}
    with open(path, encoding="utf-8") as fh:
        table = json.load(fh)
    if table.get("format") != FORMAT:
        raise ValueError(f"{path} is not a {FORMAT} table")
    out = {}
    for e in sorted(table["entries"], key=lambda e: e["m"]):      # the largest M wins
        out[(e["device_name"], e["n"], e["k"])] = e["pick"]
    return out


def pick(n: int, k: int, device_name: str | None, path: str | None = None) -> str:
    """The GEMMS backend for an [N, K] weight on GPU `device_name` (None: no GPU); path: the
    table (None: the package's)."""
    return _entries(path or TABLE).get((device_name, n, k), DEFAULT)


def coverage(shapes: list, device_name: str | None, path: str | None = None) -> tuple[int, int]:
    """(measured, total) of the distinct (N, K) in `shapes` on that GPU."""
    distinct = set(shapes)
    known = _entries(path or TABLE)
    return sum((device_name, n, k) in known for n, k in distinct), len(distinct)


def device_name(device) -> str | None:
    import torch
    dev = torch.device(device)
    return torch.cuda.get_device_name(dev) if dev.type == "cuda" else None


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m mova_rt.fp8.dispatch",
                                 description="Build the fp8 GEMM dispatch table from bench results")
    ap.add_argument("results", nargs="+", help="mova-rt bench --ops JSON files (GPU runs)")
    ap.add_argument("--out", default=TABLE)
    args = ap.parse_args(argv)
    try:
        loaded = []
        for name in args.results:
            with open(name, encoding="utf-8") as fh:
                loaded.append((name, json.load(fh)))
        table = build(loaded)
    except (OSError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    tmp = args.out + ".tmp"
    with open(tmp, "w", encoding="utf-8") as fh:
        json.dump(table, fh, indent=1)
    os.replace(tmp, args.out)
    print(f"wrote {args.out}: {len(table['entries'])} shapes from {len(table['sources'])} files")
    return 0


if __name__ == "__main__":
    sys.exit(main())
