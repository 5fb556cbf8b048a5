"""The adaLN row kernels (kernels/adaln.py) against their eager references and an fp64 truth.

Criteria (style.md item 6): err(kernel, fp64 truth) <= 2 * err(eager same-dtype reference, truth)
+ atol; and in bf16 the kernel equals the eager reference bit for bit on all but a tiny fraction
of elements (fp32 summation order may tip a rounding), and those differ by 1 ulp (of the output,
or of the rounded LN output inside layernorm_modulate; fp32-level noise where a sum cancels to
near 0). gated_residual is bit-exact, which also checks the kernels' round-to-nearest-even.
"""
import json
import os
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

from mova_rt.kernels import adaln

EPS = 1e-6
ATOL = {torch.bfloat16: 1e-3, torch.float32: 1e-6}
MAX_MISMATCH_FRACTION = 1e-3
FP32_NOISE = 16 * torch.finfo(torch.float32).eps         # relative to the output's scale
# (B, L, D): MOVA's 403 audio tokens, an odd row count, awkward and real widths.
SHAPES = [(1, 403, 64), (2, 7, 97), (1, 403, 97), (2, 7, 1536), (1, 403, 1536), (2, 7, 5120),
          (1, 64, 5120)]


def _inputs(b, l, d, dtype):
    """Random non-trivial inputs in `dtype` (x with an offset so the mean matters)."""
    def r(*shape, s=1.0, m=0.0):
        return (m + s * torch.randn(*shape)).to(dtype)
    return dict(x=r(b, l, d, m=0.5), y=r(b, l, d, s=2.0), shift=r(b, 1, d), scale=r(b, 1, d, s=0.5),
                gate=r(b, 1, d), weight=r(d, s=0.5, m=1.0), bias=r(d, s=0.3))


def _d(t):
    return t.double()


def _ulp_bf16(t):
    """Spacing of bf16 values at |t| (8 significant bits: t = m * 2^e with m in [0.5, 1))."""
    _, e = torch.frexp(t.float())
    return torch.ldexp(torch.ones_like(t, dtype=torch.float32), e - 8)


def _check(name, out, ref, truth, slack=0.0):
    """slack: extra per-element deviation from `ref` allowed in bf16 (a propagated 1-ulp
    difference of an intermediate)."""
    dtype = ref.dtype
    assert out.dtype == dtype and out.shape == ref.shape
    err = (out.double() - truth).abs()
    ref_err = (ref.double() - truth).abs()
    differ = out != ref
    info = (f"{name} {dtype} {tuple(out.shape)}: max err {err.max():.3e} (eager ref {ref_err.max():.3e}), "
            f"mean err {err.mean():.3e} (eager ref {ref_err.mean():.3e}), "
            f"{differ.sum().item()}/{out.numel()} elements differ from the eager ref")
    print(info)
    assert err.max() <= 2 * ref_err.max() + ATOL[dtype], info
    assert err.mean() <= 2 * ref_err.mean() + ATOL[dtype], info
    if dtype == torch.bfloat16:
        assert differ.sum().item() <= max(2, MAX_MISMATCH_FRACTION * out.numel()), info
        # 1 ulp of the value, or fp32-level noise where a sum cancels to near 0 (there an fp32
        # difference of a few ulps of the operands is many bf16 ulps of the tiny result).
        noise = FP32_NOISE * ref.abs().max().float()
        allowed = torch.maximum(_ulp_bf16(ref), noise) + slack
        worst = ((out.float() - ref.float()).abs() / allowed).max().item()
        assert worst <= 1, f"{info}; differs by {worst:.2f} x the allowed 1 ulp"


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32], ids=["bf16", "fp32"])
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_ops_match_reference_and_truth(shape, dtype):
    t = _inputs(*shape, dtype)
    x, y, shift, scale, gate, w, b = (t[k] for k in ("x", "y", "shift", "scale", "gate", "weight", "bias"))
    d = shape[-1]

    truth = F.layer_norm(_d(x), (d,), eps=EPS) * (1 + _d(scale)) + _d(shift)
    # The rounded LN output may land 1 ulp away; that ulp is scaled by (1 + scale).
    slack = _ulp_bf16(F.layer_norm(x, (d,), eps=EPS)) * (1 + scale.float()).abs()
    _check("layernorm_modulate", adaln.layernorm_modulate(x, shift, scale, EPS),
           adaln.layernorm_modulate_ref(x, shift, scale, EPS), truth, slack)

    truth = _d(x) + _d(gate) * _d(y)
    _check("gated_residual", adaln.gated_residual(x, gate, y), adaln.gated_residual_ref(x, gate, y),
           truth)

    _check("layernorm_affine", adaln.layernorm_affine(x, w, b, EPS),
           adaln.layernorm_affine_ref(x, w, b, EPS),
           F.layer_norm(_d(x), (d,), _d(w), _d(b), EPS))

    for g in (gate, None):
        label = "gated_residual_layernorm_affine" + ("" if g is not None else "[gate=None]")
        x_new, normed = adaln.gated_residual_layernorm_affine(x, g, y, w, b, EPS)
        x_ref, n_ref = adaln.gated_residual_layernorm_affine_ref(x, g, y, w, b, EPS)
        x_truth = _d(x) + (_d(y) if g is None else _d(g) * _d(y))
        _check(label + ".x", x_new, x_ref, x_truth)
        _check(label + ".normed", normed, n_ref, F.layer_norm(x_truth, (d,), _d(w), _d(b), EPS))


