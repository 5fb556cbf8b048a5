"""The fused attention kernel (norm + RoPE + attention) through the Triton interpreter against the
exact PyTorch composition, the compile check for real GPUs, and the whole tiny model on the
`triton` kernel set against `reference`.

Tolerance (style.md 6): err(kernel, fp32 truth) <= 2 * err(torch bf16, fp32 truth) + 1e-3, where
the truth runs the eager steps (bf16 norm and RoPE roundings included) with fp32 attention, and
"torch bf16" is PyTorch's own bf16 SDPA on the same inputs."""

import pytest
import torch
import torch.nn.functional as F

from helpers import triton_compile_report
from mova_rt.ops import (apply_rope_rotate_half, resolve, rms_norm_heads, rope_interleaved_f64)
from mova_rt.rope import InterleavedRope, RotateHalfRope

attention = pytest.importorskip("mova_rt.kernels.attention")
BF16 = torch.bfloat16


def _prepared(q, k, wq, wk, eps, q_rope, k_rope):
    """The eager path's normalised and rotated q, k (bf16)."""
    if wq is not None:
        q = rms_norm_heads(q, wq, eps)
    if wk is not None:
        k = rms_norm_heads(k, wk, eps)
    if isinstance(q_rope, InterleavedRope):
        q = rope_interleaved_f64(q, *q_rope.tables())
        k = rope_interleaved_f64(k, *k_rope.tables())
    else:
        if q_rope is not None:
            q = apply_rope_rotate_half(q, *q_rope.tables())
        if k_rope is not None:
            k = apply_rope_rotate_half(k, *k_rope.tables())
    return q, k


def _sdpa(q, k, v, dtype):
    out = F.scaled_dot_product_attention(*(x.transpose(1, 2).to(dtype) for x in (q, k, v)))
    return out.transpose(1, 2)


def _check(out, q, k, v, wq, wk, eps, q_rope, k_rope):
    qp, kp = _prepared(q, k, wq, wk, eps, q_rope, k_rope)
    truth = _sdpa(qp, kp, v, torch.float32)
    torch_err = (_sdpa(qp, kp, v, BF16).float() - truth).abs().max().item()
    err = (out.float() - truth).abs()
    assert out.shape == q.shape and out.dtype == BF16
    assert err.max().item() <= 2 * torch_err + 1e-3, (
        f"max err {err.max().item():.3g} (mean {err.mean().item():.3g}) vs torch bf16 "
        f"{torch_err:.3g}")


def _inputs(b, lq, lk, h, d, seed=0):
    g = torch.Generator().manual_seed(seed)
    q = (torch.randn(b, lq, h * d, generator=g) * 2).to(BF16).view(b, lq, h, d)
    k = (torch.randn(b, lk, h * d, generator=g) * 2).to(BF16).view(b, lk, h, d)
    v = torch.randn(b, lk, h, d, generator=g).to(BF16)
    wq = (1 + 0.2 * torch.randn(h * d, generator=g)).to(BF16)
    wk = (1 + 0.2 * torch.randn(h * d, generator=g)).to(BF16)
    return q, k, v, wq, wk


@pytest.mark.parametrize("grid, heads, d", [((3, 2, 5), 2, 32), ((2, 3, 7), 1, 128),
                                            ((5, 1, 1), 2, 32)])
def test_self_attention_3d_rope(grid, heads, d):
    """Video self-attention: 3D interleaved RoPE, lengths not multiples of the 16-row tiles."""
    length = grid[0] * grid[1] * grid[2]
    q, k, v, wq, wk = _inputs(1, length, length, heads, d)
    rope = InterleavedRope.video(d, grid, "cpu")
    out = attention.fused_attention(q, k, v, wq, wk, 1e-6, rope, rope)
    _check(out, q, k, v, wq, wk, 1e-6, rope, rope)


def test_self_attention_audio_1d_rope_403():
    """The audio tower's 1D RoPE through the same kernel, at MOVA's real 403 audio tokens."""
    q, k, v, wq, wk = _inputs(1, 403, 403, 1, 32, seed=1)
    rope = InterleavedRope.audio(32, 403, "cpu")
    out = attention.fused_attention(q, k, v, wq, wk, 1e-6, rope, rope)
    _check(out, q, k, v, wq, wk, 1e-6, rope, rope)


@pytest.mark.parametrize("first_frame_bias", [False, True])
def test_bridge_attention_both_ways(first_frame_bias):
    """a2v (video queries x audio keys) and v2a (audio x video) with rotate-half RoPE and the
    aligned fractional positions computed in the kernel."""
    import dataclasses

    from mova_rt.config import preset_config
    from mova_rt.models.bridge import Bridge

    cfg = dataclasses.replace(preset_config("tiny").bridge,
                              apply_first_frame_bias_in_rope=first_frame_bias)
    with torch.device("meta"):
        bridge = Bridge(cfg, resolve("reference"))
    grid, la = (5, 2, 3), 37
    vr, ar = bridge.rope(grid, la, 24.0, BF16, "cpu")
    d = cfg.head_dim
    q, k, v, wq, wk = _inputs(2, 30, la, 2, d, seed=2)
    _check(attention.fused_attention(q, k, v, wq, wk, 1e-6, vr, ar), q, k, v, wq, wk, 1e-6, vr, ar)
    q, k, v, wq, wk = _inputs(1, la, 30, 2, d, seed=3)
    _check(attention.fused_attention(q, k, v, wq, wk, 1e-6, ar, vr), q, k, v, wq, wk, 1e-6, ar, vr)


