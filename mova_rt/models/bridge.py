"""The dual-tower bridge of MOVA (DualTowerConditionalBridge, spec 1.5).

Before DiT block i of every interaction layer, both towers exchange information through
conditional cross-attention, both directions computed from the pre-bridge states:
    V' = V + CCA_a2v(query = V, context = LayerNorm_affine(A))
    A' = A + CCA_v2a(query = A, context = LayerNorm_affine(V))
The query stream is not normalised; q and k are RMS-normalised across heads; K/V project from the
other tower's width into the query tower's width. Cross-modal RoPE is rotate-half (NeoX style) on
the full head with aligned positions: audio latent index 0..L_a-1 for audio tokens, and
f * audio_fps / (video_fps / 4) for every token of latent frame f (8.333 f at 24 fps).
"""

from __future__ import annotations

import torch
import torch.nn as nn

from ..config import BridgeConfig
from ..ops import Ops
from ..rope import RotateHalfRope, apply_rope_rotate_half, rotate_half  # noqa: F401

ROPE_BASE = 10000.0
VAE_TEMPORAL_STRIDE = 4  # the reference hard-codes the video VAE's temporal stride here


def rotate_half_tables(positions: torch.Tensor, head_dim: int, dtype: torch.dtype) -> tuple:
    """positions [L] fp32 -> cos, sin [L, head_dim]: computed in fp32 (inv_freq 10000^(-2j/D),
    angles duplicated over the two halves) and rounded to the activation dtype, as the reference's
    RotaryEmbedding does."""
    j = torch.arange(0, head_dim, 2, dtype=torch.int64, device=positions.device).float()
    inv_freq = 1.0 / (ROPE_BASE ** (j / head_dim))
    freqs = positions.float()[:, None] * inv_freq[None, :]                 # [L, D/2] fp32
    emb = torch.cat((freqs, freqs), dim=-1)
    return emb.cos().to(dtype), emb.sin().to(dtype)


def video_positions(cfg: BridgeConfig, grid: tuple, video_fps: float, device) -> torch.Tensor:
    """Audio-latent-unit position of every video token [f*h*w] fp32."""
    f, h, w = grid
    if cfg.apply_first_frame_bias_in_rope:
        # The first latent frame holds one pixel frame; later ones start 1/fps + k*4/fps later.
        starts = torch.zeros(f, dtype=torch.float32, device=device)
        if f > 1:
            starts[1:] = (1.0 / float(video_fps)) + torch.arange(
                f - 1, dtype=torch.float32, device=device) * (VAE_TEMPORAL_STRIDE / float(video_fps))
        per_frame = starts * float(cfg.audio_fps)
    else:
        scale = float(cfg.audio_fps) / (float(video_fps) / VAE_TEMPORAL_STRIDE)
        per_frame = torch.arange(f, dtype=torch.float32, device=device) * scale
    return per_frame.repeat_interleave(h * w)


class ConditionalCrossAttention(nn.Module):
    def __init__(self, dim: int, kv_dim: int, num_heads: int, eps: float, ops: Ops):
        super().__init__()
        self.num_heads = num_heads
        self.q = nn.Linear(dim, dim)
        self.k = nn.Linear(kv_dim, dim)
        self.v = nn.Linear(kv_dim, dim)
        self.o = nn.Linear(dim, dim)
        self.norm_q = nn.RMSNorm(dim, eps=eps)
        self.norm_k = nn.RMSNorm(dim, eps=eps)
        self.ops = ops

    def forward(self, x, y, x_rope=None, y_rope=None):
        b, l, _ = x.shape
        ly = y.shape[1]
        q = self.q(x).view(b, l, self.num_heads, -1)                    # [B, Lx, H, D]
        k = self.k(y).view(b, ly, self.num_heads, -1)                   # [B, Ly, H, D]
        v = self.v(y).view(b, ly, self.num_heads, -1)
        # RMSNorm of q and k over all heads, rotate-half RoPE, attention (ops.cross_attention).
        out = self.ops.cross_attention(q, k, v, self.norm_q.weight, self.norm_k.weight,
                                       self.norm_q.eps, x_rope, y_rope)
        return self.o(out.reshape(b, l, -1))


class ConditionerBlock(nn.Module):
    """LayerNorm (affine) on the context stream, then conditional cross-attention."""

    def __init__(self, dim: int, kv_dim: int, num_heads: int, ops: Ops, eps: float = 1e-6):
        super().__init__()
        self.y_norm = nn.LayerNorm(kv_dim, eps=eps)
        self.inner = ConditionalCrossAttention(dim, kv_dim, num_heads, eps, ops)
        self.ops = ops

    def forward(self, x, y, x_rope=None, y_rope=None):
        n = self.y_norm
        return self.inner(x, self.ops.layernorm_affine(y, n.weight, n.bias, n.eps), x_rope, y_rope)


class Bridge(nn.Module):
    def __init__(self, cfg: BridgeConfig, ops: Ops):
        super().__init__()
        self.cfg = cfg
        self.layers = cfg.interaction_layers()
        vd, ad, hd = cfg.visual_hidden_dim, cfg.audio_hidden_dim, cfg.head_dim
        self.audio_to_video_conditioners = nn.ModuleDict(
            {str(i): ConditionerBlock(vd, ad, vd // hd, ops) for i in self.layers})
        self.video_to_audio_conditioners = nn.ModuleDict(
            {str(i): ConditionerBlock(ad, vd, ad // hd, ops) for i in self.layers})
        if cfg.trainable_condition_scale:
            # Stored in such checkpoints; the reference's inference passes condition_scale=1.0,
            # which overrides it, so it is loaded and not used.
            self.condition_scale = nn.Parameter(torch.ones(1, dtype=torch.float32))

    def rope(self, grid: tuple, audio_len: int, video_fps: float, dtype, device):
        """(video, audio) RotateHalfRope (tables in the activation dtype), or (None, None) when
        the checkpoint does not apply cross-modal RoPE."""
        if not self.cfg.apply_cross_rope:
            return None, None
        f, h, w = grid
        per_frame = video_positions(self.cfg, (f, 1, 1), video_fps, device)   # [F]
        apos = torch.arange(audio_len, dtype=torch.float32, device=device)
        hd = self.cfg.head_dim
        return RotateHalfRope(per_frame, h * w, hd, dtype), RotateHalfRope(apos, 1, hd, dtype)

    def forward(self, i: int, video: torch.Tensor, audio: torch.Tensor, video_rope, audio_rope):
        """Interaction before block i; both directions read the pre-bridge states."""
        key = str(i)
        return interact(self.audio_to_video_conditioners[key],
                        self.video_to_audio_conditioners[key], video, audio, video_rope,
                        audio_rope)


def interact(a2v: ConditionerBlock, v2a: ConditionerBlock, video: torch.Tensor,
             audio: torch.Tensor, video_rope, audio_rope) -> tuple:
    """One interaction layer: both directions from the pre-bridge states (also the body of an
    engine's bridge unit, mova_rt/engine.py)."""
    new_video = video + a2v(video, audio, video_rope, audio_rope)
    new_audio = audio + v2a(audio, video, audio_rope, video_rope)
    return new_video, new_audio