def test_strided_rows_and_broadcast_modulation():
    """Rows strided in B and L (a slice of a wider buffer, every other token), shift/scale/gate
    as chunks of a [B, 6, D] modulation tensor or [1, 1, D]: same bits as contiguous inputs."""
    b, l, d = 2, 9, 97
    buf = torch.randn(b, 2 * l, d + 31).to(torch.bfloat16)
    x = buf[:, ::2, :d]                                        # [B, L, D], strides (.., 2*(D+31), 1)
    y = torch.randn(b, 3 * l, d).to(torch.bfloat16)[:, l:2 * l]
    shift, scale, gate, *_ = torch.randn(b, 6, d).to(torch.bfloat16).chunk(6, dim=1)
    w, bias = torch.randn(d).to(torch.bfloat16), torch.randn(d).to(torch.bfloat16)
    assert not x.is_contiguous() and not y.is_contiguous() and not shift.is_contiguous()
    xc, yc = x.contiguous(), y.contiguous()
    pairs = [
        (adaln.layernorm_modulate(x, shift, scale, EPS),
         adaln.layernorm_modulate(xc, shift.contiguous(), scale.contiguous(), EPS)),
        (adaln.gated_residual(x, gate, y), adaln.gated_residual(xc, gate.contiguous(), yc)),
        (adaln.layernorm_affine(x, w, bias, EPS), adaln.layernorm_affine(xc, w, bias, EPS)),
        (torch.cat(adaln.gated_residual_layernorm_affine(x, gate, y, w, bias, EPS)),
         torch.cat(adaln.gated_residual_layernorm_affine(xc, gate.contiguous(), yc, w, bias, EPS))),
    ]
    for out, expect in pairs:
        assert out.is_contiguous() and torch.equal(out, expect)
    shift1, scale1 = shift[:1], scale[:1]                      # [1, 1, D] broadcast over B
    assert torch.equal(adaln.layernorm_modulate(x, shift1, scale1, EPS),
                       adaln.layernorm_modulate_ref(xc, shift1, scale1, EPS))


def test_bad_inputs_raise_value_error():
    b, l, d = 2, 5, 64
    x, y = torch.randn(b, l, d), torch.randn(b, l, d)
    shift, scale, gate = torch.randn(b, 1, d), torch.randn(b, 1, d), torch.randn(b, 1, d)
    w, bias = torch.randn(d), torch.randn(d)
    not_contiguous = torch.randn(b, d, l).transpose(1, 2)      # [B, L, D] with last-dim stride L
    cases = {
        "x not 3-D": lambda: adaln.layernorm_modulate(x[0], shift, scale, EPS),
        "last dim not contiguous": lambda: adaln.layernorm_modulate(not_contiguous, shift, scale, EPS),
        "y last dim not contiguous": lambda: adaln.gated_residual(x, gate, not_contiguous),
        "shift per token": lambda: adaln.layernorm_modulate(x, torch.randn(b, l, d), scale, EPS),
        "scale wrong width": lambda: adaln.layernorm_modulate(x, shift, torch.randn(b, 1, d + 1), EPS),
        "dtype mismatch": lambda: adaln.layernorm_modulate(x, shift.bfloat16(), scale, EPS),
        "fp16 unsupported": lambda: adaln.layernorm_affine(x.half(), w.half(), bias.half(), EPS),
        "y shape": lambda: adaln.gated_residual(x, gate, y[:, 1:]),
        "gate batch": lambda: adaln.gated_residual(x, torch.randn(3, 1, d), y),
        "weight shape": lambda: adaln.layernorm_affine(x, w[:-1], bias, EPS),
        "bias dtype": lambda: adaln.gated_residual_layernorm_affine(x, None, y, w, bias.double(), EPS),
    }
    for what, call in cases.items():
        with pytest.raises(ValueError):
            call()
            pytest.fail(f"no ValueError for: {what}")


