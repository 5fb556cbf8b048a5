"""Projections that read the same input as one GEMM: a transform applied to built, resident towers.

- the DiTs' self-attention: q, k and v of x -> one [3D, D] GEMM;
- the bridge's conditional cross-attention: k and v of the other tower's states -> one [2D, D_kv]
  GEMM (for the video-to-audio direction that input is the 43,120 video tokens).

One GEMM reads the input once instead of two or three times and runs at a larger N. The weights
stay the checkpoint's: the fused weight is their concatenation, made once, and the Linear
layers' parameters become views of it (no second copy; state_dict keys and values unchanged).
Only for modules that stay where they are: offload and engines move or rebind parameters one by
one, which would break the views, so the pipeline applies this only without them (`applicable`).

Numerics: each output column is the same dot product over the same K; a GEMM of another N may
choose another kernel and round its fp32 accumulation differently (bf16: within rounding; the
tests compare against the separate projections).
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from .models.bridge import ConditionalCrossAttention
from .models.video_dit import SelfAttention


def _concat(module: nn.Module, names: tuple) -> None:
    """Register `<names joined>_weight/_bias` as the concatenation of the Linear layers `names`
    and make those layers' parameters views of it."""
    layers = [getattr(module, n) for n in names]
    weight = torch.cat([m.weight.detach() for m in layers])
    bias = torch.cat([m.bias.detach() for m in layers])
    key = "".join(names)
    module.register_buffer(f"{key}_weight", weight, persistent=False)
    module.register_buffer(f"{key}_bias", bias, persistent=False)
    start = 0
    for m in layers:
        n = m.out_features
        m.weight = nn.Parameter(weight[start:start + n], requires_grad=False)
        m.bias = nn.Parameter(bias[start:start + n], requires_grad=False)
        start += n


class FusedSelfAttention(SelfAttention):
    """SelfAttention whose q, k, v come from one GEMM (`qkv_weight` [3D, D])."""

    def forward(self, x: torch.Tensor, rope) -> torch.Tensor:
        b, l, _ = x.shape
        qkv = F.linear(x, self.qkv_weight, self.qkv_bias).view(b, l, 3, self.num_heads, -1)
        q, k, v = qkv.unbind(2)                              # strided views [B, L, H, D]
        out = self.ops.self_attention(q, k, v, self.norm_q.weight, self.norm_k.weight,
                                      self.norm_q.eps, rope)
        return self.o(out.reshape(b, l, -1))


class FusedCrossAttention(ConditionalCrossAttention):
    """ConditionalCrossAttention whose k, v come from one GEMM (`kv_weight` [2D, D_kv])."""

    def forward(self, x, y, x_rope=None, y_rope=None):
        b, l, _ = x.shape
        ly = y.shape[1]
        q = self.q(x).view(b, l, self.num_heads, -1)                           # [B, Lx, H, D]
        kv = F.linear(y, self.kv_weight, self.kv_bias).view(b, ly, 2, self.num_heads, -1)
        k, v = kv.unbind(2)                                                    # [B, Ly, H, D]
        out = self.ops.cross_attention(q, k, v, self.norm_q.weight, self.norm_k.weight,
                                       self.norm_q.eps, x_rope, y_rope)
        return self.o(out.reshape(b, l, -1))


_FUSIONS = {SelfAttention: (FusedSelfAttention, ("q", "k", "v")),
            ConditionalCrossAttention: (FusedCrossAttention, ("k", "v"))}


def fuse_projections(*modules: nn.Module) -> int:
    """Fuses every self-attention's q/k/v and every bridge conditioner's k/v in `modules`, in
    place (the class of each attention module changes; parameters keep their names). Layers that
    are not plain bf16/fp32 nn.Linear (fp8, LoRA-wrapped) are left alone. Returns how many."""
    n = 0
    for root in modules:
        if root is None:
            continue
        for m in root.modules():
            fusion = _FUSIONS.get(type(m))
            if fusion is None:
                continue
            cls, names = fusion
            if all(type(getattr(m, name)) is nn.Linear for name in names):
                _concat(m, names)
                m.__class__ = cls
                n += 1
    return n


def applicable(offload: str, engine, precision: str) -> bool:
    """Whether the pipeline may fuse: the weights stay resident, in the checkpoint's precision,
    run by eager modules (module docstring)."""
    return offload == "none" and engine is None and precision == "bf16"
