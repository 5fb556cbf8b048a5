"""8-bit attention (the SageAttention recipe): softmax(q k^T / sqrt(D)) v with q and k in int8,
quantized per block, and k smoothed; p and v in bf16.

    k_s   = k - mean_L(k)               per (batch, head): shifts every logit of a query row by
                                        the same q . mean, so the softmax is unchanged, while the
                                        values left to quantize lose their common offset
    q_q, s_q = int8(q), amax / 127      per (batch, head, BLOCK_M queries), round half to even
    k_q, s_k = int8(k_s), amax / 127    per (batch, head, BLOCK_N keys)
    logits = (q_q . k_q) * s_q * s_k / sqrt(D)   (int8 tensor-core dot, exact int32 sums)

int8 rather than e4m3 for q and k: 8 significant bits against e4m3's 4 make the logits ~8x more
precise at the same speed (random inputs: 1.3% against 3.5% relative error of the output; bf16
attention itself 0.6%; without the smoothing 2.2-2.5%).
    online softmax in base 2 (fp32), p in bf16 (fp32 in the interpreter) times v (bf16)

Shapes: q [B, Lq, H, D], k/v [B, Lk, H, D] bf16 (rows strided as the model's views); out
[B, Lq, H, D] bf16.

The DiTs and the bridge reach it through `fused_attention_int8` (the kernel set
`triton-int8attn`): q/k RMSNorm and RoPE fused with the quantization (the tile code of
kernels/rope_tiles.py, `_prepare_tile`), in a prologue kernel per side that reads the bf16
projection once and writes int8 + one scale per block:

    k: pass 1 sums the normalised, rotated k per block (fp32 partials -> the mean over L);
       pass 2 normalises and rotates again, subtracts the mean, quantizes
    q: one pass (not smoothed)

The int8 rows are stored with the channels in the order the tile code holds them (even then odd
channels for interleaved RoPE; as is otherwise), the same order for q and k, so q . k is
unchanged; v and the output keep theirs. `attention_int8` (plain q, k, v: the Ulysses path)
quantizes in PyTorch (`quantize_qk`).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

from ..rope import InterleavedRope
from ._triton import INTERPRET
from .rope_tiles import (ROPE_INTERLEAVED, ROPE_NONE, _prepare_tile, rms_rstd, rope_arguments)

INT8_MAX = 127.0
LOG2E = 1.4426950408889634
BLOCK_M, BLOCK_N = (32, 32) if INTERPRET else (128, 64)


# --------------------------------------------------------------------------------------------
# 1. References
# --------------------------------------------------------------------------------------------
def _block_quantize(x: torch.Tensor, block: int) -> tuple:
    """[B, L, H, D] -> (int8 [B, L, H, D], fp32 scales [B, H, ceil(L / block)])."""
    b, l, h, d = x.shape
    pad = (-l) % block
    xp = F.pad(x.float(), (0, 0, 0, 0, 0, pad)).view(b, -1, block, h, d)
    amax = xp.abs().amax(dim=(2, 4))                                     # [B, nb, H]
    s = torch.where(amax > 0, amax / INT8_MAX, torch.ones_like(amax))
    q = torch.round(xp / s[:, :, None, :, None]).clamp(-INT8_MAX, INT8_MAX).to(torch.int8)
    return q.view(b, -1, h, d)[:, :l], s.transpose(1, 2).contiguous()


def quantize_qk(q: torch.Tensor, k: torch.Tensor, smooth: bool = True) -> tuple:
    """The prologue: k smoothed over its sequence, both quantized per block."""
    if smooth:
        k = k.float() - k.float().mean(dim=1, keepdim=True)
    q_q, s_q = _block_quantize(q, BLOCK_M)
    k_q, s_k = _block_quantize(k, BLOCK_N)
    return q_q, s_q, k_q, s_k


def attention_int8_ref(q, k, v, smooth: bool = True):
    """The same quantization in PyTorch, attention in fp32 over the dequantized q and k."""
    q_q, s_q, k_q, s_k = quantize_qk(q, k, smooth)
    qd = q_q.float() * s_q.transpose(1, 2).repeat_interleave(BLOCK_M, 1)[:, :q.shape[1], :, None]
    kd = k_q.float() * s_k.transpose(1, 2).repeat_interleave(BLOCK_N, 1)[:, :k.shape[1], :, None]
    out = F.scaled_dot_product_attention(qd.transpose(1, 2), kd.transpose(1, 2),
                                         v.float().transpose(1, 2))
    return out.transpose(1, 2).to(v.dtype)


# --------------------------------------------------------------------------------------------
# 2. The kernel
# --------------------------------------------------------------------------------------------
@triton.jit
def _attention_int8_kernel(
    q_ptr, k_ptr, v_ptr, o_ptr, sq_ptr, sk_ptr,
    H, LQ, LK, NQB, NKB, qk_scale,
    stride_qb, stride_ql, stride_qh, stride_kb, stride_kl, stride_kh,
    stride_vb, stride_vl, stride_vh, stride_ob, stride_ol, stride_oh,
    HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    INTERPRET: tl.constexpr,
):
    pid_m = tl.program_id(0)
    bh = tl.program_id(1)
    b = bh // H
    h = bh % H
    rm = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    rd = tl.arange(0, HEAD_DIM)
    mask_m = rm < LQ
    q = tl.load(q_ptr + b * stride_qb + h * stride_qh + rm[:, None] * stride_ql + rd[None, :],
                mask=mask_m[:, None], other=0)                           # int8 [BM, D]
    s_q = tl.load(sq_ptr + bh * NQB + pid_m)
    m_i = tl.full((BLOCK_M,), float("-inf"), dtype=tl.float32)
    l_i = tl.zeros((BLOCK_M,), dtype=tl.float32)
    acc = tl.zeros((BLOCK_M, HEAD_DIM), dtype=tl.float32)
    for nb in range(0, NKB):
        rn = nb * BLOCK_N + tl.arange(0, BLOCK_N)
        mask_n = rn < LK
        k = tl.load(k_ptr + b * stride_kb + h * stride_kh + rn[None, :] * stride_kl + rd[:, None],
                    mask=mask_n[None, :], other=0)                       # int8 [D, BN]
        s_k = tl.load(sk_ptr + bh * NKB + nb)
        s = tl.dot(q, k, out_dtype=tl.int32).to(tl.float32) * (s_q * s_k * qk_scale)  # log2
        s = tl.where(mask_n[None, :], s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, axis=1))
        alpha = tl.exp2(m_i - m_new)
        p = tl.exp2(s - m_new[:, None])
        l_i = l_i * alpha + tl.sum(p, axis=1)
        v = tl.load(v_ptr + b * stride_vb + h * stride_vh + rn[:, None] * stride_vl + rd[None, :],
                    mask=mask_n[:, None], other=0.0)
        if INTERPRET:       # the interpreter's bf16 dot is wrong: fp32 operands there
            acc = acc * alpha[:, None] + tl.dot(p.to(tl.bfloat16).to(tl.float32),
                                                v.to(tl.float32))
        else:
            acc = acc * alpha[:, None] + tl.dot(p.to(tl.bfloat16), v.to(tl.bfloat16))
        m_i = m_new
    out = acc / l_i[:, None]
    tl.store(o_ptr + b * stride_ob + h * stride_oh + rm[:, None] * stride_ol + rd[None, :],
             out.to(o_ptr.dtype.element_ty), mask=mask_m[:, None])


def attention_int8(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                  smooth: bool = True) -> torch.Tensor:
    """8-bit attention (module docstring); q [B, Lq, H, D], k/v [B, Lk, H, D] bf16 -> bf16."""
    d, h = q.shape[3], q.shape[2]
    if d not in (32, 64, 128) or k.shape[3] != d or v.shape != k.shape or k.shape[2] != h:
        raise ValueError(f"attention_int8: q {tuple(q.shape)}, k {tuple(k.shape)}, v "
                         f"{tuple(v.shape)}: head dims 32/64/128, matching k and v")
    q_q, s_q, k_q, s_k = quantize_qk(q, k, smooth)
    return _attention(q_q.contiguous(), s_q, k_q.contiguous(), s_k, v)


def _attention(q_q, s_q, k_q, s_k, v):
    """The kernel on quantized q/k (int8 [B, L, H, D], scales [B, H, nb]) and bf16 v."""
    bsz, lq, h, d = q_q.shape
    lk = k_q.shape[1]
    out = torch.empty((bsz, lq, h, d), dtype=v.dtype, device=v.device)
    nqb, nkb = triton.cdiv(lq, BLOCK_M), triton.cdiv(lk, BLOCK_N)
    grid = (nqb, bsz * h)
    _attention_int8_kernel[grid](
        q_q, k_q, v, out, s_q, s_k,
        h, lq, lk, nqb, nkb, LOG2E / math.sqrt(d),
        q_q.stride(0), q_q.stride(1), q_q.stride(2), k_q.stride(0), k_q.stride(1), k_q.stride(2),
        v.stride(0), v.stride(1), v.stride(2), out.stride(0), out.stride(1), out.stride(2),
        HEAD_DIM=d, BLOCK_M=BLOCK_M, BLOCK_N=BLOCK_N, INTERPRET=INTERPRET,
        num_warps=4 if INTERPRET else 8, num_stages=1 if INTERPRET else 3)
    return out


# --------------------------------------------------------------------------------------------
# 3. The fused prologue: RMSNorm + RoPE + (smoothing) + int8 per block, and its reference
# --------------------------------------------------------------------------------------------
@triton.jit
def _round_half_even(v):
    """Nearest integer, ties to even, of fp32 |v| < 2^22 (torch.round): adding and removing
    1.5 * 2^23 leaves no fraction bits, so the FPU's round-to-nearest-even does the rounding."""
    return (v + 12582912.0) - 12582912.0


