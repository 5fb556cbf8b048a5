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

BF16 = torch.bfloat16
_self_exact = compose_self_attention(rope_interleaved_f32, attention_sdpa)
_cross_exact = compose_cross_attention(attention_sdpa)


@register("self_attention", "triton")
def self_attention_triton(q, k, v, w_q, w_k, eps, rope):
    if q.dtype != BF16:
        return _self_exact(q, k, v, w_q, w_k, eps, rope)
    return fused_attention(q, k, v, w_q, w_k, eps, rope, rope)


@register("cross_attention", "triton")
def cross_attention_triton(q, k, v, w_q, w_k, eps, q_rope=None, k_rope=None):
    if q.dtype != BF16:
        return _cross_exact(q, k, v, w_q, w_k, eps, q_rope, k_rope)
    return fused_attention(q, k, v, w_q, w_k, eps, q_rope, k_rope)


@register("norm_modulate", "triton")
def norm_modulate_triton(x, shift, scale, eps):
    if x.dtype != BF16:
        return norm_modulate_eager(x, shift, scale, eps)
    return adaln.layernorm_modulate(x, shift, scale, eps)


@register("gated_residual", "triton")
def gated_residual_triton(x, gate, y):
    if x.dtype != BF16:
        return gated_residual_eager(x, gate, y)
    return adaln.gated_residual(x, gate, y)


@register("layernorm_affine", "triton")
def layernorm_affine_triton(x, weight, bias, eps):
    if x.dtype != BF16:
        return layernorm_affine_eager(x, weight, bias, eps)
    return adaln.layernorm_affine(x, weight, bias, eps)


@register("residual_layernorm_affine", "triton")
def residual_layernorm_affine_triton(x, gate, y, weight, bias, eps):
    if x.dtype != BF16:
        return residual_layernorm_affine_eager(x, gate, y, weight, bias, eps)
    return adaln.gated_residual_layernorm_affine(x, gate, y, weight, bias, eps)
