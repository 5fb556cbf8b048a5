"""RoPE variants against formulas written independently here (spec 1.3, 1.4, 1.5)."""
import math

import pytest
import torch

from mova_rt.config import preset_config
from mova_rt.models.bridge import apply_rope_rotate_half, rotate_half_tables, video_positions
from mova_rt.models.video_dit import rope_3d_tables
from mova_rt.ops import resolve


def rotate_pairs(x, angle_fn):
    """x [L, D]: pair (2i, 2i+1) of token l rotated by angle_fn(l, i), in float64."""
    out = torch.empty_like(x, dtype=torch.float64)
    L, D = x.shape
    for l in range(L):
        for i in range(D // 2):
            a = angle_fn(l, i)
            c, s = math.cos(a), math.sin(a)
            x0, x1 = x[l, 2 * i].item(), x[l, 2 * i + 1].item()
            out[l, 2 * i] = x0 * c - x1 * s
            out[l, 2 * i + 1] = x0 * s + x1 * c
    return out


def test_3d_rope_split_22_21_21_at_head_dim_128():
    cos, sin = rope_3d_tables(128, (3, 2, 2), "cpu")
    assert cos.shape == (12, 64) and cos.dtype == torch.float64
    # token (f=2, h=1, w=0) -> index 2*4 + 1*2 + 0 = 10
    ang = torch.atan2(sin[10], cos[10])
    f_part = [2 * 10000 ** (-2 * k / 44) for k in range(22)]
    h_part = [1 * 10000 ** (-2 * k / 42) for k in range(21)]
    w_part = [0.0] * 21
    expect = torch.tensor(f_part + h_part + w_part, dtype=torch.float64)
    expect = torch.atan2(torch.sin(expect), torch.cos(expect))
    assert torch.allclose(ang, expect, atol=1e-12)


@pytest.mark.parametrize("kernels", ["reference", "sdpa"])
def test_3d_rope_applied_interleaved(kernels):
    ops = resolve(kernels)
    d, grid = 32, (2, 3, 2)  # head_dim 32: 6 frame pairs, 5 row pairs, 5 column pairs
    x = torch.randn(1, 12, 1, d, dtype=torch.float32)
    cos, sin = rope_3d_tables(d, grid, "cpu")
    got = ops.rope_interleaved(x, cos, sin)[0, :, 0]

    def angle(l, i):
        f, rem = divmod(l, grid[1] * grid[2])
        h, w = divmod(rem, grid[2])
        if i < 6:
            return f * 10000 ** (-2 * i / 12)
        if i < 11:
            return h * 10000 ** (-2 * (i - 6) / 10)
        return w * 10000 ** (-2 * (i - 11) / 10)

    ref = rotate_pairs(x[0, :, 0], angle)
    assert torch.allclose(got.double(), ref, atol=1e-5)


def test_audio_1d_rope_over_whole_head():
    cfg = preset_config("tiny").audio_dit
    from mova_rt.models.audio_dit import AudioDiT
    with torch.device("meta"):
        dit = AudioDiT(cfg, resolve("reference"))
    d = cfg.head_dim
    cos, sin = dit.rope((7,), "cpu").tables()
    x = torch.randn(1, 7, 1, d, dtype=torch.float32)
    got = resolve("reference").rope_interleaved(x, cos, sin)[0, :, 0]
    ref = rotate_pairs(x[0, :, 0], lambda l, i: l * 10000 ** (-2 * i / d))
    assert torch.allclose(got.double(), ref, atol=1e-5)


def test_bridge_video_positions_at_24_fps():
    cfg = preset_config("mova-360p").bridge
    pos = video_positions(cfg, (49, 22, 40), 24.0, "cpu")
    assert pos.shape == (49 * 22 * 40,)
    per_frame = pos.view(49, -1)
    assert torch.all(per_frame == per_frame[:, :1])           # a frame's tokens share a position
    expect = torch.arange(49, dtype=torch.float64) * 50.0 / 6.0
    assert torch.allclose(per_frame[:, 0].double(), expect, atol=1e-4)
    assert per_frame[1, 0].item() == pytest.approx(8.333, abs=1e-3)
    # fps changes the alignment: at 12 fps a latent frame spans twice the audio latents
    pos12 = video_positions(cfg, (3, 1, 1), 12.0, "cpu")
    assert pos12.tolist() == pytest.approx([0.0, 50 / 3, 100 / 3], abs=1e-4)


def test_bridge_first_frame_bias_variant():
    import dataclasses
    cfg = dataclasses.replace(preset_config("mova-360p").bridge, apply_first_frame_bias_in_rope=True)
    pos = video_positions(cfg, (3, 1, 1), 24.0, "cpu")
    assert pos.tolist() == pytest.approx([0.0, 50 / 24, 50 / 24 + 50 / 6], abs=1e-4)


def test_bridge_rotate_half_rope_rounded_once():
    d = 16
    pos = torch.tensor([0.0, 1.0, 8.333333, 402.0])
    cos, sin = rotate_half_tables(pos, d, torch.bfloat16)
    assert cos.dtype == torch.bfloat16 and cos.shape == (4, d)
    inv = [10000 ** (-2 * j / d) for j in range(d // 2)]
    ang = torch.tensor([[p * f for f in inv] * 2 for p in pos.tolist()], dtype=torch.float64)
    assert torch.allclose(cos.double(), ang.cos(), atol=4e-3)   # bf16 rounding of cos/sin
    assert torch.equal(cos, ang.cos().float().to(torch.bfloat16))
    x = torch.randn(1, 4, 2, d).to(torch.bfloat16)
    got = apply_rope_rotate_half(x, cos, sin)
    # Independent rotate-half: channel j pairs with j + d/2.
    xf, c, s = x.double(), cos.double()[None, :, None], sin.double()[None, :, None]
    rot = torch.cat([-xf[..., d // 2:], xf[..., : d // 2]], dim=-1)
    ref = xf * c + rot * s
    assert torch.equal(got, ref.float().to(torch.bfloat16))  # one rounding from exact math
