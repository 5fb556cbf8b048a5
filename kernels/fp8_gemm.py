"""fp8 GEMM with fused epilogues: the Linear layers of the fp8 path (mova_rt/fp8/quantize.py).

    y = s_a * s_b * (A_q @ B_q^T) + bias          (fp32 accumulation; e4m3 operands)

A_q e4m3 [M, K] (activations, row-major) with scales s_a either per row [M] (per token, what a
norm producer or `quantize_rows` writes) or per (row, group of GROUP = 128 columns of K) [M, K/128]
(what EPI_GELU_FP8 writes); B_q e4m3 [N, K] (the Linear weight layout) with per-output-channel
scales s_b [N]; bias [N] in the output dtype or none. Epilogues:

    EPI_BIAS           out = round(y)                                      [M, N] bf16
    EPI_GELU_FP8       h = round(gelu_tanh(round(y)))                      (eager bf16: 2 roundings)
                       s = max |h| over each (row, 128-column group) / 448 [M, N/128] fp32
                       out = e4m3(h / s)                                   [M, N]: FFN-up feeds
                       FFN-down with no separate quantization pass over the 13,824-wide hidden
    EPI_GATE_RESIDUAL  out = round(res + round(gate[row // TOKENS] * round(y)))
                       (a DiT block's output projection + gated residual: eager bf16 roundings;
                       no gate: round(res + round(y)), the plain residual of cross-attention)

round = fp32 -> bf16 (round_bf16: round to nearest even by bit arithmetic, see _triton.py); the
e4m3 values are rounded the same way (round_e4m3) before the cast. With
grouped A scales the partial product of each K-group is scaled before it is accumulated (the
scale differs per group), so BLOCK_K = GROUP there.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

from ._triton import INTERPRET, round_bf16, round_e4m3

FP8 = torch.float8_e4m3fn
FP8_MAX = 448.0
GROUP = 128
EPI_BIAS, EPI_GELU_FP8, EPI_GATE_RESIDUAL = 0, 1, 2
GELU_C = math.sqrt(2.0 / math.pi)


# --------------------------------------------------------------------------------------------
# 1. Pure-PyTorch references
# --------------------------------------------------------------------------------------------
def expand_scales(a_scale: torch.Tensor, k: int) -> torch.Tensor:
    """[M] or [M, K/GROUP] activation scales -> [M, K] (one per element)."""
    if a_scale.dim() == 1:
        return a_scale[:, None].expand(-1, k)
    return a_scale.repeat_interleave(GROUP, dim=1)[:, :k]


def quantize_groups_ref(h: torch.Tensor) -> tuple:
    """[M, N] -> (e4m3 [M, N], fp32 scales [M, ceil(N/128)]): one scale per 128 columns."""
    m, n = h.shape
    pad = (-n) % GROUP
    hp = F.pad(h.float(), (0, pad)).view(m, -1, GROUP)
    amax = hp.abs().amax(-1)
    s = torch.where(amax > 0, amax / FP8_MAX, torch.ones_like(amax))
    q = (hp / s[..., None]).clamp(-FP8_MAX, FP8_MAX).to(FP8).view(m, -1)[:, :n]
    return q, s


def fp8_gemm_ref(a_q, a_scale, b_q, b_scale, bias=None, epilogue=EPI_BIAS, res=None, gate=None,
                 tokens: int = 1, out_dtype=torch.bfloat16):
    k = a_q.shape[1]
    y = (a_q.float() * expand_scales(a_scale.float(), k)) @ b_q.float().t()
    y = y * b_scale.float()[None, :]
    if bias is not None:
        y = y + bias.float()
    y = y.to(out_dtype)
    if epilogue == EPI_BIAS:
        return y
    if epilogue == EPI_GELU_FP8:
        return quantize_groups_ref(F.gelu(y, approximate="tanh"))
    if gate is None:
        return res + y
    g = gate.repeat_interleave(tokens, dim=0)[:y.shape[0]]          # [M, N]
    return res + g * y


# --------------------------------------------------------------------------------------------
# 2. The kernel
# --------------------------------------------------------------------------------------------
@triton.jit
def _fp8_gemm_kernel(
    a_ptr, b_ptr, out_ptr, sa_ptr, sb_ptr, bias_ptr, res_ptr, gate_ptr, so_ptr,
    M, N, K, TOKENS,
    stride_am, stride_bn, stride_om, stride_sam, stride_rm, stride_gb, stride_som,
    HAS_BIAS: tl.constexpr, A_GROUPED: tl.constexpr, EPILOGUE: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    rm = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    rk = tl.arange(0, BLOCK_K)
    mask_m = rm < M
    mask_n = rn < N
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for kb in range(0, tl.cdiv(K, BLOCK_K)):
        k = kb * BLOCK_K + rk
        a = tl.load(a_ptr + rm[:, None] * stride_am + k[None, :],
                    mask=mask_m[:, None] & (k[None, :] < K), other=0.0)
        b = tl.load(b_ptr + rn[None, :] * stride_bn + k[:, None],
                    mask=mask_n[None, :] & (k[:, None] < K), other=0.0)     # [BLOCK_K, BLOCK_N]
        part = tl.dot(a, b, out_dtype=tl.float32)
        if A_GROUPED:               # this K-group's activation scale, before accumulating
            sa = tl.load(sa_ptr + rm * stride_sam + kb, mask=mask_m, other=0.0)
            acc += part * sa[:, None]
        else:
            acc += part
    if not A_GROUPED:
        sa = tl.load(sa_ptr + rm, mask=mask_m, other=0.0)
        acc = acc * sa[:, None]
    sb = tl.load(sb_ptr + rn, mask=mask_n, other=0.0)
    y = acc * sb[None, :]
    if HAS_BIAS:
        y += tl.load(bias_ptr + rn, mask=mask_n, other=0.0).to(tl.float32)[None, :]
    y = round_bf16(y)
    mask = mask_m[:, None] & mask_n[None, :]
    out_offs = rm[:, None] * stride_om + rn[None, :]
    if EPILOGUE == 0:
        tl.store(out_ptr + out_offs, y.to(out_ptr.dtype.element_ty), mask=mask)
    elif EPILOGUE == 1:
        # tanh(u) = 2 sigmoid(2u) - 1; |u| > 10 saturates tanh in fp32, clamped so exp stays finite
        inner = tl.minimum(tl.maximum(0.7978845608028654 * (y + 0.044715 * y * y * y), -10.0), 10.0)
        h = round_bf16(0.5 * y * (1.0 + (2.0 * tl.sigmoid(2.0 * inner) - 1.0)))
        # IEEE divisions (a plain `/` is the approximate div.full on GPUs), as quantize_rows
        amax = tl.max(tl.where(mask, tl.abs(h), 0.0), axis=1, keep_dims=True)  # [BLOCK_M, 1]
        s = tl.where(amax > 0, tl.math.div_rn(amax, tl.full(amax.shape, 448.0, tl.float32)), 1.0)
        q = round_e4m3(tl.minimum(tl.maximum(tl.math.div_rn(h, s + tl.zeros_like(h)), -448.0),
                                  448.0))
        tl.store(out_ptr + out_offs, q.to(out_ptr.dtype.element_ty), mask=mask)
        tl.store(so_ptr + rm[:, None] * stride_som + pid_n, s, mask=mask_m[:, None])
    else:
        batch = rm // TOKENS
        g = tl.load(gate_ptr + batch[:, None] * stride_gb + rn[None, :], mask=mask,
                    other=0.0).to(tl.float32)
        r = tl.load(res_ptr + rm[:, None] * stride_rm + rn[None, :], mask=mask,
                    other=0.0).to(tl.float32)
        out = round_bf16(r + round_bf16(g * y))
        tl.store(out_ptr + out_offs, out.to(out_ptr.dtype.element_ty), mask=mask)


# Tiles: 128 x 128 x 128 e4m3 tiles feed sm_90's wgmma (8 warps, 4 stages: 128 KiB of shared
# memory); the interpreter runs small M tiles (its tl.dot is slow) with the same N/K (= GROUP).
CONFIG = dict(BLOCK_M=32, num_warps=4, num_stages=1) if INTERPRET else \
    dict(BLOCK_M=128, num_warps=8, num_stages=4)


def _check(a_q, a_scale, b_q, b_scale):
    if a_q.dtype != FP8 or b_q.dtype != FP8:
        raise ValueError(f"fp8_gemm takes e4m3 operands, got {a_q.dtype} and {b_q.dtype}")
    m, k = a_q.shape
    n, kb = b_q.shape
    if k != kb:
        raise ValueError(f"fp8_gemm: A is [{m}, {k}] but B is [{n}, {kb}]")
    if a_q.stride(1) != 1 or b_q.stride(1) != 1:
        raise ValueError("fp8_gemm needs A and B contiguous along K")
    grouped = a_scale.dim() == 2
    want = (m, triton.cdiv(k, GROUP)) if grouped else (m,)
    if tuple(a_scale.shape) != want or tuple(b_scale.shape) != (n,):
        raise ValueError(f"fp8_gemm scales {tuple(a_scale.shape)} / {tuple(b_scale.shape)} do "
                         f"not fit A [{m}, {k}] and B [{n}, {k}]")
    return m, n, k, grouped


def fp8_gemm(a_q, a_scale, b_q, b_scale, bias=None, epilogue=EPI_BIAS, res=None, gate=None,
             tokens: int = 1, out_dtype=torch.bfloat16):
    """See the module docstring. Returns out [M, N] (out_dtype), or for EPI_GELU_FP8
    (out e4m3 [M, N], scales fp32 [M, N/128]). EPI_GATE_RESIDUAL: res [M, N] in out_dtype and
    gate [B, N] with B = ceil(M / tokens) (rows of one batch element share its gate), or None."""
    m, n, k, grouped = _check(a_q, a_scale, b_q, b_scale)
    dev = a_q.device
    fp8_out = epilogue == EPI_GELU_FP8
    out = torch.empty((m, n), dtype=FP8 if fp8_out else out_dtype, device=dev)
    so = torch.empty((m, triton.cdiv(n, GROUP)), dtype=torch.float32, device=dev) if fp8_out \
        else out
    if epilogue == EPI_GATE_RESIDUAL:
        if gate is None:           # a plain residual: res + 1 * round(y) == eager res + y
            gate, tokens = torch.ones((1, n), dtype=out_dtype, device=dev), max(m, 1)
        if res is None or res.shape != (m, n) or gate.shape[-1] != n or \
                gate.numel() // n != triton.cdiv(m, tokens):
            raise ValueError(f"EPI_GATE_RESIDUAL needs res [M, N] = [{m}, {n}] and gate "
                             f"[ceil(M / tokens), N], got {None if res is None else tuple(res.shape)}"
                             f" and {tuple(gate.shape)} with tokens={tokens}")
        res, gate = res.contiguous(), gate.reshape(-1, n).contiguous()
    else:
        res = gate = out
    sa = a_scale.float().contiguous()
    cfg = dict(CONFIG)
    bm = cfg.pop("BLOCK_M")
    grid = (triton.cdiv(m, bm), triton.cdiv(n, GROUP))
    _fp8_gemm_kernel[grid](
        a_q, b_q, out, sa, b_scale.float().contiguous(), bias if bias is not None else out,
        res, gate, so,
        m, n, k, tokens,
        a_q.stride(0), b_q.stride(0), out.stride(0), sa.stride(0), res.stride(0), gate.stride(0),
        so.stride(0),
        HAS_BIAS=bias is not None, A_GROUPED=grouped, EPILOGUE=epilogue,
        BLOCK_M=bm, BLOCK_N=GROUP, BLOCK_K=GROUP, **cfg)
    return (out, so) if fp8_out else out


# --------------------------------------------------------------------------------------------
# 3. Compile cases for sm_90 / sm_89 (tests/test_kernels_fp8.py, kernels/_triton.compile_report)
# --------------------------------------------------------------------------------------------
def _case(name, epilogue, grouped):
    sig = {"a_ptr": "*fp8e4nv", "b_ptr": "*fp8e4nv",
           "out_ptr": "*fp8e4nv" if epilogue == EPI_GELU_FP8 else "*bf16",
           "sa_ptr": "*fp32", "sb_ptr": "*fp32", "bias_ptr": "*bf16", "res_ptr": "*bf16",
           "gate_ptr": "*bf16", "so_ptr": "*fp32",
           "M": "i32", "N": "i32", "K": "i32", "TOKENS": "i32",
           "stride_am": "i32", "stride_bn": "i32", "stride_om": "i32", "stride_sam": "i32",
           "stride_rm": "i32", "stride_gb": "i32", "stride_som": "i32",
           "HAS_BIAS": "constexpr", "A_GROUPED": "constexpr", "EPILOGUE": "constexpr",
           "BLOCK_M": "constexpr", "BLOCK_N": "constexpr", "BLOCK_K": "constexpr"}
    consts = {"HAS_BIAS": True, "A_GROUPED": grouped, "EPILOGUE": epilogue,
              "BLOCK_M": 128, "BLOCK_N": GROUP, "BLOCK_K": GROUP}
    return {"name": name, "kernel": _fp8_gemm_kernel, "signature": sig, "constexprs": consts,
            "num_warps": 8, "num_stages": 4, "archs": [90, 89]}


COMPILE_CASES = [_case("fp8_gemm_bias", EPI_BIAS, False),
                 _case("fp8_gemm_gelu_fp8", EPI_GELU_FP8, False),
                 _case("fp8_gemm_grouped_gate_residual", EPI_GATE_RESIDUAL, True)]
