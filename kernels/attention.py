"""Fused attention for MOVA: q/k RMSNorm across heads + RoPE + softmax attention in one kernel.

Every attention of the model has the same shape of work:

    qn = round(q * rstd_q * w_q)           RMSNorm over all heads (per-token rstd, fp32)
    kn = round(k * rstd_k * w_k)
    qr = round(rope(qn)), kr = round(rope(kn))          (rounded to the activation dtype)
    out = softmax(qr kr^T / sqrt(D)) v

with `round` the activation dtype's rounding, matching the eager path step by step. RoPE variants:
- ROPE_NONE: text cross-attention.
- ROPE_INTERLEAVED (DiT self-attention): pairs (2i, 2i+1) rotated by angle(l, i). The token index
  l is split into up to three axes (frame, row, column; audio: one axis) and pair i belongs to one
  axis; cos/sin come from small per-axis tables [A0 + A1 + A2, D/2] (fp32 of the reference's
  float64 values) instead of [L, D/2] tables.
- ROPE_ROTATE_HALF (bridge): channel d pairs with d +- D/2; the angle is pos(l) * inv_freq[d mod
  D/2] with pos(l) = frame_pos[l // tokens_per_frame] (video: the aligned fractional position of
  the latent frame; audio: l), computed in the kernel in fp32 and its cos/sin rounded to the table
  dtype as the reference's tables are. No position tables are read.
The rotated q/k are never written to memory: each program normalises and rotates its q tile once
and every k tile as it streams in. Online softmax in base 2 (FlashAttention-2 schedule). Split-KV
(flash-decoding) for few queries over many keys (bridge v2a: 403 x 43,120): each split writes its
partial output and log-sum-exp, and a small reduction combines them exactly.

Layouts: q [B, Lq, H, D], k/v [B, Lk, H, D] (any strides with the last dim contiguous, e.g.
views of the projections [B, L, H*D]); w_q/w_k [H*D]; out [B, Lq, H, D] contiguous.
"""

from __future__ import annotations

import functools
import math
import torch
import triton
import triton.language as tl

from ..rope import InterleavedRope, RotateHalfRope
from ._triton import INTERPRET, round_bf16

ROPE_NONE, ROPE_INTERLEAVED, ROPE_ROTATE_HALF = 0, 1, 2
LOG2E = 1.4426950408889634


# ---------------------------------------------------------------------------------------------
# Kernels
# ---------------------------------------------------------------------------------------------
@triton.jit
def _rms_rstd_kernel(X, RSTD, N, stride_row, eps, BLOCK: tl.constexpr):
    """rstd[row] = 1 / sqrt(mean(x[row, :N]^2) + eps), fp32."""
    row = tl.program_id(0)
    acc = tl.zeros([BLOCK], dtype=tl.float32)
    for start in range(0, N, BLOCK):
        offs = start + tl.arange(0, BLOCK)
        x = tl.load(X + row * stride_row + offs, mask=offs < N, other=0.0).to(tl.float32)
        acc += x * x
    # IEEE division and sqrt (a plain `/` is the approximate div.full on GPUs); once per row.
    mean = tl.math.div_rn(tl.sum(acc, axis=0), N.to(tl.float32))
    tl.store(RSTD + row, tl.math.div_rn(1.0, tl.math.sqrt_rn(mean + eps)))