@triton.jit
def _qk_prologue_kernel(
        X, OUT, SCALE, PSUM, MEAN, RSTD, W, TA, TB, INV,
        G0, G1, G2, G3, G4, L, H, NB,
        sxb, sxl, sxh, sob, sol, soh,
        HEAD_DIM: tl.constexpr, BLOCK: tl.constexpr, NORM: tl.constexpr, ROPE: tl.constexpr,
        ROUND_TABLE: tl.constexpr, SUM_PASS: tl.constexpr, SMOOTH: tl.constexpr):
    """One (block of BLOCK rows, batch x head): SUM_PASS writes the block's column sums of the
    normalised, rotated rows to PSUM [B*H, NB, D]; otherwise (minus MEAN [B*H, D] when SMOOTH)
    int8 rows to OUT and the block's scale amax / 127 to SCALE [B*H, NB]."""
    pid = tl.program_id(0)
    bh = tl.program_id(1)
    b = bh // H
    h = bh % H
    HALF: tl.constexpr = HEAD_DIM // 2
    j = tl.arange(0, HALF)
    rows = pid * BLOCK + tl.arange(0, BLOCK)
    ok = rows < L
    a, c = _prepare_tile(X + b * sxb + h * sxh, rows, ok, sxl, h, RSTD + b * L, W, TA, TB, INV,
                         G0, G1, G2, G3, G4, HEAD_DIM, NORM, ROPE, ROUND_TABLE)
    if SUM_PASS:
        base = PSUM + (bh * NB + pid) * HEAD_DIM
        tl.store(base + j, tl.sum(tl.where(ok[:, None], a, 0.0), axis=0))
        tl.store(base + HALF + j, tl.sum(tl.where(ok[:, None], c, 0.0), axis=0))
    else:
        if SMOOTH:
            a = a - tl.load(MEAN + bh * HEAD_DIM + j)[None, :]
            c = c - tl.load(MEAN + bh * HEAD_DIM + HALF + j)[None, :]
        a = tl.where(ok[:, None], a, 0.0)
        c = tl.where(ok[:, None], c, 0.0)
        amax = tl.maximum(tl.max(tl.max(tl.abs(a), axis=1), axis=0),
                          tl.max(tl.max(tl.abs(c), axis=1), axis=0))
        s = tl.where(amax > 0, tl.math.div_rn(amax, 127.0), 1.0)
        qa = tl.minimum(tl.maximum(_round_half_even(tl.math.div_rn(a, s + tl.zeros_like(a))),
                                   -127.0), 127.0)
        qc = tl.minimum(tl.maximum(_round_half_even(tl.math.div_rn(c, s + tl.zeros_like(c))),
                                   -127.0), 127.0)
        base = OUT + b * sob + h * soh + rows[:, None] * sol
        tl.store(base + j[None, :], qa.to(tl.int8), mask=ok[:, None])
        tl.store(base + HALF + j[None, :], qc.to(tl.int8), mask=ok[:, None])
        tl.store(SCALE + bh * NB + pid, s)


