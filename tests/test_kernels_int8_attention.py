"""8-bit attention (kernels/attention_int8.py) through the Triton interpreter: against its own
quantization reference, against fp32 attention next to bf16's own error, the smoothing's effect,
the per-layer error in the tiny model, and the compile for sm_90 / sm_89."""

import pytest
import torch
import torch.nn.functional as F

from helpers import triton_compile_report

att8 = pytest.importorskip("mova_rt.kernels.attention_int8")
BF16 = torch.bfloat16


def _sdpa(q, k, v):
    return F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2),
                                          v.transpose(1, 2)).transpose(1, 2)


def _rel(x, y):
    return ((x.float() - y.float()).norm() / y.float().norm()).item()


def _qkv(lq, lk, h, d, offset=3.0, seed=0):
    """Random q, k, v; k with a common offset per head (as real keys have), which smoothing
    removes before quantizing."""
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(2, lq, h, d, generator=g)
    k = torch.randn(2, lk, h, d, generator=g) + offset * torch.randn(1, 1, h, d, generator=g)
    v = torch.randn(2, lk, h, d, generator=g)
    return q, k, v


@pytest.mark.parametrize("lq, lk, h, d", [(45, 37, 3, 64), (70, 403, 2, 128), (33, 65, 2, 32)])
def test_int8_attention_error(lq, lk, h, d):
    q, k, v = _qkv(lq, lk, h, d)
    truth = _sdpa(q, k, v)
    qb, kb, vb = q.to(BF16), k.to(BF16), v.to(BF16)
    got = att8.attention_int8(qb, kb, vb)
    assert got.shape == qb.shape and got.dtype == BF16
    bf16_err = _rel(_sdpa(qb, kb, vb), truth)
    err, own = _rel(got, truth), _rel(got, att8.attention_int8_ref(qb, kb, vb))
    print(f"L {lq}x{lk} d {d}: int8 {err:.4f}, bf16 {bf16_err:.4f}, kernel vs its ref {own:.4f}")
    assert own <= 1.5 * bf16_err            # the kernel = its quantization + bf16 p rounding
    assert err <= 0.025 and err <= 4 * bf16_err


def test_smoothing_k_reduces_the_error():
    q, k, v = _qkv(70, 403, 2, 128, offset=5.0, seed=1)
    truth = _sdpa(q, k, v)
    qb, kb, vb = q.to(BF16), k.to(BF16), v.to(BF16)
    smoothed = _rel(att8.attention_int8_ref(qb, kb, vb), truth)
    raw = _rel(att8.attention_int8_ref(qb, kb, vb, smooth=False), truth)
    assert smoothed < 0.7 * raw, (smoothed, raw)


def test_bad_shapes_are_refused():
    q, k, v = (t.to(BF16) for t in _qkv(8, 8, 1, 48))
    with pytest.raises(ValueError, match="head dims 32/64/128"):
        att8.attention_int8(q, k, v)


def test_per_layer_error_in_the_tiny_model(tiny_ckpt):
    """Every attention of one forward (self-attention of both towers, bridge both ways, text
    cross-attention) through 8-bit attention (norm + RoPE fused in its prologue) and through the
    bf16 Triton kernel on the same raw projections: the error of each layer against the bf16
    kernel, reported, held under 3%."""
    import dataclasses

    from mova_rt.ops import resolve
    from mova_rt.pipeline import MovaPipeline

    errors = []

    def recorder(int8, bf16):
        def both(*args, **kwargs):
            out = int8(*args, **kwargs)
            errors.append(_rel(out, bf16(*args, **kwargs)))
            return out
        return both

    pipe = MovaPipeline.from_pretrained(tiny_ckpt, dtype="bf16", kernels="triton-int8attn")
    int8, bf16 = resolve("triton-int8attn"), resolve("triton")
    ops = dataclasses.replace(
        int8, self_attention=recorder(int8.self_attention, bf16.self_attention),
        cross_attention=recorder(int8.cross_attention, bf16.cross_attention))
    for tower in (pipe.video_dit, pipe.audio_dit, pipe.bridge):
        for module in tower.modules():
            if hasattr(module, "ops"):
                module.ops = ops
    g = torch.Generator().manual_seed(0)
    v, a, text = (torch.randn(1, 36, 5, 8, 12, generator=g), torch.randn(1, 16, 36, generator=g),
                  torch.randn(1, 512, 32, generator=g))
    pipe._forward(pipe.video_dit, v, a, text, torch.tensor([700.0]), 24.0)
    print("int8 attention error per call against the bf16 kernel:",
          " ".join(f"{e:.4f}" for e in errors))
    # 3 video + 2 audio self, 2 x 2 bridge, 3 + 2 text cross-attentions
    assert len(errors) == 14 and 0 < max(errors) < 0.03