@triton.jit
def _prepare_tile(ptr, rows, row_ok, stride_row, head,
                  RSTD, W, TA, TB, INV, GEOM0, GEOM1, GEOM2, GEOM3, GEOM4,
                  HEAD_DIM: tl.constexpr, NORM: tl.constexpr, ROPE: tl.constexpr,
                  ROUND_TABLE: tl.constexpr):
    """Load a [rows, HEAD_DIM] tile of one head, normalised and rotated, as two halves (a, b) of
    [rows, HEAD_DIM/2] with q . k = a_q . a_k + b_q . b_k: the even and odd channels for the
    interleaved RoPE (the pairs), the first and second halves otherwise. The rotation then needs
    no shuffle and the halves are never re-interleaved. Values are fp32 rounded to bf16 after the
    norm and after the rotation, as the eager path leaves them."""
    HALF: tl.constexpr = HEAD_DIM // 2
    j = tl.arange(0, HALF)
    base = ptr + rows[:, None] * stride_row
    m = row_ok[:, None]
    if ROPE == 1:
        x = tl.load(base + tl.arange(0, HEAD_DIM)[None, :], mask=m, other=0.0).to(tl.float32)
        a, b = tl.split(tl.reshape(x, [x.shape[0], HALF, 2]))       # channels 2j, 2j + 1
        ja, jb = 2 * j, 2 * j + 1
    else:
        a = tl.load(base + j[None, :], mask=m, other=0.0).to(tl.float32)
        b = tl.load(base + HALF + j[None, :], mask=m, other=0.0).to(tl.float32)
        ja, jb = j, HALF + j
    if NORM:
        r = tl.load(RSTD + rows, mask=row_ok, other=0.0)[:, None]
        wa = tl.load(W + head * HEAD_DIM + ja).to(tl.float32)[None, :]
        wb = tl.load(W + head * HEAD_DIM + jb).to(tl.float32)[None, :]
        a = round_bf16(a * r * wa)
        b = round_bf16(b * r * wb)
    if ROPE == 1:
        # Pair j rotates with one axis: row (axis offset + coordinate) of the per-axis tables.
        c0 = rows // (GEOM1 * GEOM2)
        c1 = (rows // GEOM2) % GEOM1
        c2 = rows % GEOM2
        trow = tl.where(j[None, :] < GEOM3, c0[:, None],
                        tl.where(j[None, :] < GEOM3 + GEOM4, GEOM0 + c1[:, None],
                                 GEOM0 + GEOM1 + c2[:, None]))
        cos = tl.load(TA + trow * HALF + j[None, :], mask=m, other=1.0)
        sin = tl.load(TB + trow * HALF + j[None, :], mask=m, other=0.0)
        a, b = (round_bf16(a * cos - b * sin), round_bf16(a * sin + b * cos))
    elif ROPE == 2:
        pos = tl.load(TA + rows // GEOM0, mask=row_ok, other=0.0)
        angle = pos[:, None] * tl.load(INV + j)[None, :]
        cos = tl.cos(angle)
        sin = tl.sin(angle)
        if ROUND_TABLE:      # the reference's cos/sin tables are in the activation dtype
            cos = round_bf16(cos)
            sin = round_bf16(sin)
        a, b = (round_bf16(a * cos - b * sin), round_bf16(b * cos + a * sin))
    return a, b


@triton.jit
def _attention_kernel(
        Q, K, V, O, OP, LSE,                                     # pointers
        QR, KR, WQ, WK, QA, QB, KA, KB, INV,
        Lq, Lk, H, KV_CHUNK,                                     # sizes
        QG0, QG1, QG2, QG3, QG4, KG0, KG1, KG2, KG3, KG4,
        sqb, sqm, sqh, skb, skn, skh, svb, svn, svh,             # strides (last dim is 1)
        sob, som, soh,
        qk_scale,                                                # meta
        HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
        NORM_Q: tl.constexpr, NORM_K: tl.constexpr, ROPE: tl.constexpr,
        ROUND_TABLE: tl.constexpr, SPLIT: tl.constexpr, INTERPRET: tl.constexpr):
    pid_m = tl.program_id(0)
    pid_bh = tl.program_id(1)
    pid_s = tl.program_id(2)
    b = pid_bh // H
    h = pid_bh % H
    d = tl.arange(0, HEAD_DIM)

    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    row_ok = rows < Lq
    qa, qb = _prepare_tile(Q + b * sqb + h * sqh, rows, row_ok, sqm, h,
                           QR + b * Lq, WQ, QA, QB, INV, QG0, QG1, QG2, QG3, QG4,
                           HEAD_DIM, NORM_Q, ROPE, ROUND_TABLE)
    if not INTERPRET:
        qa = qa.to(tl.bfloat16)
        qb = qb.to(tl.bfloat16)

    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, HEAD_DIM], dtype=tl.float32)
    start = pid_s * KV_CHUNK
    end = tl.minimum(start + KV_CHUNK, Lk)
    for n0 in range(start, end, BLOCK_N):
        cols = n0 + tl.arange(0, BLOCK_N)
        col_ok = cols < end
        ka, kb = _prepare_tile(K + b * skb + h * skh, cols, col_ok, skn, h,
                               KR + b * Lk, WK, KA, KB, INV, KG0, KG1, KG2, KG3, KG4,
                               HEAD_DIM, NORM_K, ROPE, ROUND_TABLE)
        v = tl.load(V + b * svb + h * svh + cols[:, None] * svn + d[None, :],
                    mask=col_ok[:, None], other=0.0)
        if INTERPRET:
            v = v.to(tl.float32)
        else:
            ka = ka.to(tl.bfloat16)
            kb = kb.to(tl.bfloat16)
        # Scores in fp32 from the two halves, scaled after the dots (as SDPA does; scaling bf16 q
        # would round again), in log2 units for exp2.
        s = (tl.dot(qa, tl.trans(ka)) + tl.dot(qb, tl.trans(kb))) * qk_scale   # [BLOCK_M, BLOCK_N]
        s = tl.where(col_ok[None, :], s, float("-inf"))          # padded keys are not attended
        m_new = tl.maximum(m_i, tl.max(s, axis=1))
        alpha = tl.exp2(m_i - m_new)
        p = tl.exp2(s - m_new[:, None])
        l_i = l_i * alpha + tl.sum(p, axis=1)
        acc = acc * alpha[:, None]
        if INTERPRET:
            acc += tl.dot(p, v)
        else:
            acc += tl.dot(p.to(tl.bfloat16), v)
        m_i = m_new

    l_safe = tl.where(l_i == 0.0, 1.0, l_i)                     # an empty split: no keys
    out = acc / l_safe[:, None]
    if SPLIT:
        # Partial results [S, B, H, Lq, D] / [S, B, H, Lq], combined by combine_splits().
        nbh = tl.num_programs(1)
        base = (pid_s * nbh + pid_bh) * Lq
        tl.store(OP + (base + rows[:, None]) * HEAD_DIM + d[None, :], out, mask=row_ok[:, None])
        tl.store(LSE + base + rows, m_i + tl.log2(l_safe), mask=row_ok)
    else:
        tl.store(O + b * sob + h * soh + rows[:, None] * som + d[None, :],
                 round_bf16(out).to(tl.bfloat16), mask=row_ok[:, None])