def channel_order(head_dim: int, interleaved: bool) -> torch.Tensor:
    """The channel order of the prologue's int8 rows: even channels then odd ones for the
    interleaved RoPE (the pairs split in halves), the identity otherwise."""
    if interleaved:
        return torch.cat([torch.arange(0, head_dim, 2), torch.arange(1, head_dim, 2)])
    return torch.arange(head_dim)


def prologue_ref(x, w, eps, rope, block: int, smooth: bool) -> tuple:
    """The prologue in PyTorch: (int8 [B, L, H, D] in channel_order, scales [B, H, nb]) of
    RMSNorm (w None: none) then RoPE (float32, as the composed kernel sets), k smoothed."""
    from ..ops import rms_norm_heads, rope_interleaved_f32
    from ..rope import apply_rope_rotate_half
    if w is not None:
        x = rms_norm_heads(x, w, eps)
    if isinstance(rope, InterleavedRope):
        x = rope_interleaved_f32(x, *rope.tables())
    elif rope is not None:
        x = apply_rope_rotate_half(x, *rope.tables())
    if smooth:
        x = x.float() - x.float().mean(dim=1, keepdim=True)
    q, sc = _block_quantize(x, block)
    return q[..., channel_order(x.shape[3], isinstance(rope, InterleavedRope))], sc


