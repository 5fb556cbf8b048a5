"""The fp8 GEMM kernel (kernels/fp8_gemm.py) through the Triton interpreter against its PyTorch
reference, on awkward shapes (M, N, K not multiples of the tiles), every epilogue, both kinds of
activation scales; and its compile for sm_90 / sm_89."""

import pytest
import torch
import torch.nn.functional as F

from helpers import triton_compile_report

fp8 = pytest.importorskip("mova_rt.kernels.fp8_gemm")
from mova_rt.fp8.quantize import quantize_rows  # noqa: E402

BF16 = torch.bfloat16
BF16_ULP = 2.0 ** -7           # relative spacing of bf16 (8-bit significand)
FP8_ULP = 2.0 ** -3            # relative spacing of e4m3 (4-bit significand)


def _operands(m, n, k, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(m, k, generator=g) * (1 + torch.rand(m, 1, generator=g) * 4)
    w = torch.randn(n, k, generator=g) / k ** 0.5
    bias = (torch.randn(n, generator=g) * 0.1).to(BF16)
    return quantize_rows(x), quantize_rows(w), bias


def _close_bf16(got, want, ulps=1.0):
    """Elementwise within `ulps` bf16 spacings of the reference (fp32 summation order may tip a
    rounding), reported with the max and mean error on failure."""
    err = (got.float() - want.float()).abs()
    bound = ulps * BF16_ULP * want.float().abs() + 1e-6
    assert (err <= bound).all(), f"max {err.max():.3g}, mean {err.mean():.3g}"


@pytest.mark.parametrize("m, n, k", [(45, 200, 160), (1, 128, 128), (130, 72, 300)])
def test_bias_epilogue(m, n, k):
    (aq, sa), (bq, sb), bias = _operands(m, n, k)
    got = fp8.fp8_gemm(aq, sa, bq, sb, bias)
    want = fp8.fp8_gemm_ref(aq, sa, bq, sb, bias)
    assert got.shape == (m, n) and got.dtype == BF16
    _close_bf16(got, want)
    no_bias = fp8.fp8_gemm(aq, sa, bq, sb)
    _close_bf16(no_bias, fp8.fp8_gemm_ref(aq, sa, bq, sb))


def test_gelu_fp8_epilogue_feeds_a_grouped_gemm():
    """FFN up (bias + GELU -> e4m3 with a scale per 128 columns) then FFN down reading those
    grouped scales: each stage against the reference, and the chain against a bf16 FFN."""
    m, d, hidden = 45, 160, 300
    (aq, sa), (wq_up, s_up), b_up = _operands(m, hidden, d, seed=1)
    h_q, h_s = fp8.fp8_gemm(aq, sa, wq_up, s_up, b_up, epilogue=fp8.EPI_GELU_FP8)
    r_q, r_s = fp8.fp8_gemm_ref(aq, sa, wq_up, s_up, b_up, epilogue=fp8.EPI_GELU_FP8)
    assert h_q.dtype == torch.float8_e4m3fn and h_s.shape == (m, 3)
    assert torch.allclose(h_s, r_s, rtol=2 * BF16_ULP)
    deq, ref_deq = (fp8.expand_scales(s, hidden) * q.float() for q, s in ((h_q, h_s), (r_q, r_s)))
    # GELU's tanh (through a sigmoid in the kernel) may move h by a bf16 ulp, and so a value
    # across an e4m3 rounding boundary: one e4m3 step at most
    assert ((deq - ref_deq).abs() <= FP8_ULP * ref_deq.abs() + 1e-6).all()
    (_, _), (wq_dn, s_dn), b_dn = _operands(hidden, d, hidden, seed=2)
    out = fp8.fp8_gemm(h_q, h_s, wq_dn, s_dn, b_dn)
    _close_bf16(out, fp8.fp8_gemm_ref(h_q, h_s, wq_dn, s_dn, b_dn))
    # the whole fp8 FFN against bf16 weights and activations: e4m3-sized error
    x = (aq.float() * sa[:, None]).to(BF16)
    w_up, w_dn = (wq_up.float() * s_up[:, None]).to(BF16), (wq_dn.float() * s_dn[:, None]).to(BF16)
    bf16_ffn = F.linear(F.gelu(F.linear(x, w_up, b_up), approximate="tanh"), w_dn, b_dn)
    rel = ((out.float() - bf16_ffn.float()).norm() / bf16_ffn.float().norm()).item()
    assert rel < 0.06, rel


@pytest.mark.parametrize("grouped,gated", [(False, True), (True, True), (False, False)],
                         ids=["row-scales", "group-scales", "no-gate"])
def test_gate_residual_epilogue(grouped, gated):
    m, n, k, tokens = 45, 200, 256, 15            # 3 batch rows of 15 tokens
    (aq, sa), (bq, sb), bias = _operands(m, n, k, seed=3)
    if grouped:                                    # the same values, scales per 128 columns
        sa = sa[:, None].expand(m, 2).contiguous()
    g = torch.Generator().manual_seed(4)
    res = torch.randn(m, n, generator=g).to(BF16)
    gate = torch.randn(3, n, generator=g).to(BF16)
    if not gated:          # the plain residual of cross-attention: res + y, as with a gate of 1
        got = fp8.fp8_gemm(aq, sa, bq, sb, bias, epilogue=fp8.EPI_GATE_RESIDUAL, res=res)
        want = res + fp8.fp8_gemm_ref(aq, sa, bq, sb, bias)
        assert torch.equal(fp8.fp8_gemm_ref(aq, sa, bq, sb, bias, epilogue=fp8.EPI_GATE_RESIDUAL,
                                            res=res), want)
        err = (got.float() - want.float()).abs()
        assert (err <= 2 * BF16_ULP * want.float().abs() + 1e-6).all(), f"max {err.max():.3g}"
        return
    got = fp8.fp8_gemm(aq, sa, bq, sb, bias, epilogue=fp8.EPI_GATE_RESIDUAL, res=res, gate=gate,
                       tokens=tokens)
    want = fp8.fp8_gemm_ref(aq, sa, bq, sb, bias, epilogue=fp8.EPI_GATE_RESIDUAL, res=res,
                            gate=gate, tokens=tokens)
    y = fp8.fp8_gemm_ref(aq, sa, bq, sb, bias)
    # three roundings; an ulp of y may move the sum by an ulp of |gate * y|
    err = (got.float() - want.float()).abs()
    bound = 2 * BF16_ULP * (want.float().abs() + (gate.repeat_interleave(tokens, 0) * y).float().abs())
    assert (err <= bound + 1e-6).all(), f"max {err.max():.3g}"


def test_bad_operands_are_refused():
    (aq, sa), (bq, sb), _ = _operands(8, 128, 64)
    with pytest.raises(ValueError, match="e4m3 operands"):
        fp8.fp8_gemm(aq.float(), sa, bq, sb)
    with pytest.raises(ValueError, match="A is"):
        fp8.fp8_gemm(aq[:, :32].contiguous(), sa, bq, sb)
    with pytest.raises(ValueError, match="scales"):
        fp8.fp8_gemm(aq, sa[:4], bq, sb)
    with pytest.raises(ValueError, match="EPI_GATE_RESIDUAL needs"):
        fp8.fp8_gemm(aq, sa, bq, sb, epilogue=fp8.EPI_GATE_RESIDUAL)


@pytest.fixture(scope="module")
def compiled():
    return triton_compile_report('mova_rt.kernels.fp8_gemm')


def test_compiles_for_sm90_and_sm89_within_shared_memory(compiled):
    assert len(compiled) == 2 * len(fp8.COMPILE_CASES)
    for r in compiled:
        assert r["shared"] <= r["limit"], r
    assert all(r["wgmma"] for r in compiled if r["arch"] == 90)
