"""`--kernels auto`: per op kind, the fastest backend that keeps the reference's bf16 fidelity,
chosen once when the model is built, from GPU measurements committed to the repository.

Candidates (each within bf16 rounding of the reference, tests/test_autoselect.py):
- attention: `sdpa-priority` (cuDNN's flash kernel, then FlashAttention-2, named explicitly so
  SDPA never falls to a slower kernel silently) or `sdpa` (SDPA's own choice);
- norm_rope (q/k RMSNorm + RoPE): `float64` (the reference), `float32` (RoPE in fp32), `triton`
  (one pass, kernels/norm_rope.py);
- norm_modulate, gated_residual, layernorm_affine, residual_layernorm_affine: `eager` or `triton`
  (kernels/adaln.py);
- qkv: `separate` projections or `fused` (one GEMM on the concatenated weights, mova_rt/fuse.py;
  applied where the weights stay resident in bf16).

The rule (the GPU is the judge): on a GPU, each kind takes the fastest candidate measured on that
GPU model (or, failing that, on another GPU of the same compute capability) at MOVA's 360p shape;
a candidate without a measurement is never taken, and one of ours (Triton) must beat the best
library candidate by MARGIN, else the library one runs. A kind without any measurement, and every
kind on a CPU, keeps the reference's backend.

The table (mova_rt/data/kernel_table.json, format `mova-rt-kernel-table/1`) is built from
`mova-rt bench --ops` result files of GPU runs (benchmarks/results/) by

    python -m mova_rt.autoselect benchmarks/results/<run>_ops.json [...] --out mova_rt/data/kernel_table.json

and holds, per GPU and op kind, every candidate's median time and the pick.
"""

from __future__ import annotations

import functools
import json
import os
import sys

FORMAT = "mova-rt-kernel-table/1"
TABLE = os.path.join(os.path.dirname(__file__), "data", "kernel_table.json")
MARGIN = 0.03          # ours must be at least 3% faster than the library to be chosen
REFERENCE = {"attention": "sdpa", "norm_rope": "float64", "norm_modulate": "eager",
             "gated_residual": "eager", "layernorm_affine": "eager",
             "residual_layernorm_affine": "eager", "qkv": "separate"}
OURS = {"triton"}
# Within MARGIN of the fastest, SDPA with its backends named explicitly is taken: the same kernel,
# and a refusal raises instead of falling to a slower kernel silently.
PREFERRED = ("sdpa-priority",)
# Which bench rows measure each kind, first found wins (video self-attention is 55% of a step),
# and how their backend names map to the kind's candidates. Bench rows name the norm backends
# by kernel set (reference = eager). `sdpa-cudnn` (SDPA restricted to cuDNN) runs the kernel that
# `sdpa-priority` puts first, which is what the first GPU run measured; `rope.video_interleaved`
# times the RoPE alone, the part in which the eager float32 and float64 candidates differ.
ROWS = {
    "attention": [("attention.video_self", {"sdpa": "sdpa", "sdpa-priority": "sdpa-priority",
                                            "sdpa-cudnn": "sdpa-priority"})],
    "norm_rope": [("norm_rope.video_self", {"float64": "float64", "float32": "float32",
                                            "triton": "triton"}),
                  ("rope.video_interleaved", {"float64": "float64", "float32": "float32"})],
    **{kind: [(row, {"reference": "eager", "triton": "triton"})]
       for kind, row in (("norm_modulate", "norm.layernorm_modulate"),
                         ("gated_residual", "norm.gated_residual"),
                         ("layernorm_affine", "norm.norm3_affine"),
                         ("residual_layernorm_affine", "norm.residual_norm3"))},
    "qkv": [("linear.video_qkv", {"separate": "separate", "fused": "fused"})],
}


def pick(times: dict) -> str:
    """The candidate to run from {candidate: median ms} (the rule of the module docstring)."""
    chosen = min(times, key=times.get)
    library = [c for c in times if c not in OURS]
    if chosen in OURS and library:
        best_lib = min(library, key=times.get)
        if times[chosen] > (1 - MARGIN) * times[best_lib]:
            chosen = best_lib
    for p in PREFERRED:
        if p in times and p != chosen and times[p] <= (1 + MARGIN) * times[chosen]:
            return p
    return chosen