def _prologue(x, w, eps, rope_kind, ta, tb, inv, geom, round_table, block, smooth):
    """The launcher: (int8 [B, L, H, D] in channel_order, fp32 scales [B, H, nb])."""
    bsz, length, heads, d = x.shape
    nb = triton.cdiv(length, block)
    dev = x.device
    dummy = torch.empty(1, device=dev, dtype=torch.float32)
    rstd = rms_rstd(x, eps) if w is not None else dummy
    out = torch.empty((bsz, length, heads, d), dtype=torch.int8, device=dev)
    scale = torch.empty((bsz, heads, nb), dtype=torch.float32, device=dev)

    def opt(t):
        return dummy if t is None else t
    args = [x, out, scale, None, None, rstd, opt(w), opt(ta), opt(tb), opt(inv), *geom,
            length, heads, nb, x.stride(0), x.stride(1), x.stride(2),
            out.stride(0), out.stride(1), out.stride(2)]
    meta = dict(HEAD_DIM=d, BLOCK=block, NORM=w is not None, ROPE=rope_kind,
                ROUND_TABLE=round_table, num_warps=4)
    grid = (nb, bsz * heads)
    mean = dummy
    if smooth:
        psum = torch.empty((bsz * heads, nb, d), dtype=torch.float32, device=dev)
        args[3], args[4] = psum, dummy
        _qk_prologue_kernel[grid](*args, SUM_PASS=True, SMOOTH=False, **meta)
        mean = psum.sum(dim=1) / length                                   # [B*H, D], fp32
    args[3], args[4] = dummy, mean
    _qk_prologue_kernel[grid](*args, SUM_PASS=False, SMOOTH=smooth, **meta)
    return out, scale


