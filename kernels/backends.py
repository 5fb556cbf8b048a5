"""Registers the Triton kernels as the `triton` backends of mova_rt.ops (imported by
`ops.resolve("triton")`, never at package import, so Triton stays optional).

The kernels reproduce bf16 rounding step by step; a model run in another dtype (fp32 on a CPU,
say) goes through the exact PyTorch composition instead, decided per call by the activation
dtype (a comparison, no lookup).
"""

from __future__ import annotations

import torch

from ..ops import (attention_sdpa, compose_cross_attention, compose_self_attention,
                   gated_residual_eager, layernorm_affine_eager, norm_modulate_eager, register,
                   residual_layernorm_affine_eager, rope_interleaved_f32)
from . import adaln
from .attention import fused_attention
from .attention_int8 import attention_int8, fused_attention_int8

BF16 = torch.bfloat16


def _bf16_or_exact(kind: str, fused, exact, name: str = "triton"):
    """Register `fused` as the `name` backend of `kind` for bf16 activations, `exact` otherwise
    (decided by the first argument's dtype)."""
    def backend(x, *args):
        return fused(x, *args) if x.dtype == BF16 else exact(x, *args)
    backend.__name__ = f"{kind}_{name}"
    register(kind, name)(backend)
    return backend


_bf16_or_exact("self_attention",
               lambda q, k, v, w_q, w_k, eps, rope: fused_attention(q, k, v, w_q, w_k, eps, rope,
                                                                    rope),
               compose_self_attention(rope_interleaved_f32, attention_sdpa))
_bf16_or_exact("cross_attention",
               lambda q, k, v, w_q, w_k, eps, q_rope=None, k_rope=None: fused_attention(
                   q, k, v, w_q, w_k, eps, q_rope, k_rope),
               compose_cross_attention(attention_sdpa))
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
               compose_self_attention(rope_interleaved_f32, attention_sdpa), name="int8")
_bf16_or_exact("cross_attention",
               lambda q, k, v, w_q, w_k, eps, q_rope=None, k_rope=None: fused_attention_int8(
                   q, k, v, w_q, w_k, eps, q_rope, k_rope),
               compose_cross_attention(attention_sdpa), name="int8")
