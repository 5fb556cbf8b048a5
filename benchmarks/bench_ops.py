"""Per-op microbenchmarks at the real shapes of a clip (`mova-rt bench --ops`).

Every op kind the step spends its time in, at the sizes the preset (or --height/--width/
--num_frames) gives, for each backend available here:
- attention: video self-attention (L_v x L_v, 40 heads x 128 at full size), audio self-attention,
  the bridge both ways (a2v: L_v queries x L_a keys; v2a: L_a queries x L_v keys), text
  cross-attention (L_v x 512). FLOPs = 4 Lq Lk H D. Backends: each registered in mova_rt.ops, the
  SDPA sub-backends on CUDA (flash, cuDNN, memory-efficient, math), flash-attn when installed,
  cuDNN's fp8 attention (mova_rt/attention_cudnn.py) when available, and eager matmul-softmax;
  a backend whose L x L scores would not fit is skipped with the reason.
- the DiT linear shapes (video, audio, bridge, text K/V): 2 M K N FLOPs.
- memory-bound glue: interleaved RoPE (each registered backend), LayerNorm + modulation,
  the gated residual, the affine norm3. GB/s = bytes read + written once (the minimum traffic).
Each result has median / min / max ms and its rate against the ceiling of the same run.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Callable

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

from mova_rt.config import MovaConfig
from mova_rt.models.video_dit import rope_3d_tables
from mova_rt.errors import MovaInputError
from mova_rt.models.bridge import video_positions
from mova_rt.ops import KERNEL_SETS, resolve
from mova_rt.rope import InterleavedRope, RotateHalfRope
from mova_rt.ops import _REGISTRY

from .flops import Shapes
from .measure import GIB, spread, sync, time_op

BF16 = torch.bfloat16


@dataclass
class OpCase:
    name: str
    shape: str
    unit: str                              # "TFLOP/s" or "GB/s"
    work: float                            # FLOPs or bytes per call
    make_inputs: Callable                  # () -> tuple of tensors
    backends: dict = field(default_factory=dict)   # name -> fn(*inputs) or a skip reason (str)


# ---------------------------------------------------------------------------------------------
# Backends
# ---------------------------------------------------------------------------------------------
def _sdpa_backend(backend):
    def fn(q, k, v):
        with sdpa_kernel(backend):
            return _REGISTRY["attention"]["sdpa"](q, k, v)
    return fn


def attention_eager(q, k, v):
    """softmax(q k^T / sqrt(D)) v with the scores materialised in fp32."""
    qt, kt, vt = (x.transpose(1, 2) for x in (q, k, v))          # [B, H, L, D]
    scores = torch.matmul(qt.float(), kt.float().transpose(-1, -2)) / math.sqrt(q.shape[-1])
    return torch.matmul(scores.softmax(-1), vt.float()).to(q.dtype).transpose(1, 2)


def attention_backends(device: torch.device, lq: int, lk: int, heads: int,
                       budget_bytes: int) -> dict:
    out = {name: fn for name, fn in _REGISTRY["attention"].items()}
    scores_bytes = 4 * heads * lq * lk
    too_big = (f"the {heads} x {lq} x {lk} fp32 scores need {scores_bytes / GIB:.1f} GiB"
               if scores_bytes > budget_bytes else None)
    if device.type == "cuda":
        out["sdpa-flash"] = _sdpa_backend(SDPBackend.FLASH_ATTENTION)
        out["sdpa-cudnn"] = _sdpa_backend(SDPBackend.CUDNN_ATTENTION)
        out["sdpa-efficient"] = _sdpa_backend(SDPBackend.EFFICIENT_ATTENTION)
    out["sdpa-math"] = too_big or _sdpa_backend(SDPBackend.MATH)
    out["eager"] = too_big or attention_eager
    try:
        from flash_attn import flash_attn_func
        out["flash-attn"] = lambda q, k, v: flash_attn_func(q, k, v)
    except ImportError:
        out["flash-attn"] = "flash-attn is not installed"
    from mova_rt.attention_cudnn import attention_cudnn_fp8, available as cudnn_fp8_available
    ok, why = cudnn_fp8_available()
    out["cudnn-fp8"] = attention_cudnn_fp8 if ok else why
    return out


EPS = 1e-6  # the DiTs' norm eps (config.json "eps")


def fp8_gemm_backends() -> dict:
    """The fp8 GEMM of mova_rt/fp8 (torch._scaled_mm, bias epilogue, bf16 out) on the bf16 case
    inputs (x, w, b), quantized once per input outside the timing, as the model's producers
    quantize them."""
    from mova_rt.fp8 import quantize
    memo = {}

    def run(x, w, b):
        key = (x.data_ptr(), w.data_ptr())
        if key not in memo:
            memo.clear()
            memo[key] = (*quantize.quantize_rows(x), *quantize.quantize_rows(w))
        x_q, x_s, w_q, w_s = memo[key]
        return quantize.fp8_linear_scaled_mm(x_q, x_s, w_q, w_s, b, x.dtype)
    return {"fp8-scaled_mm": run}


def kernel_sets(device=None) -> dict:
    """name -> Ops of every kernel set that resolves here (auto: for `device`), or the reason it
    does not."""
    out = {}
    for name in KERNEL_SETS:
        try:
            out[name] = resolve(name, device=device)
        except MovaInputError as e:
            out[name] = str(e)
    return out


def by_kernel_set(sets: dict, kind: str) -> dict:
    """Backends of one op kind, one per distinct implementation (named by the first set)."""
    out, seen = {}, set()
    for name, ops in sets.items():
        if isinstance(ops, str):
            out[name] = ops
            continue
        fn = getattr(ops, kind)
        key = getattr(fn, "__code__", fn)        # composed backends are closures: by code
        key = (key, getattr(fn, "__closure__", None) and tuple(
            c.cell_contents for c in fn.__closure__))
        if key not in seen:
            seen.add(key)
            out[name] = fn
    return out


# ---------------------------------------------------------------------------------------------
# Cases at the clip's shapes
# ---------------------------------------------------------------------------------------------
def op_cases(cfg: MovaConfig, s: Shapes, device: torch.device, seed: int = 0) -> list[OpCase]:
    v, a, br = cfg.video_dit, cfg.audio_dit, cfg.bridge
    d, f, d_a, f_a = v.dim, v.ffn_dim, a.dim, a.ffn_dim
    hd = br.head_dim
    gen = torch.Generator(device=device).manual_seed(seed)
    budget = _scores_budget(device)

    def randn(*shape, dtype=BF16):
        return torch.randn(shape, generator=gen, device=device, dtype=dtype)

    cases = []

    def attention(name, lq, lk, heads, head_dim):
        cases.append(OpCase(
            name=name, shape=f"q [1, {lq}, {heads}, {head_dim}] x kv [1, {lk}, {heads}, "
                             f"{head_dim}] bf16",
            unit="TFLOP/s", work=4.0 * lq * lk * heads * head_dim,
            make_inputs=lambda: (randn(1, lq, heads, head_dim), randn(1, lk, heads, head_dim),
                                 randn(1, lk, heads, head_dim)),
            backends=attention_backends(device, lq, lk, heads, budget)))

    attention("attention.video_self", s.L_v, s.L_v, v.num_heads, v.head_dim)
    attention("attention.audio_self", s.L_a, s.L_a, a.num_heads, a.head_dim)
    attention("attention.bridge_a2v", s.L_v, s.L_a, d // hd, hd)
    attention("attention.bridge_v2a", s.L_a, s.L_v, d_a // hd, hd)
    attention("attention.video_text", s.L_v, s.L_t, v.num_heads, v.head_dim)

    # Norm + RoPE + attention as the blocks call them, per kernel set (FLOPs: the attention's).
    sets = kernel_sets(device)
    grid = s.video_grid
    fps = s.fps

    def fused(name, kind, lq, lk, heads, head_dim, ropes):
        def make():
            q, k, v_ = (randn(1, n, heads * head_dim).view(1, n, heads, head_dim)
                        for n in (lq, lk, lk))
            w = (1 + 0.1 * randn(heads * head_dim, dtype=torch.float32)).to(BF16)
            return (q, k, v_, w, w, EPS, *ropes())
        cases.append(OpCase(
            name=name, shape=f"q [1, {lq}, {heads}, {head_dim}] x kv [1, {lk}, ...] bf16 + norm "
                             "+ RoPE", unit="TFLOP/s", work=4.0 * lq * lk * heads * head_dim,
            make_inputs=make, backends=by_kernel_set(sets, kind)))

    def video_rope():
        return (InterleavedRope.video(v.head_dim, grid, device),)   # one RoPE for q and k

    def bridge_ropes(video_first):
        def ropes():
            per_frame = video_positions(br, (grid[0], 1, 1), fps, device)
            vr = RotateHalfRope(per_frame, grid[1] * grid[2], hd, BF16)
            ar = RotateHalfRope(torch.arange(s.L_a, device=device).float(), 1, hd, BF16)
            return (vr, ar) if video_first else (ar, vr)
        return ropes

    fused("fused.video_self", "self_attention", s.L_v, s.L_v, v.num_heads, v.head_dim, video_rope)
    fused("fused.bridge_a2v", "cross_attention", s.L_v, s.L_a, d // hd, hd, bridge_ropes(True))
    fused("fused.bridge_v2a", "cross_attention", s.L_a, s.L_v, d_a // hd, hd, bridge_ropes(False))

    # q, k, v as three GEMMs or one on the concatenated weights (mova_rt/fuse.py; auto's "qkv")
    def qkv_separate(x, w, b):
        return tuple(F.linear(x, w[i * d:(i + 1) * d], b[i * d:(i + 1) * d]) for i in range(3))

    def qkv_fused(x, w, b):
        return F.linear(x, w, b).view(x.shape[0], 3, d).unbind(1)
    cases.append(OpCase(
        name="linear.video_qkv", shape=f"[{s.L_v}, {d}] x [{d}, 3 x {d}] + bias bf16",
        unit="TFLOP/s", work=2.0 * s.L_v * d * 3 * d,
        make_inputs=lambda: (randn(s.L_v, d), randn(3 * d, d), randn(3 * d)),
        backends={"separate": qkv_separate, "fused": qkv_fused}))

    for name, m, k, n in (("linear.video_qkvo", s.L_v, d, d), ("linear.video_ffn_up", s.L_v, d, f),
                          ("linear.video_ffn_down", s.L_v, f, d),
                          ("linear.audio_qkvo", s.L_a, d_a, d_a),
                          ("linear.audio_ffn_up", s.L_a, d_a, f_a),
                          ("linear.audio_ffn_down", s.L_a, f_a, d_a),
                          ("linear.bridge_a2v_kv", s.L_a, d_a, d),
                          ("linear.bridge_v2a_kv", s.L_v, d, d_a),
                          ("linear.text_kv", s.L_t, d, d)):
        cases.append(OpCase(
            name=name, shape=f"[{m}, {k}] x [{k}, {n}] + bias bf16", unit="TFLOP/s",
            work=2.0 * m * k * n,
            make_inputs=lambda m=m, k=k, n=n: (randn(m, k), randn(n, k), randn(n)),
            backends={"torch": F.linear, **fp8_gemm_backends()}))

    grid, lv = s.video_grid, s.L_v

    # q/k RMSNorm + RoPE as every attention's prologue, per backend of mova_rt.ops (auto's
    # "norm_rope"): the input a strided view of a fused q|k|v projection, as the blocks give it
    def norm_rope_inputs(rope, half):
        def make():
            qkv = randn(1, lv, 3 * d)
            w = (1 + 0.1 * randn(d, dtype=torch.float32)).to(BF16)
            return qkv[..., :d].view(1, lv, v.num_heads, v.head_dim), w, EPS, rope(), half
        return make
    for name, rope, half in (("norm_rope.video_self", lambda: video_rope()[0], False),
                             ("norm_rope.bridge_a2v", lambda: bridge_ropes(True)()[0], True)):
        cases.append(OpCase(
            name=name, shape=f"[1, {lv}, {v.num_heads}, {v.head_dim}] of [1, {lv}, {3 * d}] bf16",
            unit="GB/s", work=2.0 * 2 * lv * d, make_inputs=norm_rope_inputs(rope, half),
            backends=dict(_REGISTRY["norm_rope"])))

    def rope_inputs():
        cos, sin = rope_3d_tables(v.head_dim, grid, device)
        return randn(1, lv, v.num_heads, v.head_dim), cos, sin
    elems = lv * d
    cases.append(OpCase(
        name="rope.video_interleaved", shape=f"[1, {lv}, {v.num_heads}, {v.head_dim}] bf16",
        unit="GB/s", work=2.0 * 2 * elems, make_inputs=rope_inputs,
        backends=dict(_REGISTRY["rope_interleaved"])))
    cases.append(OpCase(
        name="norm.layernorm_modulate", shape=f"[1, {lv}, {d}] bf16", unit="GB/s",
        work=2.0 * 2 * elems,
        make_inputs=lambda: (randn(1, lv, d), randn(1, 1, d), randn(1, 1, d), EPS),
        backends=by_kernel_set(sets, "norm_modulate")))
    cases.append(OpCase(
        name="norm.gated_residual", shape=f"[1, {lv}, {d}] bf16", unit="GB/s",
        work=3.0 * 2 * elems,
        make_inputs=lambda: (randn(1, lv, d), randn(1, 1, d), randn(1, lv, d)),
        backends=by_kernel_set(sets, "gated_residual")))
    cases.append(OpCase(
        name="norm.norm3_affine", shape=f"[1, {lv}, {d}] bf16", unit="GB/s",
        work=2.0 * 2 * elems,
        make_inputs=lambda: (randn(1, lv, d), randn(d), randn(d), EPS),
        backends=by_kernel_set(sets, "layernorm_affine")))
    cases.append(OpCase(
        name="norm.residual_norm3", shape=f"[1, {lv}, {d}] bf16 -> x, norm3(x)", unit="GB/s",
        work=4.0 * 2 * elems,
        make_inputs=lambda: (randn(1, lv, d), randn(1, 1, d), randn(1, lv, d), randn(d), randn(d),
                             EPS),
        backends=by_kernel_set(sets, "residual_layernorm_affine")))
    return cases


def _scores_budget(device: torch.device) -> int:
    """Largest fp32 score matrix an unfused backend may build: a quarter of free memory."""
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return free // 4
    return 2 * GIB


def _reps_for(seconds_per_call: float, budget: float = 1.0) -> int:
    """About `budget` seconds of timed calls per backend (at least 3, at most 50)."""
    return int(min(50, max(3, budget / max(seconds_per_call, 1e-6))))


def _max_diff(a, b) -> float:
    """Largest elementwise difference of two outputs (tensors or tuples of tensors)."""
    pairs = zip(a, b) if isinstance(a, tuple) else [(a, b)]
    return max((x.float() - y.float()).abs().max().item() for x, y in pairs)


def run_ops(cfg: MovaConfig, s: Shapes, device: torch.device, ceilings: dict, full: bool,
            log, seconds: float = 1.0) -> list[dict]:
    """seconds: about how long each backend of each op is timed (after a warm-up call)."""
    results = []
    for case in op_cases(cfg, s, device):
        inputs = case.make_inputs()
        first_out = None
        for backend, fn in case.backends.items():
            row = {"op": case.name, "backend": backend, "shape": case.shape, "unit": case.unit}
            kind = "copy_d2d" if case.unit != "TFLOP/s" else (
                "matmul_fp8" if backend.startswith("fp8") and "matmul_fp8" in ceilings else "matmul")
            ceiling = ceilings[kind]["value"]
            row["ceiling"] = kind
            if isinstance(fn, str):
                row.update(status="skipped", message=fn)
                results.append(row)
                continue
            try:
                with torch.no_grad():
                    out = fn(*inputs)                    # first call: compile / autotune / check
                    sync(device)
                    if full:
                        probe = time_op(lambda: fn(*inputs), device, warmup=0, reps=1)[0]
                        sec = time_op(lambda: fn(*inputs), device, warmup=1,
                                      reps=_reps_for(probe, seconds))
                    else:   # a smoke run (CPU, the Triton interpreter): one timed call
                        sec = time_op(lambda: fn(*inputs), device, warmup=0, reps=1)
            except torch.OutOfMemoryError as e:
                row.update(status="oom", message=str(e).splitlines()[0][:200])
            except (RuntimeError, ValueError, NotImplementedError) as e:
                # A backend that does not support this shape / dtype / GPU says so and is skipped.
                row.update(status="unsupported", message=(str(e).strip().splitlines() or [""])[0][:200])
            else:
                sp = spread(sec)
                rate = case.work / sp["median"] / (1e12 if case.unit == "TFLOP/s" else 1e9)
                row.update(status="ok", median_ms=sp["median"] * 1e3, min_ms=sp["min"] * 1e3,
                           max_ms=sp["max"] * 1e3, reps=len(sec), rate=rate,
                           fraction_of_ceiling=rate / ceiling)
                if first_out is None:
                    first_out = out
                else:
                    row["max_abs_diff_vs_first"] = _max_diff(out, first_out)
            results.append(row)
            log(f"op {case.name} [{backend}]: " + (
                f"{row['median_ms']:.3f} ms, {row['rate']:.1f} {case.unit}" if row["status"] == "ok"
                else f"{row['status']}: {row['message']}"))
            out = None
        inputs = first_out = None
        if device.type == "cuda":
            torch.cuda.empty_cache()
    return results
