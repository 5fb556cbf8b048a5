"""The video DiT of MOVA (one class for both Wan2.2-A14B-style experts) and the DiT block that the
audio tower shares. Spec section 1.3; module names are the checkpoint's key names (spec 2.3).

Precision follows the reference exactly (spec section 10, items 5 and 12):
- all block math in the weight dtype (bf16), the time MLPs in fp32 and then cast down;
- `modulate` (x * (1 + scale) + shift) computed in fp32 and rounded once (the reference compiles it);
- the gated residual x + gate * y and the head's modulation as separate eager ops (not compiled in
  the reference, so rounded after each op).
"""

from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..config import VideoDiTConfig
from ..ops import Ops, modulate  # noqa: F401  (modulate: re-exported)
from ..rope import InterleavedRope, rope_angles



# --------------------------------------------------------------------------------------------
# 1. Shared helpers: timestep sinusoid, fp32 MLPs, RoPE tables, modulation
# --------------------------------------------------------------------------------------------
def timestep_sinusoid(dim: int, t: torch.Tensor) -> torch.Tensor:
    """[B] timesteps in [0, 1000] -> [B, dim]: cos half first, then sin, computed in float64 with
    frequencies 10000^(-i/(dim/2)), returned in t's dtype."""
    half = dim // 2
    freqs = torch.pow(10000.0, -torch.arange(half, dtype=torch.float64, device=t.device) / half)
    angles = torch.outer(t.to(torch.float64), freqs)
    return torch.cat([torch.cos(angles), torch.sin(angles)], dim=1).to(t.dtype)


def linear_fp32(layer: nn.Linear, x: torch.Tensor) -> torch.Tensor:
    """The reference runs the time MLPs under fp32 autocast: inputs and weights upcast."""
    bias = None if layer.bias is None else layer.bias.float()
    return F.linear(x.float(), layer.weight.float(), bias)