def _configs():
    # Hopper: a 128-row q tile in registers (8 warps), k/v tiles streamed through a
    # 2-3 stage pipeline; smaller tiles for long-key / short-query splits.
    return [triton.Config({"BLOCK_M": bm, "BLOCK_N": bn}, num_warps=w, num_stages=s)
            for bm, bn, w, s in ((128, 64, 8, 3), (128, 128, 8, 2), (64, 64, 4, 3),
                                 (128, 32, 8, 3))]


_attention_tuned = triton.autotune(
    configs=_configs(), key=["Lq", "Lk", "HEAD_DIM", "ROPE", "SPLIT"])(_attention_kernel)

INTERPRET_BLOCK = 16   # interpreter tiles: small, so tests cover several blocks and ragged ends


def _signature() -> dict:
    ptrs = {"Q": "*bf16", "K": "*bf16", "V": "*bf16", "O": "*bf16", "OP": "*fp32", "LSE": "*fp32",
            "QR": "*fp32", "KR": "*fp32", "WQ": "*bf16", "WK": "*bf16", "QA": "*fp32",
            "QB": "*fp32", "KA": "*fp32", "KB": "*fp32", "INV": "*fp32"}
    ints = ["Lq", "Lk", "H", "KV_CHUNK"] + [f"{s}G{i}" for s in "QK" for i in range(5)] + [
        f"s{t}{a}" for t, axes in (("q", "bmh"), ("k", "bnh"), ("v", "bnh"), ("o", "bmh"))
        for a in axes]
    sig = {**ptrs, **{n: "i32" for n in ints}, "qk_scale": "fp32"}
    for c in ("HEAD_DIM", "BLOCK_M", "BLOCK_N", "NORM_Q", "NORM_K", "ROPE", "ROUND_TABLE",
              "SPLIT", "INTERPRET"):
        sig[c] = "constexpr"
    return sig


