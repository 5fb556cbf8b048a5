"""In-register q/k RMSNorm + RoPE tile code for the fused 8-bit attention prologue
(kernels/attention_int8.py), from the first fused bf16 attention kernel.

A tile of [rows, D] of one head is loaded, normalised over all heads (per-token rstd, fp32) and
rotated, as two halves (a, b) with q . k = a_q . a_k + b_q . b_k, rounded to bf16 where the eager
path rounds. RoPE variants (compact tables, computed per tile):
- ROPE_NONE: text cross-attention.
- ROPE_INTERLEAVED (DiT self-attention): pairs (2i, 2i+1) rotated by angle(l, i); the token index
  l splits into up to three axes (frame, row, column; audio: one axis) and pair i belongs to one
  axis; cos/sin from per-axis fp32 tables [A0 + A1 + A2, D/2].
- ROPE_ROTATE_HALF (bridge): channel d pairs with d +- D/2; angle = pos(l) * inv_freq[d mod D/2]
  with pos(l) = frame_pos[l // tokens_per_frame], computed in fp32, cos/sin rounded to the table
  dtype as the reference's tables are.
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from ..rope import InterleavedRope, RotateHalfRope
from ._triton import round_bf16

ROPE_NONE, ROPE_INTERLEAVED, ROPE_ROTATE_HALF = 0, 1, 2


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
