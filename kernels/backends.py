"""Registers the Triton kernels as the `triton` backends of mova_rt.ops (imported by
`ops.resolve("triton")`, never at package import, so Triton stays optional).

The kernels reproduce bf16 rounding step by step; a model run in another dtype (fp32 on a CPU,
say) goes through the exact PyTorch composition instead, decided per call by the activation
dtype (a comparison, no lookup).
"""

from __future__ import annotations

import torch

from ..ops import (_REGISTRY, attention_sdpa, compose_cross_attention, compose_self_attention,
                   gated_residual_eager, layernorm_affine_eager, norm_modulate_eager, register,
                   residual_layernorm_affine_eager)
from ..rope import InterleavedRope
from . import adaln
from .attention import attention
from .attention_fp8 import attention_fp8
from .attention_int8 import attention_int8, fused_attention_int8
from .norm_rope import ROPE_INTERLEAVED, ROPE_NONE, ROPE_ROTATE_HALF, norm_rope

BF16 = torch.bfloat16


def _bf16_or_exact(kind: str, fused, exact, name: str = "triton"):
    """Register `fused` as the `name` backend of `kind` for bf16 activations, `exact` otherwise
    (decided by the first argument's dtype)."""
    def backend(x, *args):
        return fused(x, *args) if x.dtype == BF16 else exact(x, *args)
    backend.__name__ = f"{kind}_{name}"
    register(kind, name)(backend)
    return backend


def _norm_rope_triton(x, w, eps, rope, rotate_half=False):
    """kernels/norm_rope.py with the tables the RoPE description holds: fp32 [L, D/2] for the
    interleaved pairs (the `sdpa` set's values), the reference's activation-dtype tables for
    rotate-half."""
    if x.stride(3) != 1 or x.stride(2) != x.shape[3]:
        x = x.contiguous()
    if rope is None:
        return norm_rope(x, w, eps, ROPE_NONE)
    if rotate_half:
        return norm_rope(x, w, eps, ROPE_ROTATE_HALF, *rope.tables())
    cos, sin = rope.tables_f32() if isinstance(rope, InterleavedRope) else (
        t.float() for t in rope.tables())
    return norm_rope(x, w, eps, ROPE_INTERLEAVED, cos, sin)


_bf16_or_exact("norm_rope", _norm_rope_triton, _REGISTRY["norm_rope"]["float32"])
# the Hopper attention kernel (bf16), and 8-bit attention with e4m3 QK and PV (approximate)
_bf16_or_exact("attention", attention, attention_sdpa)
_bf16_or_exact("attention", attention_fp8, attention_sdpa, name="fp8")
_bf16_or_exact("norm_modulate", adaln.layernorm_modulate, norm_modulate_eager)
_bf16_or_exact("gated_residual", adaln.gated_residual, gated_residual_eager)
_bf16_or_exact("layernorm_affine", adaln.layernorm_affine, layernorm_affine_eager)
_bf16_or_exact("residual_layernorm_affine", adaln.gated_residual_layernorm_affine,
               residual_layernorm_affine_eager)
# 8-bit attention (q, k int8 per block, k smoothed) for bf16 activations, the set
# `triton-int8attn`: q/k RMSNorm + RoPE fused with the quantization (fused_attention_int8); the
# plain op (already normalised, rotated q/k: the Ulysses path) quantizes in PyTorch.
_bf16_or_exact("attention", attention_int8, attention_sdpa, name="int8")
_bf16_or_exact("self_attention",
               lambda q, k, v, w_q, w_k, eps, rope: fused_attention_int8(q, k, v, w_q, w_k, eps,
                                                                         rope, rope),
               compose_self_attention(_REGISTRY["norm_rope"]["float32"], attention_sdpa),
               name="int8")
_bf16_or_exact("cross_attention",
               lambda q, k, v, w_q, w_k, eps, q_rope=None, k_rope=None: fused_attention_int8(
                   q, k, v, w_q, w_k, eps, q_rope, k_rope),
               compose_cross_attention(_REGISTRY["norm_rope"]["float32"], attention_sdpa),
               name="int8")