# Every RoPE variant (and split-KV) at head dim 128 in every autotune config, for compile checks
# (kernels/_triton.compile_report): the real kernels that a GPU would build.
COMPILE_CASES = [
    {"name": f"attention rope={rope} split={split} {cfg.kwargs['BLOCK_M']}x"
             f"{cfg.kwargs['BLOCK_N']}x{cfg.num_stages}",
     "kernel": _attention_kernel, "signature": _signature(),
     "constexprs": dict(HEAD_DIM=128, NORM_Q=True, NORM_K=True, ROPE=rope,
                        ROUND_TABLE=rope == ROPE_ROTATE_HALF, SPLIT=split, INTERPRET=False,
                        **cfg.kwargs),
     "num_warps": cfg.num_warps, "num_stages": cfg.num_stages,
     # sm_89 (99 KiB of shared memory): only the tiles that can fit there are worth compiling.
     "archs": (90, 89) if cfg.kwargs["BLOCK_N"] * cfg.kwargs["BLOCK_M"] <= 128 * 64 else (90,)}
    for rope, split in ((ROPE_NONE, False), (ROPE_INTERLEAVED, False),
                        (ROPE_ROTATE_HALF, False), (ROPE_ROTATE_HALF, True))
    for cfg in _configs()]


# ---------------------------------------------------------------------------------------------
# Launcher
# ---------------------------------------------------------------------------------------------
def _check(name, t, dims, dtype=None):
    if t.dim() != dims:
        raise ValueError(f"{name} must have {dims} dimensions, got shape {tuple(t.shape)}")
    if t.stride(-1) != 1:
        raise ValueError(f"{name} must be contiguous in its last dimension")
    if dtype is not None and t.dtype != dtype:
        raise ValueError(f"{name} must be {dtype}, got {t.dtype}")


def rms_rstd(x: torch.Tensor, eps: float) -> torch.Tensor:
    """x [B, L, H, D] (rows contiguous over H*D) -> rstd [B, L] fp32 over all heads."""
    b, l, h, d = x.shape
    if x.stride(2) != d:
        raise ValueError("the heads of q/k must be adjacent (a view of [B, L, H*D])")
    rows = x.as_strided((b * l, h * d), (x.stride(1), 1)) if x.stride(0) == l * x.stride(1) \
        else None
    out = torch.empty(b, l, device=x.device, dtype=torch.float32)
    if rows is None:
        for i in range(b):
            out[i] = rms_rstd(x[i:i + 1], eps)[0]
        return out
    n = h * d
    _rms_rstd_kernel[(b * l,)](rows, out, n, x.stride(1), eps,
                               BLOCK=min(triton.next_power_of_2(n), 4096))
    return out


@functools.lru_cache(maxsize=None)
def _sm_count(device: torch.device) -> int:
    """Streaming multiprocessors of the device (queried once, not per attention call)."""
    if device.type != "cuda":
        return 132
    return torch.cuda.get_device_properties(device).multi_processor_count


