"""RoPE descriptions, built once per shape and handed to the attention backends.

Each backend takes what it needs from one object: the eager path the full cos/sin tables exactly
as the reference builds them, the fused kernels the compact form (per-axis tables, per-frame
positions) from which they compute the rotation in registers.

- InterleavedRope (the DiTs' self-attention): pairs (2i, 2i+1); the token index splits into axes
  (video: frame, row, column; audio: one axis) and each pair rotates with one axis's coordinate,
  angle = c_axis * 10000^(-2j / d_axis), computed in float64 as the reference does.
- RotateHalfRope (the bridge): channel d pairs with d +- D/2; angle = pos(l) * inv_freq[d mod D/2]
  in fp32 with pos(l) = frame_pos[l // tokens_per_frame]; the reference rounds the tables to the
  activation dtype.
"""

from __future__ import annotations

import torch

ROPE_THETA = 10000.0


def rope_angles(dim: int, positions: torch.Tensor) -> torch.Tensor:
    """Angles [L, dim/2] (float64) of the interleaved RoPE over `dim` channels:
    position * 10000^(-2j/dim) for j < dim/2 (the reference's precompute_freqs_cis)."""
    j = torch.arange(0, dim, 2, dtype=torch.float64, device=positions.device)[: dim // 2]
    inv = 1.0 / (ROPE_THETA ** (j / dim))
    return torch.outer(positions.to(torch.float64), inv)


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


def apply_rope_rotate_half(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x [B, L, H, D]; cos/sin [L, D] in x.dtype. x*cos + rotate_half(x)*sin in fp32, rounded once
    (the reference compiles this expression with fullgraph, spec 10.12)."""
    c = cos.float()[None, :, None, :]
    s = sin.float()[None, :, None, :]
    return (x.float() * c + rotate_half(x).float() * s).to(x.dtype)


class InterleavedRope:
    """axes (A0, A1, A2): token l = (c0 * A1 + c1) * A2 + c2; pair_dims (d0, d1, d2): channels per
    axis (sum = head_dim; 1D: (head_dim, 0, 0))."""

    def __init__(self, axes: tuple, pair_dims: tuple, device):
        self.axes = tuple(int(a) for a in axes)
        self.pair_dims = tuple(int(d) for d in pair_dims)
        self.pairs = tuple(d // 2 for d in self.pair_dims)
        self.head_dim = sum(self.pair_dims)
        self.device = torch.device(device)
        self._tables = self._axis = self._f32 = None

    @classmethod
    def video(cls, head_dim: int, grid: tuple, device) -> "InterleavedRope":
        """The 3D RoPE: head_dim - 2*(head_dim//3) channels for frames, head_dim//3 each for rows
        and columns (22/21/21 pairs at head_dim 128)."""
        d_hw = head_dim // 3
        return cls(grid, (head_dim - 2 * d_hw, d_hw, d_hw), device)

    @classmethod
    def audio(cls, head_dim: int, length: int, device) -> "InterleavedRope":
        """The 1D RoPE over the whole head (the reference's three chunks concatenate back to this
        single table)."""
        return cls((length, 1, 1), (head_dim, 0, 0), device)

    def _axis_angles(self) -> list:
        return [rope_angles(d, torch.arange(n, device=self.device))
                for n, d in zip(self.axes, self.pair_dims)]

    def tables(self) -> tuple:
        """cos, sin [L, head_dim/2] float64 for tokens in axis order (the eager path)."""
        if self._tables is None:
            a0, a1, a2 = self.axes
            angles = [x for x in self._axis_angles()]
            full = torch.cat([
                angles[0][:, None, None, :].expand(a0, a1, a2, -1),
                angles[1][None, :, None, :].expand(a0, a1, a2, -1),
                angles[2][None, None, :, :].expand(a0, a1, a2, -1)], dim=-1)
            full = full.reshape(a0 * a1 * a2, -1)
            self._tables = (torch.cos(full), torch.sin(full))
        return self._tables

    def tables_f32(self) -> tuple:
        """tables() rounded once to fp32, contiguous (the fused norm + RoPE kernel's input; the
        values the `sdpa` kernel set rotates with)."""
        if self._f32 is None:
            cos, sin = self.tables()
            self._f32 = (cos.float().contiguous(), sin.float().contiguous())
        return self._f32

    def axis_tables(self) -> tuple:
        """cos, sin fp32 [A0 + A1 + A2, head_dim/2]: row (offset of axis a) + c holds axis a's
        pair columns (the fused kernels' compact form; zeros elsewhere)."""
        if self._axis is None:
            half = self.head_dim // 2
            cos = torch.zeros(sum(self.axes), half, dtype=torch.float64, device=self.device)
            sin = torch.zeros_like(cos)
            row = col = 0
            for n, ang in zip(self.axes, self._axis_angles()):
                p = ang.shape[1]
                cos[row:row + n, col:col + p] = torch.cos(ang)
                sin[row:row + n, col:col + p] = torch.sin(ang)
                row, col = row + n, col + p
            self._axis = (cos.float(), sin.float())
        return self._axis


class RotateHalfRope:
    def __init__(self, frame_pos: torch.Tensor, tokens_per_frame: int, head_dim: int,
                 dtype: torch.dtype):
        self.frame_pos = frame_pos.float()
        self.tokens_per_frame = int(tokens_per_frame)
        self.head_dim = head_dim
        self.table_dtype = dtype
        j = torch.arange(0, head_dim, 2, dtype=torch.int64, device=frame_pos.device).float()
        self.inv_freq = 1.0 / (ROPE_THETA ** (j / head_dim))       # fp32, as the reference
        self._tables = None

    def tables(self) -> tuple:
        """cos, sin [L, head_dim] in the activation dtype (the reference's RotaryEmbedding)."""
        if self._tables is None:
            pos = self.frame_pos.repeat_interleave(self.tokens_per_frame)
            freqs = pos[:, None] * self.inv_freq[None, :]                  # [L, D/2] fp32
            emb = torch.cat((freqs, freqs), dim=-1)
            self._tables = (emb.cos().to(self.table_dtype), emb.sin().to(self.table_dtype))
        return self._tables
