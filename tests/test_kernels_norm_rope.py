"""kernels/norm_rope.py: q/k RMSNorm over all heads + RoPE in one pass, against the eager path
(mova_rt.ops norm_rope `float32`: what the `sdpa` kernel set computes) and an fp32 truth, through
the Triton interpreter on random inputs and awkward shapes; and compiled for sm_90."""
import pytest
import torch

from helpers import triton_compile_report
from mova_rt.ops import _REGISTRY, rms_norm_heads
from mova_rt.rope import InterleavedRope, RotateHalfRope, apply_rope_rotate_half

BF16 = torch.bfloat16


def _eager():
    return _REGISTRY["norm_rope"]["float32"]


def _triton():
    from mova_rt.kernels import backends  # noqa: F401  (registers the triton backends)
    return _REGISTRY["norm_rope"]["triton"]


def _truth(x, w, eps, rope):
    """Everything in fp64 from the same bf16 inputs, one final comparison."""
    n = rms_norm_heads(x.double(), w.double(), eps)
    if rope is None:
        return n
    if isinstance(rope, RotateHalfRope):
        cos, sin = rope.tables()
        return apply_rope_rotate_half(n, cos.double(), sin.double())
    cos, sin = rope.tables()
    b, l, h, d = n.shape
    p = n.reshape(b, l, h, d // 2, 2)
    a, c = p[..., 0], p[..., 1]
    cs, sn = cos[None, :, None, :], sin[None, :, None, :]
    return torch.stack((a * cs - c * sn, a * sn + c * cs), -1).reshape(b, l, h, d)


def _rel(a, b):
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


def _ropes(kind, l, d):
    if kind == "interleaved":          # the video's 3D grid where l allows, else the audio's 1D
        return (InterleavedRope.video(d, (l // 15, 3, 5), "cpu") if l % 15 == 0 else
                InterleavedRope.audio(d, l, "cpu"))
    if kind == "rotate_half":
        return RotateHalfRope(torch.arange(l).float() * 0.37, 1, d, BF16)
    return None


@pytest.mark.parametrize("kind,b,l,h,d", [("interleaved", 2, 45, 3, 32),
                                          ("interleaved", 1, 37, 5, 16),
                                          ("rotate_half", 1, 29, 4, 32),
                                          ("none", 2, 13, 3, 64)])
def test_matches_the_eager_path_and_is_as_close_to_the_truth(kind, b, l, h, d):
    g = torch.Generator().manual_seed(hash((kind, l)) % 1000)
    # a strided view of a fused q|k|v projection, as the blocks hand it over
    qkv = (torch.randn(b, l, 3 * h * d, generator=g) * 3 + 0.5).to(BF16)
    x = qkv[..., h * d: 2 * h * d].view(b, l, h, d)
    w = (1 + 0.3 * torch.randn(h * d, generator=g)).to(BF16)
    rope, half = _ropes(kind, l, d), kind == "rotate_half"
    got, eager = _triton()(x, w, 1e-6, rope, half), _eager()(x, w, 1e-6, rope, half)
    assert got.shape == (b, l, h, d) and got.dtype == BF16 and got.is_contiguous()
    truth = _truth(x, w, 1e-6, rope)
    e_got, e_eager = _rel(got, truth), _rel(eager, truth)
    differ = (got != eager).float().mean().item()
    print(f"{kind}: kernel {e_got:.2e}, eager {e_eager:.2e} from fp64; {differ:.2e} differ")
    assert e_got <= 1.5 * e_eager + 1e-6
    # the same roundings as the eager path: where they differ, by one bf16 ulp (an fp32 sum
    # order or a fused multiply-add tipping a tie), rarely
    ulp = (eager.float().abs() * 2 ** -7).clamp_min(2 ** -126)
    assert ((got.float() - eager.float()).abs() <= ulp).all()
    assert differ <= 1e-2


def test_fp32_input_takes_the_eager_path_and_bad_input_is_refused():
    from mova_rt.kernels.norm_rope import ROPE_INTERLEAVED, norm_rope
    x = torch.randn(1, 6, 2, 16)
    w = torch.ones(32)
    rope = InterleavedRope.audio(16, 6, "cpu")
    assert torch.equal(_triton()(x, w, 1e-6, rope), _eager()(x, w, 1e-6, rope))
    with pytest.raises(ValueError, match="bf16"):
        norm_rope(x, w, 1e-6)
    with pytest.raises(ValueError, match="cos/sin"):
        norm_rope(x.to(BF16), w.to(BF16), 1e-6, ROPE_INTERLEAVED, None, None)


@pytest.fixture(scope="module")
def compiled():
    return triton_compile_report("mova_rt.kernels.norm_rope", archs=(90,), details=True)


def test_compiles_for_sm90_at_mova_widths(compiled):
    """One pass at 128-bit loads: vectorised, no local memory (spills), no integer division
    per element (the token's batch and row are split once per program: 64-bit scalar ops)."""
    assert len(compiled) == 6
    for row in compiled:
        assert row["shared"] <= row["limit"], row
        assert row["vector_loads"] > 0, row
        assert row["local_insts"] == 0 and row["spill_stores"] == 0, row
