"""Context-parallel scaling model: predicted step time and efficiency on N GPUs, from the FLOP
formulas (flops.py) and the bytes each collective moves. `python -m mova_rt.benchmarks.scaling`.

Per forward, with N = u x r GPUs (Ulysses degree u, ring degree r), tokens sharded evenly:
- compute: the forward's FLOPs / N at a sustained rate (default 615 TFLOP/s, the reference's
  effective H100 rate at 360p).
- Ulysses: every self-attention (40 video layers at width d, 30 audio layers at d_a) and every
  bridge attention (a2v: queries video, keys audio; v2a: the reverse) moves q, k, v in and the
  output back through all-to-alls: each GPU sends (u - 1)/u of its [L/N, width] bf16 shard per
  tensor. Not overlapped with compute.
- Ring: after the all-to-all each GPU holds L/r tokens of width/u; it receives (r - 1) K/V shards
  of that size per attention layer, overlapped with the attention compute of the previous shard
  (only what exceeds the attention time is exposed).
- Text cross-attention is local (queries sharded, 512 keys whole); the final hidden states are
  all-gathered once before the heads.
Bandwidths: NVLink 900 GB/s inside a node (H100 SXM, per GPU), InfiniBand 400 Gb/s = 50 GB/s per
GPU between nodes (8 GPUs a node); Ulysses groups stay inside a node, ring hops between groups
cross nodes when N > 8. A step is 2 forwards (CFG, batched or not: the bytes per token are the
same). A model, not a measurement: it ignores kernel-efficiency loss on smaller shards.
"""

from __future__ import annotations

import argparse
import json

from mova_rt.config import PRESET_SIZES, preset_config

from .flops import clip_shapes, forward_flops

BF16 = 2
NVLINK_GBS = 900.0
IB_GBS = 50.0
GPUS_PER_NODE = 8
SUSTAINED_TFLOPS = 615.0
HEAD_DIVISORS = (1, 2, 4)      # Ulysses degrees that divide 40 video and 12 audio/v2a heads


def ulysses_degree(n: int) -> int:
    return max(u for u in HEAD_DIVISORS if n % u == 0 and u <= n)


def predict(preset: str, n: int, tflops: float = SUSTAINED_TFLOPS, nvlink: float = NVLINK_GBS,
            ib: float = IB_GBS, per_node: int = GPUS_PER_NODE, forwards: int = 2) -> dict:
    cfg = preset_config(preset)
    s = clip_shapes(cfg, *PRESET_SIZES[preset])
    f = forward_flops(cfg, s)
    total = sum(f.values())
    u = ulysses_degree(n)
    r = n // u
    v, a = cfg.video_dit, cfg.audio_dit
    d, d_a, lv, la = v.dim, a.dim, s.L_v, s.L_a
    n_bridge = len(cfg.bridge.interaction_layers())
    # (layers, query tokens, key tokens, width) of every sequence-parallel attention
    attns = [(v.num_layers, lv, lv, d), (a.num_layers, la, la, d_a),
             (n_bridge, lv, la, d), (n_bridge, la, lv, d_a)]
    compute_s = total / n / (tflops * 1e12)
    a2a_bytes = sum(layers * BF16 * width * (2 * lq + 2 * lk) / n * (u - 1) / u
                    for layers, lq, lk, width in attns)
    ring_bytes = sum(layers * BF16 * 2 * lk / r * width / u * (r - 1)
                     for layers, lq, lk, width in attns)
    gather_bytes = BF16 * (lv * d + la * d_a) * (n - 1) / n
    ring_bw = nvlink if n <= per_node else ib
    a2a_s = a2a_bytes / (nvlink * 1e9)
    attn_s = (f["video_self_attention"] + f["bridge_attention"] + f["audio_attention"]) / n / (
        tflops * 1e12)
    ring_exposed_s = max(0.0, ring_bytes / (ring_bw * 1e9) - attn_s)
    gather_s = gather_bytes / ((nvlink if n <= per_node else ib) * 1e9)
    step = forwards * (compute_s + a2a_s + ring_exposed_s + gather_s)
    one = forwards * total / (tflops * 1e12)
    return {"preset": preset, "gpus": n, "ulysses": u, "ring": r,
            "pflop_per_step": forwards * total / 1e15,
            "compute_s": forwards * compute_s, "all_to_all_gb": forwards * a2a_bytes / 1e9,
            "ring_gb": forwards * ring_bytes / 1e9, "ring_exposed_s": forwards * ring_exposed_s,
            "comm_s": forwards * (a2a_s + ring_exposed_s + gather_s), "step_s": step,
            "speedup": one / step, "efficiency": one / step / n}


def table(presets=("mova-360p", "mova-720p"), gpus=(1, 2, 4, 8, 16)) -> list:
    return [predict(p, n) for p in presets for n in gpus]


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--json", default=None)
    args = ap.parse_args(argv)
    rows = table()
    print(f"{'preset':<11}{'GPUs':>5}{'u x r':>7}{'PFLOP':>7}{'compute s':>10}{'a2a GB':>8}"
          f"{'ring GB':>9}{'comm s':>8}{'step s':>8}{'speedup':>8}{'eff':>6}")
    for x in rows:
        print(f"{x['preset']:<11}{x['gpus']:>5}{x['ulysses']:>4}x{x['ring']:<2}"
              f"{x['pflop_per_step']:>7.2f}{x['compute_s']:>10.2f}{x['all_to_all_gb']:>8.1f}"
              f"{x['ring_gb']:>9.1f}{x['comm_s']:>8.2f}{x['step_s']:>8.2f}{x['speedup']:>8.2f}"
              f"{100 * x['efficiency']:>5.0f}%")
    if args.json:
        with open(args.json, "w", encoding="utf-8") as fh:
            json.dump(rows, fh, indent=1)


if __name__ == "__main__":
    main()