def fused_attention_int8(q, k, v, wq=None, wk=None, eps: float = 1e-6, q_rope=None, k_rope=None,
                         smooth: bool = True) -> torch.Tensor:
    """8-bit attention of the raw projections: q/k RMSNorm over all heads (weights wq/wk, or
    None), RoPE (InterleavedRope for both, RotateHalfRope or None per side), k smoothed, int8 per
    block, then the int8 kernel. q [B, Lq, H, D], k/v [B, Lk, H, D] bf16 (views of [B, L, H*D])
    -> bf16."""
    bsz, lq, h, d = q.shape
    lk = k.shape[1]
    if d not in (32, 64, 128) or k.shape != (bsz, lk, h, d) or v.shape != k.shape:
        raise ValueError(f"fused_attention_int8: q {tuple(q.shape)}, k {tuple(k.shape)}, v "
                         f"{tuple(v.shape)}: head dims 32/64/128, matching k and v")
    if not (q.dtype == k.dtype == v.dtype == torch.bfloat16):
        raise ValueError("fused_attention_int8: q, k, v must be bf16")
    rope, qa, qb, qg, ka, kb, kg, inv, round_table = rope_arguments(q, k, q_rope, k_rope)
    q_q, s_q = _prologue(q, wq, eps, rope, qa, qb, inv, qg, round_table, BLOCK_M, False)
    k_q, s_k = _prologue(k, wk, eps, rope, ka, kb, inv, kg, round_table, BLOCK_N, smooth)
    return _attention(q_q, s_q, k_q, s_k, v)


# --------------------------------------------------------------------------------------------
# 3. Compile cases for sm_90 / sm_89
# --------------------------------------------------------------------------------------------
def _case(d):
    sig = {"q_ptr": "*i8", "k_ptr": "*i8", "v_ptr": "*bf16", "o_ptr": "*bf16",
           "sq_ptr": "*fp32", "sk_ptr": "*fp32",
           "H": "i32", "LQ": "i32", "LK": "i32", "NQB": "i32", "NKB": "i32", "qk_scale": "fp32",
           **{f"stride_{t}{a}": "i32" for t in "qkvo" for a in "blh"},
           "HEAD_DIM": "constexpr", "BLOCK_M": "constexpr", "BLOCK_N": "constexpr",
           "INTERPRET": "constexpr"}
    return {"name": f"attention_int8_d{d}", "kernel": _attention_int8_kernel, "signature": sig,
            "constexprs": {"HEAD_DIM": d, "BLOCK_M": 128, "BLOCK_N": 64, "INTERPRET": False},
            "num_warps": 8, "num_stages": 3, "archs": [90, 89]}


def _prologue_case(rope, sum_pass):
    sig = {"X": "*bf16", "OUT": "*i8", "SCALE": "*fp32", "PSUM": "*fp32", "MEAN": "*fp32",
           "RSTD": "*fp32", "W": "*bf16", "TA": "*fp32", "TB": "*fp32", "INV": "*fp32",
           **{f"G{i}": "i32" for i in range(5)}, "L": "i32", "H": "i32", "NB": "i32",
           **{f"s{t}{a}": "i32" for t in "xo" for a in "blh"},
           **{c: "constexpr" for c in ("HEAD_DIM", "BLOCK", "NORM", "ROPE", "ROUND_TABLE",
                                       "SUM_PASS", "SMOOTH")}}
    consts = {"HEAD_DIM": 128, "BLOCK": 64, "NORM": True, "ROPE": rope, "ROUND_TABLE": rope == 2,
              "SUM_PASS": sum_pass, "SMOOTH": not sum_pass}
    return {"name": f"qk_prologue_rope{rope}_{'sum' if sum_pass else 'quantize'}",
            "kernel": _qk_prologue_kernel, "signature": sig, "constexprs": consts,
            "num_warps": 4, "num_stages": 1, "archs": [90, 89]}


COMPILE_CASES = [_case(128), _case(64)] + [
    _prologue_case(rope, sum_pass) for rope in (ROPE_NONE, ROPE_INTERLEAVED, 2)
    for sum_pass in (True, False)]