def _rope_cases():
    from mova_rt.rope import InterleavedRope, RotateHalfRope
    return {
        "video-interleaved": ((2, 60, 3, 128), (2, 60, 3, 128),
                              lambda: (InterleavedRope.video(128, (3, 4, 5), "cpu"),) * 2),
        "audio-interleaved": ((1, 45, 2, 64), (1, 45, 2, 64),
                              lambda: (InterleavedRope.audio(64, 45, "cpu"),) * 2),
        "bridge-rotate-half": ((1, 19, 2, 32), (1, 403, 2, 32),
                               lambda: (RotateHalfRope(torch.arange(19).float(), 1, 32, BF16),
                                        RotateHalfRope(torch.arange(31).float() * 8.33, 13, 32,
                                                       BF16))),
        "text-no-rope": ((2, 37, 2, 64), (2, 512, 2, 64), lambda: (None, None)),
    }


@pytest.mark.parametrize("case", list(_rope_cases()))
def test_fused_prologue_matches_norm_rope_then_quantize(case):
    """The prologue kernel (RMSNorm + RoPE + smoothing + int8 per block in one read of the bf16
    projection) against the same steps in PyTorch, q and k sides, every RoPE variant; then the
    whole fused attention against the plain 8-bit attention of the normalised, rotated q/k."""
    from mova_rt.kernels.rope_tiles import rope_arguments
    from mova_rt.ops import _REGISTRY, compose_cross_attention, compose_self_attention

    qshape, kshape, ropes = _rope_cases()[case]
    q_rope, k_rope = ropes()
    g = torch.Generator().manual_seed(5)
    q = (torch.randn(*qshape, generator=g) * 2 + 0.3).to(BF16)
    k = (torch.randn(*kshape, generator=g) * 2 + 1.5).to(BF16)
    v = torch.randn(*kshape, generator=g).to(BF16)
    hd = qshape[2] * qshape[3]
    wq, wk = ((1 + 0.3 * torch.randn(hd, generator=g)).to(BF16) for _ in range(2))
    kind, qa, qb, qg, ka, kb, kg, inv, rt = rope_arguments(q, k, q_rope, k_rope)
    for x, w, ta, tb, geom, rope, block, smooth in (
            (q, wq, qa, qb, qg, q_rope, att8.BLOCK_M, False),
            (k, wk, ka, kb, kg, k_rope, att8.BLOCK_N, True)):
        got, s = att8._prologue(x, w, 1e-6, kind, ta, tb, inv, geom, rt, block, smooth)
        ref, rs = att8.prologue_ref(x, w, 1e-6, rope, block, smooth)
        off = (got.int() - ref.int()).abs()
        print(f"{case} smooth={smooth}: {(off > 0).float().mean():.2e} of codes differ")
        assert off.max() <= 1 and (off > 0).float().mean() <= 1e-3
        assert torch.allclose(s, rs, rtol=1e-5, atol=0)
    fused = att8.fused_attention_int8(q, k, v, wq, wk, 1e-6, q_rope, k_rope)
    # the plain op on the same normalised, rotated q/k (the composed kernel sets' prologue)
    norm_rope = _REGISTRY["norm_rope"]["float32"]
    plain = (compose_self_attention(norm_rope, att8.attention_int8)(
        q, k, v, wq, wk, 1e-6, q_rope) if case.endswith("interleaved") else
        compose_cross_attention(norm_rope, att8.attention_int8)(q, k, v, wq, wk, 1e-6, q_rope,
                                                                 k_rope))
    assert fused.shape == q.shape[:3] + (v.shape[3],) and fused.dtype == BF16
    assert _rel(fused, plain) < 2e-3, _rel(fused, plain)


@pytest.fixture(scope="module")
def compiled():
    return triton_compile_report('mova_rt.kernels.attention_int8')


def test_compiles_for_sm90_and_sm89_within_shared_memory(compiled):
    assert len(compiled) == 2 * len(att8.COMPILE_CASES)
    for r in compiled:
        assert r["shared"] <= r["limit"], r