def split_count(batch_heads: int, lq: int, lk: int, sm_count: int = 132) -> int:
    """Key splits that fill the GPU when queries alone give too few programs: aim for about two
    programs per SM with at least 1024 keys per split."""
    programs = batch_heads * triton.cdiv(lq, 128)
    if programs >= sm_count or lk < 2048:
        return 1
    return max(1, min(triton.cdiv(2 * sm_count, programs), lk // 1024))


def combine_splits(op: torch.Tensor, lse: torch.Tensor) -> torch.Tensor:
    """op [S, B, H, Lq, D] fp32, lse [S, B, H, Lq] (log2) -> out [B, Lq, H, D] fp32, exactly the
    softmax over all keys."""
    top = lse.max(dim=0).values
    top = torch.where(torch.isfinite(top), top, torch.zeros_like(top))
    w = torch.exp2(lse - top)                                    # [S, B, H, Lq]
    out = (w[..., None] * op).sum(0) / w.sum(0)[..., None]       # [B, H, Lq, D]
    return out.transpose(1, 2)


def rope_arguments(q: torch.Tensor, k: torch.Tensor, q_rope, k_rope) -> tuple:
    """The kernels' RoPE arguments for q [B, Lq, H, D] and k [B, Lk, H, D]: (rope kind, q tables
    (a, b), q geometry [5], k tables, k geometry, inv_freq or None, round_table). Tables are None
    without RoPE. Raises ValueError for a description that does not fit."""
    lq, dh, lk = q.shape[1], q.shape[3], k.shape[1]
    kinds = {type(r) for r in (q_rope, k_rope) if r is not None}
    if len(kinds) > 1 or (InterleavedRope in kinds and (q_rope is None or k_rope is None)):
        raise ValueError("q and k RoPE must be of one kind (interleaved: on both sides)")
    rope = ROPE_NONE if not kinds else (ROPE_INTERLEAVED if InterleavedRope in kinds
                                        else ROPE_ROTATE_HALF)

    def side(r, length):
        if r is None:               # no rotation: position 0 on every token (rotate-half only)
            return torch.zeros(1, device=q.device), None, [max(length, 1), 1, 1, 0, 0], None
        if isinstance(r, InterleavedRope):
            if math.prod(r.axes) != length or sum(r.pairs) != dh // 2:
                raise ValueError(f"RoPE axes {r.axes} / pairs {r.pairs} do not fit L={length}, "
                                 f"D={dh}")
            cos, sin = r.axis_tables()
            return cos, sin, [*r.axes, r.pairs[0], r.pairs[1]], None
        if not isinstance(r, RotateHalfRope) or r.head_dim != dh:
            raise ValueError(f"unsupported RoPE description {r!r} for head dim {dh}")
        return r.frame_pos, None, [r.tokens_per_frame, 1, 1, 0, 0], r.inv_freq

    qa, qb, qg, inv_q = side(q_rope, lq)
    ka, kb, kg, inv_k = side(k_rope, lk)
    inv = inv_q if inv_q is not None else inv_k
    round_table = rope == ROPE_ROTATE_HALF and next(
        r for r in (q_rope, k_rope) if r is not None).table_dtype == torch.bfloat16
    if rope == ROPE_NONE:
        qa = qb = ka = kb = None
    return rope, qa, qb, qg, ka, kb, kg, inv, round_table


def fused_attention(q, k, v, wq=None, wk=None, eps: float = 1e-6, q_rope=None, k_rope=None,
                    splits: int | None = None) -> torch.Tensor:
    """See the module docstring. q_rope/k_rope: InterleavedRope for both, RotateHalfRope (or None)
    for each side, or both None. splits: key splits (None: chosen to fill the GPU)."""
    for name, t in (("q", q), ("k", k), ("v", v)):
        _check(name, t, 4)
    bsz, lq, heads, dh = q.shape
    lk = k.shape[1]
    if k.shape != (bsz, lk, heads, dh) or v.shape != k.shape:
        raise ValueError(f"q {tuple(q.shape)}, k {tuple(k.shape)}, v {tuple(v.shape)} disagree")
    if not (q.dtype == k.dtype == v.dtype == torch.bfloat16):
        raise ValueError("q, k, v must be bf16 (the kernel reproduces bf16 rounding)")
    if dh not in (16, 32, 64, 128):
        raise ValueError(f"head dim {dh} is not supported (16, 32, 64 or 128)")
    rope, qa, qb, qg, ka, kb, kg, inv, round_table = rope_arguments(q, k, q_rope, k_rope)
    if splits is None:
        splits = 1 if INTERPRET else split_count(bsz * heads, lq, lk, _sm_count(q.device))
    return torch.ops.mova_rt.fused_attention(q, k, v, wq, wk, eps, rope, qa, qb, ka, kb, inv,
                                             qg, kg, round_table, splits)


@torch.library.custom_op(
    "mova_rt::fused_attention", mutates_args=(),
    schema="(Tensor q, Tensor k, Tensor v, Tensor? wq, Tensor? wk, float eps, int rope, "
           "Tensor? qa, Tensor? qb, Tensor? ka, Tensor? kb, Tensor? inv, int[] q_geom, "
           "int[] k_geom, bool round_table, int splits) -> Tensor")
def _fused_attention_op(q, k, v, wq, wk, eps, rope, qa, qb, ka, kb, inv, q_geom, k_geom,
                        round_table, splits):
    bsz, lq, heads, dh = q.shape
    lk = k.shape[1]
    dev = q.device
    dummy = torch.empty(1, device=dev, dtype=torch.float32)
    qr = rms_rstd(q, eps) if wq is not None else dummy
    kr = rms_rstd(k, eps) if wk is not None else dummy
    chunk = triton.cdiv(triton.cdiv(lk, max(splits, 1)), 128) * 128
    s = max(triton.cdiv(lk, chunk), 1)
    out = torch.empty(bsz, lq, heads, dh, device=dev, dtype=q.dtype)
    op = lse = dummy
    if s > 1:
        op = torch.empty(s, bsz, heads, lq, dh, device=dev, dtype=torch.float32)
        lse = torch.empty(s, bsz, heads, lq, device=dev, dtype=torch.float32)

    def opt(t):
        return dummy if t is None else t
    args = (q, k, v, out, op, lse, qr, kr, opt(wq), opt(wk), opt(qa), opt(qb), opt(ka), opt(kb),
            opt(inv), lq, lk, heads, chunk, *q_geom, *k_geom,
            q.stride(0), q.stride(1), q.stride(2), k.stride(0), k.stride(1), k.stride(2),
            v.stride(0), v.stride(1), v.stride(2), out.stride(0), out.stride(1), out.stride(2),
            LOG2E / math.sqrt(dh))
    meta = dict(HEAD_DIM=dh, NORM_Q=wq is not None, NORM_K=wk is not None, ROPE=rope,
                ROUND_TABLE=round_table, SPLIT=s > 1, INTERPRET=INTERPRET)
    if INTERPRET:
        grid = (triton.cdiv(lq, INTERPRET_BLOCK), bsz * heads, s)
        _attention_kernel[grid](*args, BLOCK_M=INTERPRET_BLOCK, BLOCK_N=INTERPRET_BLOCK, **meta)
    else:
        grid = lambda m: (triton.cdiv(lq, m["BLOCK_M"]), bsz * heads, s)  # noqa: E731
        _attention_tuned[grid](*args, **meta)
    if s > 1:
        out.copy_(combine_splits(op, lse))
    return out


@_fused_attention_op.register_fake
def _(q, k, v, wq, wk, eps, rope, qa, qb, ka, kb, inv, q_geom, k_geom, round_table, splits):
    return q.new_empty(q.shape)