def test_split_kv_equals_one_pass():
    """Few queries over many keys (v2a): split-KV partials combine to the one-pass result."""
    q, k, v, wq, wk = _inputs(1, 19, 403, 2, 32, seed=4)
    qr = RotateHalfRope(torch.arange(19).float(), 1, 32, BF16)
    kr = RotateHalfRope(torch.arange(31).float() * 8.33, 13, 32, BF16)      # 31 x 13 = 403 keys
    one = attention.fused_attention(q, k, v, wq, wk, 1e-6, qr, kr, splits=1)
    split = attention.fused_attention(q, k, v, wq, wk, 1e-6, qr, kr, splits=3)
    _check(split, q, k, v, wq, wk, 1e-6, qr, kr)
    assert (split.float() - one.float()).abs().max().item() <= 2 ** -7


def test_text_cross_attention_no_rope_512_keys():
    q, k, v, wq, wk = _inputs(1, 21, 512, 2, 32, seed=5)
    out = attention.fused_attention(q, k, v, wq, wk, 1e-6)
    _check(out, q, k, v, wq, wk, 1e-6, None, None)


def test_split_count_fills_the_gpu():
    assert attention.split_count(12, 403, 43120, 132) > 1          # v2a: 48 programs
    assert attention.split_count(40, 43120, 43120, 132) == 1       # self-attention
    assert attention.split_count(40, 43120, 403, 132) == 1         # a2v: few keys


def test_bad_input_is_refused():
    q, k, v, wq, wk = _inputs(1, 8, 8, 2, 32)
    with pytest.raises(ValueError, match="bf16"):
        attention.fused_attention(q.float(), k.float(), v.float())
    with pytest.raises(ValueError, match="disagree"):
        attention.fused_attention(q, k[:, :, :1], v)
    with pytest.raises(ValueError, match="do not fit"):
        rope = InterleavedRope.video(32, (3, 1, 1), "cpu")
        attention.fused_attention(q, k, v, wq, wk, 1e-6, rope, rope)


# ---------------------------------------------------------------------------------------------
# Compile for real GPUs (no GPU needed)
# ---------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def compiled():
    """Every COMPILE_CASES entry built for sm_90 and sm_89, in a fresh process without
    TRITON_INTERPRET (under it @triton.jit yields interpreter functions)."""
    return triton_compile_report('mova_rt.kernels.attention')


def test_compiles_for_sm90_every_config_fits_and_uses_wgmma(compiled):
    rows = [r for r in compiled if r["arch"] == 90]
    assert len(rows) == len(attention.COMPILE_CASES)
    for r in rows:
        assert r["shared"] <= r["limit"] and r["wgmma"], r


def test_compiles_for_sm89_some_config_fits_each_variant(compiled):
    """On sm_89 (99 KiB of shared memory) the autotuner skips the configs that do not fit; every
    RoPE variant keeps at least one that does."""
    variants = {}
    for r in compiled:
        if r["arch"] == 89:
            variants.setdefault(r["name"].rsplit(" ", 1)[0], []).append(r["shared"] <= r["limit"])
    assert len(variants) == 4 and all(any(v) for v in variants.values()), variants


# ---------------------------------------------------------------------------------------------
# The whole tiny model
# ---------------------------------------------------------------------------------------------
def test_tiny_model_triton_against_reference():
    """One joint forward of the tiny model (random bf16 weights) on `triton` vs `reference`:
    relative error <= 1e-2 (the issue's target), and no worse than twice the reference path's
    own bf16 error against the same weights in fp32."""
    from mova_rt.benchmarks.bench_step import build_shared_weights, make_inputs
    from mova_rt.benchmarks.configs import eager_runner
    from mova_rt.benchmarks.flops import clip_shapes
    from mova_rt.config import PRESET_SIZES, preset_config
    from mova_rt.scheduler import FlowMatchScheduler

    cfg = preset_config("tiny")
    s = clip_shapes(cfg, *PRESET_SIZES["tiny"])
    dev = torch.device("cpu")
    shared = build_shared_weights(cfg, dev, None, seed=3)
    inp = make_inputs(cfg, s, dev, seed=3)
    sched = FlowMatchScheduler(cfg.scheduler, 50)
    x = torch.cat([inp["latents"], inp["condition"]], 1)
    t = torch.tensor([900.0])

    def forward(kernels, weights=shared, text=inp["pos"]):
        r = eager_runner(kernels)(weights, cfg, sched, 5.0, 24.0)
        with torch.no_grad():
            return [o.float() for o in r.step.forward(r.video_dit, x, inp["audio"], text, t, 24.0)]

    ref = forward("reference")
    tri = forward("triton")
    fp32 = forward("reference", {k: m.float() for k, m in
                                 ((k, _copy(m)) for k, m in shared.items())}, inp["pos"].float())
    for r, k, f in zip(ref, tri, fp32):
        rel = ((k - r).norm() / r.norm()).item()
        assert rel <= 1e-2, rel
        assert (k - f).norm() <= 2 * (r - f).norm() + 1e-6


def _copy(module):
    import copy
    return copy.deepcopy(module)