def build(results: list[tuple[str, dict]]) -> dict:
    """The table from (file name, bench result dict) pairs of GPU runs with --ops. Raises
    ValueError for a file that is not one."""
    entries, sources = {}, []
    for name, data in results:
        env = data.get("environment", {})
        if env.get("device_type") != "cuda":
            raise ValueError(f"{name} was measured on {env.get('device_type')}, not a GPU")
        if data.get("preset") != "mova-360p":
            raise ValueError(f"{name} measured preset {data.get('preset')}: the table holds "
                             "mova-360p shapes")
        times = {}
        for row in data.get("ops", []):
            if row.get("status") == "ok":
                times.setdefault(row["op"], {})[row["backend"]] = row["median_ms"]
        found = 0
        for kind, sources_of_kind in ROWS.items():
            for op, names in sources_of_kind:
                measured = {names[b]: ms for b, ms in times.get(op, {}).items() if b in names}
                if len(measured) >= 2:
                    key = (env.get("device_name"), kind)
                    entries[key] = {"device_name": env.get("device_name"), "sm": env.get("sm"),
                                    "kind": kind, "row": op, "ms": measured,
                                    "pick": pick(measured)}
                    found += 1
                    break
        if not found:
            raise ValueError(f"{name} has no op rows that compare backends: run mova-rt bench "
                             "--ops --preset mova-360p on a GPU")
        sources.append({"file": os.path.basename(name), "commit": env.get("commit"),
                        "device_name": env.get("device_name"), "sm": env.get("sm")})
    return {"format": FORMAT, "sources": sources,
            "entries": sorted(entries.values(), key=lambda e: (e["device_name"], e["kind"]))}


@functools.lru_cache(maxsize=None)
def _table(path: str) -> list:
    if not os.path.exists(path):
        return []
    with open(path, encoding="utf-8") as fh:
        table = json.load(fh)
    if table.get("format") != FORMAT:
        raise ValueError(f"{path} is not a {FORMAT} table")
    return table["entries"]


def _gpu(device) -> tuple | None:
    import torch
    if device is None:
        return None
    dev = torch.device(device)
    if dev.type != "cuda" or not torch.cuda.is_available():
        return None
    p = torch.cuda.get_device_properties(dev)
    return p.name, f"sm_{p.major}{p.minor}"


def decisions(device=None, path: str | None = None, gpu: tuple | None = None) -> dict:
    """{kind: (backend, why)} for a model on `device` (gpu: (name, sm) instead of asking the
    device, for tests)."""
    gpu = gpu or _gpu(device)
    entries = _table(path or TABLE)
    out = {}
    for kind, ref in REFERENCE.items():
        if gpu is None:
            out[kind] = (ref, "reference: no GPU")
            continue
        same = [e for e in entries if e["kind"] == kind and e["device_name"] == gpu[0]]
        alike = [e for e in entries if e["kind"] == kind and e["sm"] == gpu[1]]
        e = (same or alike or [None])[0]
        if e is None:
            out[kind] = (ref, f"reference: nothing measured on {gpu[0]} or {gpu[1]}")
        else:
            ms = ", ".join(f"{b} {t:.3g}" for b, t in sorted(e["ms"].items(), key=lambda x: x[1]))
            out[kind] = (e["pick"], f"measured on {e['device_name']} ({e['row']}: {ms} ms)")
    return out


def choose(device=None, path: str | None = None) -> dict:
    """{kind: backend} of `auto` for a model on `device` (mova_rt.ops.resolve)."""
    return {kind: backend for kind, (backend, _) in decisions(device, path).items()}


def main(argv=None) -> int:
    from .measured import table_main
    return table_main(argv, "python -m mova_rt.autoselect",
                      "Build the table of --kernels auto from GPU runs of mova-rt bench --ops "
                      "--preset mova-360p", build, TABLE,
                      lambda e: f"{e['device_name']}: {e['kind']} -> {e['pick']} ({e['ms']})")


if __name__ == "__main__":
    sys.exit(main())
