"""8-bit attention for Hopper: both products on e4m3 tensor cores (wgmma e4m3 x e4m3 -> fp32).

    out = softmax(q k^T / sqrt(D)) v,  q [B, Lq, H, D], k/v [B, Lk, H, D] bf16 -> out bf16,
    D = 32, 64 or 128, any strides with a contiguous last dim (as kernels/attention.py).

Quantization (the prologue: Triton, one quantizing pass over each tensor after one statistics
pass over k and v):

    k_s      = k - mean_L(k)                 per (batch, head, channel), optional (smooth_k):
                                             shifts every logit of a query row by q . mean, so
                                             the softmax is unchanged
    q8, s_q  = e4m3(q * 448 / amax), amax / 448 * log2(e) / sqrt(D)
                                             per (batch, head, Q_BLOCK = 64 queries); the softmax
                                             scale and base change ride on s_q
    k8, s_k  = e4m3(k_s * 448 / amax), amax / 448     per (batch, head, K_BLOCK = 128 keys)
    v8^T,s_v = e4m3(v * 448 / amax_L), amax_L / 448   per (batch, head, channel); stored
                                             transposed [B, H, D, Lk_pad] so the PV product's B
                                             operand is K-major, as the fp8 wgmma requires

(amax of a block of zeros: scale 1). q8/k8 are [B, H, L, D]; scales fp32.

The kernel (FlashAttention-2 schedule as kernels/attention.py, split-KV for small Lq likewise):

    s     = (q8 k8_j^T) * s_q[row] * s_k[j]          log2 units (one FMA with the exp below)
    m'    = max(m, rowmax(s))
    p     = exp2(s - m' + log2(448))                 in [0, 448]: e4m3's full range, for free
    l     = l * alpha + rowsum(p),  alpha = exp2(m - m')
    pv    = e4m3(p) v8_j                             fresh fp32 accumulator per tile
    acc   = acc * alpha + pv
    out   = acc * s_v[channel] / l                   (the 448 cancels)

Why pv is not accumulated in place (unlike the bf16 kernel): Hopper's fp8 wgmma accumulates with
about 14 significant bits (DeepSeek-V3 report, sec. 3.3.2; SageAttention2 sec. 4.4); over 43,120
keys (~1,350 k32 steps) the truncations would bias the sum by percents, so each tile's product
(at most 4 steps) is added to the fp32 accumulator in registers.

Error (measured in tests/test_kernels_attention_fp8.py): e4m3 keeps 3 mantissa bits (~2.6% rms
per rounded value). With random q/k of std 1 (logit std 1) and random, uncorrelated v, the
output's relative error is the weights' own: ~3.7% from q/k (the logits), ~2.6% from p, ~2.6%
from v, 5.0-5.7% relative (Frobenius) in all, at every MOVA shape, where bf16 SDPA has ~0.23%.
Larger logits cost more (q/k std 2: ~11%, the q/k part grows with them); values with a common
component (as real ones have) much less (v mean 1: 0.25-0.6%).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

from ._triton import INTERPRET, SHARED_MEMORY_LIMIT, round_bf16, round_e4m3
from .attention import (HEAD_DIMS, INTERPRET_BLOCK_N, LOG2E, _signature, _sm_count,
                        all_configs, autotuned, check_qkv, config_fits, launch, launch_split,
                        small_and_large, split_count, tma_scratch)  # noqa: F401

E4M3 = torch.float8_e4m3fn
E4M3_MAX = 448.0
LOG2_E4M3_MAX = math.log2(E4M3_MAX)
_LOG2_448 = tl.constexpr(LOG2_E4M3_MAX)        # the same, for the kernels
Q_BLOCK, K_BLOCK = 64, 128          # quantization blocks (tokens); K_BLOCK >= every BLOCK_N
STATS_BLOCK = 128                   # keys per program of the statistics and v passes
PROLOGUE_SUB = 32                   # rows per sweep of the q/k quantizing pass
PROLOGUE_WARPS = 8                  # the statistics and v passes hold [128, D] tiles


# ---------------------------------------------------------------------------------------------
# 1. References: the same quantization in PyTorch, and attention over it
# ---------------------------------------------------------------------------------------------
def e4m3_scales(amax: torch.Tensor) -> tuple:
    """(448 / amax, amax / 448), 1 where amax is 0: IEEE fp32 divisions of two tensors, as the
    kernels' div_rn (torch turns `scalar / tensor` into a reciprocal and a product: two
    roundings)."""
    top = torch.full_like(amax, E4M3_MAX)
    ok = amax > 0
    one = torch.ones_like(amax)
    return torch.where(ok, top / amax, one), torch.where(ok, amax / top, one)


def _quantize_blocks(x: torch.Tensor, block: int, scale_mul: float = 1.0) -> tuple:
    """x [B, H, L, D] fp32 -> (e4m3 [B, H, L, D], fp32 scales [B, H, ceil(L / block)])."""
    b, h, length, d = x.shape
    xp = F.pad(x, (0, 0, 0, (-length) % block)).view(b, h, -1, block, d)
    inv, scale = e4m3_scales(xp.abs().amax(dim=(3, 4)))                # [B, H, nb]
    codes = (xp * inv[..., None, None]).clamp(-E4M3_MAX, E4M3_MAX).to(E4M3)
    return codes.view(b, h, -1, d)[:, :, :length], scale * scale_mul


def quantize_qkv_ref(q, k, v, smooth_k: bool = True) -> tuple:
    """(q8, s_q, k8, s_k, v8 [B, H, Lk, D] (not transposed), s_v [B, H, D]) as the prologue."""
    d = q.shape[3]
    qh, kh, vh = (x.float().transpose(1, 2) for x in (q, k, v))        # [B, H, L, D]
    if smooth_k:
        kh = kh - kh.mean(dim=2, keepdim=True)
    q8, s_q = _quantize_blocks(qh, Q_BLOCK, LOG2E / math.sqrt(d))
    k8, s_k = _quantize_blocks(kh, K_BLOCK)
    inv, s_v = e4m3_scales(vh.abs().amax(dim=2))                      # [B, H, D]
    v8 = (vh * inv[:, :, None]).clamp(-E4M3_MAX, E4M3_MAX).to(E4M3)
    return q8, s_q, k8, s_k, v8, s_v


def attention_fp8_ref(q, k, v, smooth_k: bool = True, block_n: int | None = None) -> torch.Tensor:
    """The kernel's arithmetic in fp32 PyTorch on quantize_qkv_ref's codes: logits
    s = (q8 . k8) * (s_q * s_k), p = exp2(s - (m - log2(448))) rounded to e4m3, l from the
    unrounded p. block_n=None: m is the final row max; block_n=n: the kernel's online softmax
    over tiles of n keys (running max, p rounded against it: what one unsplit program does).
    Returns bf16 [B, Lq, H, D]."""
    q8, s_q, k8, s_k, v8, s_v = quantize_qkv_ref(q, k, v, smooth_k)
    lq, lk = q.shape[1], k.shape[1]
    a = (s_q.repeat_interleave(Q_BLOCK, dim=2)[:, :, :lq, None]
         * s_k.repeat_interleave(K_BLOCK, dim=2)[:, :, None, :lk])
    s = (q8.float() @ k8.float().transpose(2, 3)) * a                # [B, H, Lq, Lk], log2
    v8 = v8.float()
    step = block_n or lk
    m = torch.full(s.shape[:3], float("-inf"), device=s.device)
    l = torch.zeros(s.shape[:3], device=s.device)
    acc = torch.zeros(s.shape[:3] + (v8.shape[3],), device=s.device)
    for j in range(0, lk, step):
        sj = s[..., j:j + step]
        m_new = torch.maximum(m, sj.amax(dim=3))
        p = torch.exp2(sj - (m_new - LOG2_E4M3_MAX)[..., None])
        alpha = torch.exp2(m - m_new)
        l = l * alpha + p.sum(dim=3)
        acc = acc * alpha[..., None] + p.clamp(max=E4M3_MAX).to(E4M3).float() @ v8[:, :, j:j + step]
        m = m_new
    out = acc * (s_v[:, :, None, :] / l[..., None])
    return out.transpose(1, 2).to(torch.bfloat16)


# ---------------------------------------------------------------------------------------------
# 2. Prologue kernels
# ---------------------------------------------------------------------------------------------
@triton.jit
def _to_e4m3(x, INTERPRET: tl.constexpr):
    """fp32 -> e4m3, round to nearest even, saturating at +-448: on GPUs one cvt.rn.satfinite per
    pair; the interpreter's cast misrounds at power-of-two edges, so there the value is clamped
    and rounded by bit arithmetic first."""
    if INTERPRET:
        x = round_e4m3(tl.minimum(tl.maximum(x, -448.0), 448.0))
    return x.to(tl.float8e4nv)


@triton.jit
def _kv_stats_kernel(K, V, KSUM, VMAX,                             # pointers
                     Lk, NSB,                                       # sizes
                     skb, skn, skh, svb, svn, svh,                  # strides
                     HEAD_DIM: tl.constexpr, BLOCK: tl.constexpr, SMOOTH: tl.constexpr):
    """Grid (NSB, H, B): per block of BLOCK keys, the column sums of k (SMOOTH) and the column
    amax of |v|, to KSUM / VMAX [B, H, NSB, D] fp32."""
    blk = tl.program_id(0)
    h = tl.program_id(1)
    b = tl.program_id(2).to(tl.int64)
    rows = blk * BLOCK + tl.arange(0, BLOCK)
    ok = rows[:, None] < Lk
    d = tl.arange(0, HEAD_DIM)
    out = ((b * tl.num_programs(1) + h) * NSB + blk) * HEAD_DIM + d
    v = tl.load(V + b * svb + h * svh + rows[:, None] * svn + d[None, :], mask=ok, other=0.0)
    tl.store(VMAX + out, tl.max(tl.abs(v.to(tl.float32)), axis=0))
    if SMOOTH:
        k = tl.load(K + b * skb + h * skh + rows[:, None] * skn + d[None, :], mask=ok, other=0.0)
        tl.store(KSUM + out, tl.sum(k.to(tl.float32), axis=0))


@triton.jit
def _load_rows(X, MEAN, r0, L, sx_row, SUB: tl.constexpr, HEAD_DIM: tl.constexpr,
               SMOOTH: tl.constexpr):
    """Rows [r0, r0 + SUB) of one (batch, head) plane as fp32 (minus MEAN), zero past L."""
    rows = r0 + tl.arange(0, SUB)
    d = tl.arange(0, HEAD_DIM)
    ok = rows[:, None] < L
    x = tl.load(X + rows[:, None] * sx_row + d[None, :], mask=ok, other=0.0).to(tl.float32)
    if SMOOTH:
        x = tl.where(ok, x - tl.load(MEAN + d)[None, :], 0.0)
    return x, rows, ok


@triton.jit
def _quantize_rows_kernel(X, MEAN, OUT, SCALE,                     # pointers
                          L, NB,                                    # sizes
                          sxb, sxl, sxh,                            # strides
                          scale_mul,                                # meta
                          HEAD_DIM: tl.constexpr, BLOCK: tl.constexpr, SUB: tl.constexpr,
                          SMOOTH: tl.constexpr, INTERPRET: tl.constexpr):
    """Grid (NB, H, B): rows [blk * BLOCK, +BLOCK) of x [B, L, H, D] (minus MEAN [B, H, D] when
    SMOOTH) -> e4m3 OUT [B, H, L, D] and SCALE [B, H, NB] = amax / 448 * scale_mul. Two sweeps
    of SUB rows (amax, then codes; the second reads the block again from cache), so a thread
    holds SUB * D / threads values, not the whole block."""
    blk = tl.program_id(0)
    h = tl.program_id(1)
    b = tl.program_id(2).to(tl.int64)
    bh = b * tl.num_programs(1) + h
    Xp = X + b * sxb + h * sxh
    MEANp = MEAN + bh * HEAD_DIM
    amax = 0.0
    for r0 in range(blk * BLOCK, blk * BLOCK + BLOCK, SUB):
        x, rows, ok = _load_rows(Xp, MEANp, r0, L, sxl, SUB, HEAD_DIM, SMOOTH)
        amax = tl.maximum(amax, tl.max(tl.max(tl.abs(x), axis=1), axis=0))
    # IEEE divisions (a plain `/` is the approximate div.full on GPUs), once per block.
    inv = tl.where(amax > 0, tl.math.div_rn(448.0, amax), 1.0)
    scale = tl.where(amax > 0, tl.math.div_rn(amax, 448.0), 1.0)
    for r0 in range(blk * BLOCK, blk * BLOCK + BLOCK, SUB):
        x, rows, ok = _load_rows(Xp, MEANp, r0, L, sxl, SUB, HEAD_DIM, SMOOTH)
        codes = _to_e4m3(x * inv, INTERPRET)
        tl.store(OUT + (bh * L + rows[:, None]) * HEAD_DIM + tl.arange(0, HEAD_DIM)[None, :],
                 codes, mask=ok)
    tl.store(SCALE + bh * NB + blk, scale * scale_mul)


@triton.jit
def _quantize_v_kernel(V, INV, VT,                                 # pointers
                       Lk, LPAD,                                    # sizes
                       svb, svn, svh,                               # strides
                       HEAD_DIM: tl.constexpr, BLOCK: tl.constexpr, INTERPRET: tl.constexpr):
    """Grid (cdiv(LPAD, BLOCK), H, B): v [B, Lk, H, D] * INV [B, H, D] -> e4m3, written
    transposed to VT [B, H, D, LPAD] (columns Lk..LPAD zero)."""
    blk = tl.program_id(0)
    h = tl.program_id(1)
    b = tl.program_id(2).to(tl.int64)
    bh = b * tl.num_programs(1) + h
    rows = blk * BLOCK + tl.arange(0, BLOCK)
    d = tl.arange(0, HEAD_DIM)
    v = tl.load(V + b * svb + h * svh + rows[:, None] * svn + d[None, :],
                mask=rows[:, None] < Lk, other=0.0).to(tl.float32)
    x = v * tl.load(INV + bh * HEAD_DIM + d)[None, :]
    codes = _to_e4m3(x, INTERPRET)
    tl.store(VT + (bh * HEAD_DIM + d[None, :]) * LPAD + rows[:, None], codes,
             mask=rows[:, None] < LPAD)


# ---------------------------------------------------------------------------------------------
# 3. The attention kernel
# ---------------------------------------------------------------------------------------------
@triton.jit
def _tile_fp8(acc, m_i, l_i, q, sq, k_desc, vt_desc, SK, n0, end,
              BLOCK_N: tl.constexpr, K_BLOCK: tl.constexpr, MASK: tl.constexpr,
              INTERPRET: tl.constexpr):
    """One key tile (module docstring); MASK only for the partial tile."""
    s = tl.dot(q, k_desc.load([n0, 0]).T)                          # e4m3 wgmma, fp32
    if MASK:
        s = tl.where((n0 + tl.arange(0, BLOCK_N) < end)[None, :], s, float("-inf"))
    a = sq * tl.load(SK + n0 // K_BLOCK)                           # [BLOCK_M], > 0
    m_new = tl.maximum(m_i, tl.max(s, axis=1) * a)
    p = tl.math.exp2(s * a[:, None] - (m_new - _LOG2_448)[:, None])
    alpha = tl.math.exp2(m_i - m_new)
    l_i = l_i * alpha + tl.sum(p, axis=1)
    p8 = _to_e4m3(p, INTERPRET)              # p <= 448 up to exp2's rounding: saturates
    pv = tl.dot(p8, vt_desc.load([0, n0]).T)                        # K-major B operand
    return acc * alpha[:, None] + pv, m_new, l_i


@triton.jit
def _attention_fp8_kernel(
        Q8, K8, VT8, SQ, SK, SV, O, OP, LSE,                      # pointers
        Lq, Lk, LPAD, NQB, NKB, CHUNK, LOG_SPLITS,                # sizes
        sob, som, soh,                                            # strides
        HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
        Q_BLOCK: tl.constexpr, K_BLOCK: tl.constexpr, SPLIT: tl.constexpr,
        INTERPRET: tl.constexpr):
    """Grid (cdiv(Lq, BLOCK_M) << LOG_SPLITS, H, B), as kernels/attention.py."""
    pid = tl.program_id(0)
    h = tl.program_id(1)
    b = tl.program_id(2).to(tl.int64)
    bh = b * tl.num_programs(1) + h
    split = pid & ((1 << LOG_SPLITS) - 1)
    m0 = (pid >> LOG_SPLITS) * BLOCK_M
    q_desc = tl.make_tensor_descriptor(Q8 + bh * Lq * HEAD_DIM, [Lq, HEAD_DIM], [HEAD_DIM, 1],
                                       [BLOCK_M, HEAD_DIM])
    k_desc = tl.make_tensor_descriptor(K8 + bh * Lk * HEAD_DIM, [Lk, HEAD_DIM], [HEAD_DIM, 1],
                                       [BLOCK_N, HEAD_DIM])
    vt_desc = tl.make_tensor_descriptor(VT8 + bh * HEAD_DIM * LPAD, [HEAD_DIM, Lk], [LPAD, 1],
                                        [HEAD_DIM, BLOCK_N])
    q = q_desc.load([m0, 0])
    rows = m0 + tl.arange(0, BLOCK_M)
    sq = tl.load(SQ + bh * NQB + rows // Q_BLOCK, mask=rows < Lq, other=1.0)
    SKbh = SK + bh * NKB

    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, HEAD_DIM], dtype=tl.float32)
    start = split * CHUNK
    end = tl.minimum(start + CHUNK, Lk)
    full_end = start + (end - start) // BLOCK_N * BLOCK_N
    for n0 in range(start, full_end, BLOCK_N):
        acc, m_i, l_i = _tile_fp8(acc, m_i, l_i, q, sq, k_desc, vt_desc, SKbh, n0, end,
                                  BLOCK_N, K_BLOCK, False, INTERPRET)
    if full_end < end:
        acc, m_i, l_i = _tile_fp8(acc, m_i, l_i, q, sq, k_desc, vt_desc, SKbh, full_end, end,
                                  BLOCK_N, K_BLOCK, True, INTERPRET)

    out = acc * (tl.load(SV + bh * HEAD_DIM + tl.arange(0, HEAD_DIM))[None, :] / l_i[:, None])
    if SPLIT:
        plane = (split * tl.num_programs(2) * tl.num_programs(1) + bh) * Lq
        op_desc = tl.make_tensor_descriptor(OP + plane * HEAD_DIM, [Lq, HEAD_DIM], [HEAD_DIM, 1],
                                            [BLOCK_M, HEAD_DIM])
        op_desc.store([m0, 0], out)
        # lse in the combine's units (log2 of the softmax sum): the 448 of p taken out
        tl.store(LSE + plane + rows, m_i + tl.math.log2(l_i) - _LOG2_448,
                 mask=rows < Lq)
    else:
        o_desc = tl.make_tensor_descriptor(O + b * sob + h * soh, [Lq, HEAD_DIM], [som, 1],
                                           [BLOCK_M, HEAD_DIM])
        if INTERPRET:
            out = round_bf16(out)
        o_desc.store([m0, 0], out.to(tl.bfloat16))


# ---------------------------------------------------------------------------------------------
# 4. Configs: the bf16 kernel's space and predicate, with 1-byte tiles and p, and two fp32
#    accumulators (acc and the tile's pv)
# ---------------------------------------------------------------------------------------------
def config_fits_fp8(cfg: triton.Config, head_dim: int,
                    shared_limit: int = SHARED_MEMORY_LIMIT[90]) -> bool:
    return config_fits(cfg, head_dim, shared_limit, elt=1, p_bytes=1, accumulators=2)


def configs_for(head_dim: int, shared_limit: int = SHARED_MEMORY_LIMIT[90]) -> list:
    return [c for c in all_configs() if config_fits_fp8(c, head_dim, shared_limit)]


_attention_fp8_tuned = autotuned(_attention_fp8_kernel, config_fits_fp8, "O")


# ---------------------------------------------------------------------------------------------
# 5. Launchers and custom op
# ---------------------------------------------------------------------------------------------
def quantize_qkv(q, k, v, smooth_k: bool = True) -> tuple:
    """The prologue on a GPU (or the interpreter): (q8 [B, H, Lq, D], s_q [B, H, nqb], k8, s_k,
    v8^T [B, H, D, Lk_pad], s_v [B, H, D]), as quantize_qkv_ref (v8 transposed, padded)."""
    bsz, lq, heads, d = q.shape
    lk = k.shape[1]
    dev = q.device
    nsb = triton.cdiv(lk, STATS_BLOCK)
    stats = torch.empty(2, bsz, heads, nsb, d, device=dev, dtype=torch.float32)
    _kv_stats_kernel[(nsb, heads, bsz)](
        k, v, stats[0], stats[1], lk, nsb, k.stride(0), k.stride(1), k.stride(2),
        v.stride(0), v.stride(1), v.stride(2), HEAD_DIM=d, BLOCK=STATS_BLOCK, SMOOTH=smooth_k,
        num_warps=PROLOGUE_WARPS)
    mean = stats[0].sum(dim=2) / lk if smooth_k else stats[0, :, :, 0]          # [B, H, D]
    inv_v, s_v = e4m3_scales(stats[1].amax(dim=2))                   # [B, H, D]

    def rows(x, block, smooth, scale_mul):
        length = x.shape[1]
        nb = triton.cdiv(length, block)
        out = torch.empty(bsz, heads, length, d, device=dev, dtype=E4M3)
        scale = torch.empty(bsz, heads, nb, device=dev, dtype=torch.float32)
        _quantize_rows_kernel[(nb, heads, bsz)](
            x, mean.contiguous(), out, scale, length, nb, x.stride(0), x.stride(1), x.stride(2),
            scale_mul, HEAD_DIM=d, BLOCK=block, SUB=PROLOGUE_SUB, SMOOTH=smooth,
            INTERPRET=INTERPRET, num_warps=4)
        return out, scale

    q8, s_q = rows(q, Q_BLOCK, False, LOG2E / math.sqrt(d))
    k8, s_k = rows(k, K_BLOCK, smooth_k, 1.0)
    lpad = triton.cdiv(lk, 16) * 16                     # 16-byte rows for the TMA descriptor
    vt = torch.empty(bsz, heads, d, lpad, device=dev, dtype=E4M3)
    _quantize_v_kernel[(triton.cdiv(lpad, STATS_BLOCK), heads, bsz)](
        v, inv_v, vt, lk, lpad, v.stride(0), v.stride(1), v.stride(2), HEAD_DIM=d,
        BLOCK=STATS_BLOCK, INTERPRET=INTERPRET, num_warps=PROLOGUE_WARPS)
    return q8, s_q, k8, s_k, vt, s_v


def attention_fp8(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, smooth_k: bool = True,
                  splits: int | None = None) -> torch.Tensor:
    """softmax(q k^T / sqrt(D)) v with q, k, p, v in e4m3 (module docstring). q [B, Lq, H, D],
    k/v [B, Lk, H, D] bf16, any strides with a contiguous last dim; D 32, 64 or 128. splits: key
    splits (power of two; None: chosen to fill the GPU). Returns [B, Lq, H, D] bf16."""
    check_qkv("attention_fp8", q, k, v)
    if splits is None:
        splits = split_count(q.shape[0] * q.shape[2], q.shape[1], k.shape[1],
                             _sm_count(q.device))
    return torch.ops.mova_rt.attention_fp8(q, k, v, smooth_k,
                                           1 << (max(int(splits), 1).bit_length() - 1))


@torch.library.custom_op("mova_rt::attention_fp8", mutates_args=())
def _attention_fp8_op(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, smooth_k: bool,
                      splits: int) -> torch.Tensor:
    bsz, lq, heads, d = q.shape
    lk = k.shape[1]
    q8, s_q, k8, s_k, vt, s_v = quantize_qkv(q, k, v, smooth_k)
    out = torch.empty(bsz, lq, heads, d, device=q.device, dtype=torch.bfloat16)
    if not INTERPRET:
        triton.set_allocator(tma_scratch(q.device))

    def run(op, lse, chunk, log_splits):
        args = (q8, k8, vt, s_q, s_k, s_v, out, op, lse, lq, lk, vt.shape[3], s_q.shape[2],
                s_k.shape[2], chunk, log_splits, out.stride(0), out.stride(1), out.stride(2))
        meta = dict(HEAD_DIM=d, Q_BLOCK=Q_BLOCK, K_BLOCK=K_BLOCK, SPLIT=log_splits > 0,
                    INTERPRET=INTERPRET)
        launch(_attention_fp8_kernel, _attention_fp8_tuned, args, meta, lq, heads, bsz,
               log_splits)

    launch_split(run, lq, lk, heads, bsz, d, splits, out)
    return out


@_attention_fp8_op.register_fake
def _(q, k, v, smooth_k, splits):
    return q.new_empty(q.shape[:3] + (v.shape[3],))


# ---------------------------------------------------------------------------------------------
# 6. Compile cases: every variant a GPU would build (kernels/_triton.compile_report)
# ---------------------------------------------------------------------------------------------
_PTRS = {"Q8": "*fp8e4nv", "K8": "*fp8e4nv", "VT8": "*fp8e4nv", "SQ": "*fp32", "SK": "*fp32",
         "SV": "*fp32", "O": "*bf16", "OP": "*fp32", "LSE": "*fp32", "K": "*bf16", "V": "*bf16",
         "X": "*bf16", "MEAN": "*fp32", "OUT": "*fp8e4nv", "SCALE": "*fp32", "INV": "*fp32",
         "VT": "*fp8e4nv", "KSUM": "*fp32", "VMAX": "*fp32"}


def _case(name, kernel, consts, warps, stages=1):
    return {"name": name, "kernel": kernel, "signature": _signature(kernel, _PTRS, consts),
            "constexprs": consts, "num_warps": warps, "num_stages": stages, "archs": (90,)}


def _cases() -> list:
    """The configs of kernels/attention.py's compile cases (all at D = 128), and the prologue
    kernels."""
    cases = []
    for d in HEAD_DIMS:
        for cfg in small_and_large(d, configs_for(d)):
            bm, bn = cfg.kwargs["BLOCK_M"], cfg.kwargs["BLOCK_N"]
            for split in (False, True) if d > 32 else (False,):
                consts = dict(HEAD_DIM=d, BLOCK_M=bm, BLOCK_N=bn, Q_BLOCK=Q_BLOCK,
                              K_BLOCK=K_BLOCK, SPLIT=split, INTERPRET=False)
                cases.append(_case(f"attention_fp8 d={d} split={int(split)} {bm}x{bn} "
                                   f"w{cfg.num_warps} s{cfg.num_stages}", _attention_fp8_kernel,
                                   consts, cfg.num_warps, cfg.num_stages))
        warps = PROLOGUE_WARPS
        cases.append(_case(f"kv_stats d={d}", _kv_stats_kernel,
                           dict(HEAD_DIM=d, BLOCK=STATS_BLOCK, SMOOTH=True), warps))
        for block, smooth in ((Q_BLOCK, False), (K_BLOCK, True)):
            cases.append(_case(f"quantize_rows d={d} block={block}", _quantize_rows_kernel,
                               dict(HEAD_DIM=d, BLOCK=block, SUB=PROLOGUE_SUB, SMOOTH=smooth,
                                    INTERPRET=False), 4))
        cases.append(_case(f"quantize_v d={d}", _quantize_v_kernel,
                           dict(HEAD_DIM=d, BLOCK=STATS_BLOCK, INTERPRET=False), warps))
    return cases


COMPILE_CASES = _cases()