def test_torch_compile_fullgraph_matches_eager():
    """The custom ops trace under torch.compile(fullgraph=True) on CPU and give eager's bits."""
    t = _inputs(2, 7, 97, torch.bfloat16)

    def block(x, y, shift, scale, gate, weight, bias):
        h = adaln.layernorm_modulate(x, shift, scale, EPS)
        x, normed = adaln.gated_residual_layernorm_affine(x, gate, h, weight, bias, EPS)
        x, normed = adaln.gated_residual_layernorm_affine(x, None, normed * 0.5, weight, bias, EPS)
        return x, normed

    eager = block(**t)
    compiled = torch.compile(block, fullgraph=True)(**t)
    for a, b in zip(eager, compiled):
        assert torch.equal(a, b)


# Compiled in a fresh Python without TRITON_INTERPRET: under the interpreter `@triton.jit` yields
# interpreter functions, which cannot be compiled for a GPU.
_COMPILE_SCRIPT = """
import json
from mova_rt.kernels.adaln import COMPILE_CASES
from mova_rt.kernels._triton import compile_for
out = []
for case in COMPILE_CASES:
    for arch in (90, 89):
        k = compile_for(case["kernel"], case["signature"], case["constexprs"], arch=arch,
                        num_warps=case["num_warps"])
        out.append(dict(name=case["name"], arch=arch, shared=k.metadata.shared,
                        fma_bf16="fma.rn.bf16" in k.asm["ptx"]))
print(json.dumps(out))
"""


FP8_SHAPES = [(1, 403, 64), (2, 7, 97), (2, 7, 1536), (1, 64, 5120)]


@pytest.mark.parametrize("shape", FP8_SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_fp8_producers_match_quantize_rows_of_the_bf16_norms(shape):
    """layernorm_modulate_fp8 / layernorm_affine_fp8: the bf16 kernels' rows quantized per token
    as quantize_rows does. Bit-identical e4m3 codes and scales except where the bf16 row already
    differs from the eager one by an ulp (fp32 summation order, <= 1e-3 of elements)."""
    i = _inputs(*shape, torch.bfloat16)
    cases = (("layernorm_modulate_fp8", adaln.layernorm_modulate_fp8(i["x"], i["shift"], i["scale"], EPS),
              adaln.layernorm_modulate_fp8_ref(i["x"], i["shift"], i["scale"], EPS)),
             ("layernorm_affine_fp8", adaln.layernorm_affine_fp8(i["x"], i["weight"], i["bias"], EPS),
              adaln.layernorm_affine_fp8_ref(i["x"], i["weight"], i["bias"], EPS)))
    for name, (q, s), (rq, rs) in cases:
        assert q.dtype == torch.float8_e4m3fn and q.shape == shape and s.shape == shape[:2]
        assert s.dtype == torch.float32
        codes = (q.view(torch.uint8) != rq.view(torch.uint8)).float().mean().item()
        scales = ((s - rs).abs() / rs).max().item()
        print(f"{name} {shape}: {codes:.2e} of codes and scales by {scales:.2e} differ")
        assert codes <= MAX_MISMATCH_FRACTION and scales <= 2 ** -8
        # and the dequantized rows are e4m3-close to the bf16 ones (half an e4m3 step: 2^-4)
        deq = q.float() * s[..., None]
        ref = adaln.layernorm_modulate_ref(i["x"], i["shift"], i["scale"], EPS) if "modulate" in name \
            else adaln.layernorm_affine_ref(i["x"], i["weight"], i["bias"], EPS)
        floor = 2 ** -9 * s[..., None]          # e4m3 subnormal spacing at this row's scale
        assert ((deq - ref.float()).abs() <= 2 ** -4 * ref.float().abs() + floor + 1e-7).all()


def test_fp8_producers_refuse_other_dtypes():
    i = _inputs(1, 5, 64, torch.float32)
    with pytest.raises(ValueError, match="bf16 activations"):
        adaln.layernorm_modulate_fp8(i["x"], i["shift"], i["scale"], EPS)
    with pytest.raises(ValueError, match="bf16 activations"):
        adaln.layernorm_affine_fp8(i["x"], i["weight"], i["bias"], EPS)


def test_kernels_compile_for_sm90_and_sm89():
    from mova_rt.kernels._triton import SHARED_MEMORY_LIMIT

    names = {c["name"] for c in adaln.COMPILE_CASES}
    assert len(names) == 14 and any("5120" in n for n in names) and any("1536" in n for n in names)
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    proc = subprocess.run([sys.executable, "-c", _COMPILE_SCRIPT], env=env, capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-4000:]
    results = json.loads(proc.stdout.strip().splitlines()[-1])
    assert len(results) == 2 * len(adaln.COMPILE_CASES)
    for r in results:
        print(r)
        assert r["shared"] <= SHARED_MEMORY_LIMIT[r["arch"]], r
        # The bf16 roundings of the eager code must survive: no single-rounding bf16 FMA.
        assert not r["fma_bf16"], r