def rope_3d_tables(head_dim: int, grid: tuple[int, int, int], device) -> tuple:
    """cos, sin [f*h*w, head_dim/2] float64 for tokens in (f, h, w) order. The first
    (head_dim - 2*(head_dim//3))/2 pairs rotate with the frame index, the next (head_dim//3)/2 with
    the row, the last (head_dim//3)/2 with the column (22/21/21 pairs at head_dim 128)."""
    f, h, w = grid
    d_hw = head_dim // 3
    d_f = head_dim - 2 * d_hw
    af = rope_angles(d_f, torch.arange(f, device=device))      # [f, d_f/2]
    ah = rope_angles(d_hw, torch.arange(h, device=device))     # [h, d_hw/2]
    aw = rope_angles(d_hw, torch.arange(w, device=device))     # [w, d_hw/2]
    angles = torch.cat([
        af[:, None, None, :].expand(f, h, w, -1),
        ah[None, :, None, :].expand(f, h, w, -1),
        aw[None, None, :, :].expand(f, h, w, -1),
    ], dim=-1).reshape(f * h * w, head_dim // 2)
    return torch.cos(angles), torch.sin(angles)


# --------------------------------------------------------------------------------------------
# 2. Attention modules
# --------------------------------------------------------------------------------------------
class SelfAttention(nn.Module):
    """q, k RMS-normalised across all heads (width dim), interleaved RoPE on q and k, full
    attention, output projection."""

    def __init__(self, dim: int, num_heads: int, eps: float, ops: Ops):
        super().__init__()
        self.num_heads = num_heads
        self.q = nn.Linear(dim, dim)
        self.k = nn.Linear(dim, dim)
        self.v = nn.Linear(dim, dim)
        self.o = nn.Linear(dim, dim)
        self.norm_q = nn.RMSNorm(dim, eps=eps)
        self.norm_k = nn.RMSNorm(dim, eps=eps)
        self.ops = ops

    def forward(self, x: torch.Tensor, rope: tuple) -> torch.Tensor:
        b, l, _ = x.shape
        q = self.q(x).view(b, l, self.num_heads, -1)                # [B, L, H, D]
        k = self.k(x).view(b, l, self.num_heads, -1)
        v = self.v(x).view(b, l, self.num_heads, -1)
        # RMSNorm of q and k over all heads, interleaved RoPE, attention (ops.self_attention).
        out = self.ops.self_attention(q, k, v, self.norm_q.weight, self.norm_k.weight,
                                      self.norm_q.eps, rope)          # [B, L, H, D]
        return self.o(out.reshape(b, l, -1))


class CrossAttention(nn.Module):
    """Text cross-attention: queries from the tower, keys/values from the 512 text embeddings
    (zero-padded prompt, attended without a mask), q/k RMSNorm, no RoPE."""

    def __init__(self, dim: int, num_heads: int, eps: float, ops: Ops):
        super().__init__()
        self.num_heads = num_heads
        self.q = nn.Linear(dim, dim)
        self.k = nn.Linear(dim, dim)
        self.v = nn.Linear(dim, dim)
        self.o = nn.Linear(dim, dim)
        self.norm_q = nn.RMSNorm(dim, eps=eps)
        self.norm_k = nn.RMSNorm(dim, eps=eps)
        self.ops = ops

    def kv(self, context: torch.Tensor) -> tuple:
        """K (before its RMSNorm) and V [B, 512, H, D] of the text: constant over a request."""
        b, lc, _ = context.shape
        return (self.k(context).view(b, lc, self.num_heads, -1),
                self.v(context).view(b, lc, self.num_heads, -1))

    def forward(self, x: torch.Tensor, kv: tuple) -> torch.Tensor:
        b, l, _ = x.shape
        k, v = kv                                                          # [B, 512, H, D]
        q = self.q(x).view(b, l, self.num_heads, -1)                       # [B, L, H, D]
        out = self.ops.cross_attention(q, k, v, self.norm_q.weight, self.norm_k.weight,
                                       self.norm_q.eps)
        return self.o(out.reshape(b, l, -1))


# --------------------------------------------------------------------------------------------
# 3. The DiT block (shared by the video and audio towers)
# --------------------------------------------------------------------------------------------
class DiTBlock(nn.Module):
    """x += gate_msa * SelfAttn(modulate(LN1(x))); x += CrossAttn(LN3_affine(x), text);
    x += gate_mlp * FFN(modulate(LN2(x))). (shift, scale, gate) x 2 = modulation + t_mod."""

    def __init__(self, dim: int, num_heads: int, ffn_dim: int, eps: float, ops: Ops):
        super().__init__()
        self.self_attn = SelfAttention(dim, num_heads, eps, ops)
        self.cross_attn = CrossAttention(dim, num_heads, eps, ops)
        self.norm1 = nn.LayerNorm(dim, eps=eps, elementwise_affine=False)
        self.norm2 = nn.LayerNorm(dim, eps=eps, elementwise_affine=False)
        self.norm3 = nn.LayerNorm(dim, eps=eps)
        self.ffn = nn.Sequential(nn.Linear(dim, ffn_dim), nn.GELU(approximate="tanh"),
                                 nn.Linear(ffn_dim, dim))
        self.modulation = nn.Parameter(torch.empty(1, 6, dim))
        self.ops = ops

    def forward(self, x: torch.Tensor, text_kv: tuple, t_mod: torch.Tensor,
                rope: InterleavedRope) -> torch.Tensor:
        # text_kv: the text K/V of this block's cross-attention (CrossAttention.kv).
        # t_mod [B, 6, dim] in the block dtype; each chunk [B, 1, dim].
        mod = self.modulation.to(t_mod.dtype) + t_mod
        shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = mod.chunk(6, dim=1)
        ops, n3 = self.ops, self.norm3
        y = self.self_attn(ops.norm_modulate(x, shift_msa, scale_msa, self.norm1.eps), rope)
        x, h = ops.residual_layernorm_affine(x, gate_msa, y, n3.weight, n3.bias, n3.eps)
        x = x + self.cross_attn(h, text_kv)
        y = self.ffn(ops.norm_modulate(x, shift_mlp, scale_mlp, self.norm2.eps))
        return ops.gated_residual(x, gate_mlp, y)


class Head(nn.Module):
    """LN (no affine) -> * (1 + scale) + shift with (shift, scale) = modulation + t (the time
    embedding, not t_mod) -> Linear to out_dim * prod(patch)."""

    def __init__(self, dim: int, out_dim: int, patch_size: tuple, eps: float):
        super().__init__()
        self.norm = nn.LayerNorm(dim, eps=eps, elementwise_affine=False)
        self.head = nn.Linear(dim, out_dim * math.prod(patch_size))
        self.modulation = nn.Parameter(torch.empty(1, 2, dim))

    def forward(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        # t [B, dim] -> [B, 1, dim] so batches broadcast against modulation [1, 2, dim].
        shift, scale = (self.modulation.to(t.dtype) + t.unsqueeze(1)).chunk(2, dim=1)
        return self.head(self.norm(x) * (1 + scale) + shift)


# --------------------------------------------------------------------------------------------
# 4. The video DiT
# --------------------------------------------------------------------------------------------
def time_embeddings(dit: nn.Module, timestep: torch.Tensor, dtype: torch.dtype):
    """timestep [B] fp32 -> (t [B, dim], t_mod [B, 6, dim]) in `dtype` (spec 1.3)."""
    s = timestep_sinusoid(dit.freq_dim, timestep.float())
    te = dit.time_embedding
    t = linear_fp32(te[2], F.silu(linear_fp32(te[0], s)))
    t_mod = linear_fp32(dit.time_projection[1], F.silu(t)).unflatten(1, (6, dit.dim))
    return t.to(dtype), t_mod.to(dtype)


class VideoDiT(nn.Module):
    """WanModel as MOVA uses it: 36-channel input [noisy 16 | mask 4 | condition 16], 3D patches
    (1, 2, 2), blocks, head, unpatchify to 16 channels."""

    def __init__(self, cfg: VideoDiTConfig, ops: Ops):
        super().__init__()
        self.cfg = cfg
        self.dim = cfg.dim
        self.freq_dim = cfg.freq_dim
        self.patch_size = cfg.patch_size
        self.patch_embedding = nn.Conv3d(cfg.in_dim, cfg.dim, kernel_size=cfg.patch_size,
                                         stride=cfg.patch_size)
        self.text_embedding = nn.Sequential(nn.Linear(cfg.text_dim, cfg.dim),
                                            nn.GELU(approximate="tanh"),
                                            nn.Linear(cfg.dim, cfg.dim))
        self.time_embedding = nn.Sequential(nn.Linear(cfg.freq_dim, cfg.dim), nn.SiLU(),
                                            nn.Linear(cfg.dim, cfg.dim))
        self.time_projection = nn.Sequential(nn.SiLU(), nn.Linear(cfg.dim, cfg.dim * 6))
        self.blocks = nn.ModuleList([DiTBlock(cfg.dim, cfg.num_heads, cfg.ffn_dim, cfg.eps, ops)
                                     for _ in range(cfg.num_layers)])
        self.head = Head(cfg.dim, cfg.out_dim, cfg.patch_size, cfg.eps)

    def patchify(self, x: torch.Tensor):
        """[B, 36, F, H, W] -> tokens [B, F*(H/2)*(W/2), dim] in (f, h, w) order, grid."""
        x = self.patch_embedding(x.contiguous(memory_format=torch.channels_last_3d))
        grid = tuple(x.shape[2:])
        return x.flatten(2).transpose(1, 2).contiguous(), grid

    def unpatchify(self, x: torch.Tensor, grid: tuple) -> torch.Tensor:
        """[B, f*h*w, pf*ph*pw*C] (channel innermost) -> [B, C, f*pf, h*ph, w*pw]."""
        f, h, w = grid
        pf, ph, pw = self.patch_size
        b = x.shape[0]
        x = x.view(b, f, h, w, pf, ph, pw, -1)
        x = x.permute(0, 7, 1, 4, 2, 5, 3, 6)                      # [B, C, f, pf, h, ph, w, pw]
        return x.reshape(b, -1, f * pf, h * ph, w * pw)

    def rope(self, grid: tuple, device) -> InterleavedRope:
        return InterleavedRope.video(self.cfg.head_dim, grid, device)
