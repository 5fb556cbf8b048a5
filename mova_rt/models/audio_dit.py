"""The audio DiT of MOVA (WanAudioModel, spec 1.4): a Wan-1.3B-shaped tower over the DAC latents,
built from the same DiT block as the video tower. Differences from the video DiT: a kernel-1 Conv1d
patch embedding over the audio-latent frames, a 1D interleaved RoPE over the whole head
(positions 0..L_a-1), and a plain Linear head."""

from __future__ import annotations

import torch
import torch.nn as nn

from ..config import AudioDiTConfig
from ..ops import Ops
from ..rope import InterleavedRope
from .video_dit import DiTBlock, Head


class AudioDiT(nn.Module):
    def __init__(self, cfg: AudioDiTConfig, ops: Ops):
        super().__init__()
        self.cfg = cfg
        self.dim = cfg.dim
        self.freq_dim = cfg.freq_dim
        self.patch_size = cfg.patch_size
        self.patch_embedding = nn.Conv1d(cfg.in_dim, cfg.dim, kernel_size=cfg.patch_size,
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
        """[B, C, L_a] -> tokens [B, L_a / p, dim], grid (L,)."""
        x = self.patch_embedding(x)
        return x.transpose(1, 2).contiguous(), (x.shape[2],)

    def unpatchify(self, x: torch.Tensor, grid: tuple) -> torch.Tensor:
        """[B, L, p*C] -> [B, C, L*p] (patch innermost over time, channel innermost in tokens)."""
        b, l, _ = x.shape
        p = self.patch_size[0]
        return x.view(b, l, p, -1).permute(0, 3, 1, 2).reshape(b, -1, l * p)

    def rope(self, grid: tuple, device) -> InterleavedRope:
        """The 1D RoPE over the whole head. The reference builds it as three chunks (22/22/20
        pairs at head_dim 128) of one table and concatenates them back, which is this single
        table."""
        return InterleavedRope.audio(self.cfg.head_dim, grid[0], device)
