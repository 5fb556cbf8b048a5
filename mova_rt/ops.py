"""Backend registry: one table per op kind, resolved once when a model is built.

A kernel set name (`--kernels`) selects one backend per op kind. Modules receive an `Ops` object at
construction and call its functions directly: no lookup per call.

Op kinds and their contracts:
- attention(q, k, v) -> out: q [B, Lq, H, D], k/v [B, Lk, H, D], same dtype; full (unmasked)
  softmax attention with scale 1/sqrt(D); out [B, Lq, H, D].
- rope_interleaved(x, cos, sin) -> x': x [B, L, H, D] with D/2 complex pairs formed from the
  interleaved channels (2i, 2i+1); cos/sin [L, D/2] float64 tables; rotates each pair by its angle
  and rounds once to x.dtype.

Kernel sets:
- `reference`: the reference implementation's semantics: RoPE computed in float64 (as
  `rope_apply` does), attention through PyTorch SDPA (the reference's own fallback).
- `sdpa`: the same attention; RoPE in float32 (differs from `reference` by at most one bf16 ulp on
  rare elements).
Later kernel sets (Triton, flash-attn, CUDA) register here.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F

from .errors import MovaInputError

_REGISTRY: dict[str, dict[str, Callable]] = {"attention": {}, "rope_interleaved": {}}


def register(kind: str, name: str):
    def deco(fn):
        _REGISTRY[kind][name] = fn
        return fn
    return deco


@register("attention", "sdpa")
def attention_sdpa(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    # SDPA wants [B, H, L, D]; transposes are views.
    out = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2))
    return out.transpose(1, 2)


def _rope_interleaved(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                      compute: torch.dtype) -> torch.Tensor:
    b, l, h, d = x.shape
    xp = x.to(compute).reshape(b, l, h, d // 2, 2)
    a, c = xp[..., 0], xp[..., 1]                     # [B, L, H, D/2]
    cs = cos.to(compute)[None, :, None, :]            # [1, L, 1, D/2]
    sn = sin.to(compute)[None, :, None, :]
    out = torch.stack((a * cs - c * sn, a * sn + c * cs), dim=-1)
    return out.reshape(b, l, h, d).to(x.dtype)


@register("rope_interleaved", "float64")
def rope_interleaved_f64(x, cos, sin):
    return _rope_interleaved(x, cos, sin, torch.float64)


@register("rope_interleaved", "float32")
def rope_interleaved_f32(x, cos, sin):
    return _rope_interleaved(x, cos, sin, torch.float32)


KERNEL_SETS = {
    "reference": {"attention": "sdpa", "rope_interleaved": "float64"},
    "sdpa": {"attention": "sdpa", "rope_interleaved": "float32"},
}


@dataclass(frozen=True)
class Ops:
    name: str
    attention: Callable
    rope_interleaved: Callable


def resolve(kernels: str = "reference") -> Ops:
    if kernels not in KERNEL_SETS:
        raise MovaInputError(f"unknown --kernels '{kernels}': choose one of "
                             f"{', '.join(KERNEL_SETS)}")
    chosen = KERNEL_SETS[kernels]
    return Ops(name=kernels, **{kind: _REGISTRY[kind][impl] for kind, impl in chosen.items()})
