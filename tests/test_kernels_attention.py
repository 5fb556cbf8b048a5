"""The bf16 attention kernel (kernels/attention.py) through the Triton interpreter against an fp32
truth, its split-KV path, the thin fused_attention (q/k norm + RoPE in PyTorch, then the kernel),
and the sm_90 code of every variant compiled on the CPU.

Tolerance (style.md 6): err(kernel, fp32 truth) <= 2 * err(torch bf16 SDPA, fp32 truth) + 1e-3
(max abs), the truth being attention_ref on the same bf16 inputs in fp32. The interpreter runs
32 x 32 tiles, so the shapes below cover several query blocks, full key tiles and ragged ends.
"""

import pytest
import torch
import torch.nn.functional as F

from helpers import check_hopper_properties, triton_compile_report
from mova_rt.ops import apply_rope_rotate_half, resolve, rms_norm_heads, rope_interleaved_f32
from mova_rt.rope import InterleavedRope, RotateHalfRope

attention = pytest.importorskip("mova_rt.kernels.attention")
BF16 = torch.bfloat16
MOVA_CONFIG = "attention d=128 split=0 128x128 w8 s2"


def qkv_inputs(b, lq, lk, h, d, seed=0, std=1.0):
    """q, k, v as the model hands them over: k and v strided views of one projection
    [B, Lk, 3*H*D] (q too when Lq == Lk), values like normalised q/k (std ~1)."""
    g = torch.Generator().manual_seed(seed)
    fused = (torch.randn(b, lk, 3, h, d, generator=g) * std).to(BF16)
    k, v = fused[:, :, 1], fused[:, :, 2]
    q = fused[:, :, 0] if lq == lk else (torch.randn(b, lq, h, d, generator=g) * std).to(BF16)
    return q, k, v


def sdpa(q, k, v, dtype):
    return F.scaled_dot_product_attention(
        *(x.transpose(1, 2).to(dtype) for x in (q, k, v))).transpose(1, 2)


def check_against_truth(out, q, k, v, atol=1e-3):
    """style.md 6 against the fp32 truth; returns (kernel error, torch bf16 error), max abs."""
    truth = attention.attention_ref(q.float(), k.float(), v.float())
    torch_err = (sdpa(q, k, v, BF16).float() - truth).abs().max().item()
    err = (out.float() - truth).abs()
    assert out.shape == q.shape[:3] + (v.shape[3],) and out.dtype == BF16
    assert out.is_contiguous()
    assert err.max().item() <= 2 * torch_err + atol, (
        f"max err {err.max().item():.3g} (mean {err.mean().item():.3g}) vs torch bf16 "
        f"{torch_err:.3g}")
    return err.max().item(), torch_err


@pytest.mark.parametrize("b, lq, lk, h, d", [
    (1, 97, 97, 2, 128),        # self-attention on views of a fused q|k|v projection
    (1, 130, 403, 1, 128),      # MOVA's 403 audio tokens as keys (a2v-like)
    (2, 33, 1025, 1, 64),       # batch 2, head dim 64, one key past a tile boundary
])
def test_matches_fp32_truth(b, lq, lk, h, d):
    q, k, v = qkv_inputs(b, lq, lk, h, d, seed=lq + lk)
    err, torch_err = check_against_truth(attention.attention(q, k, v), q, k, v)
    print(f"{b}x{lq}x{lk}x{h}x{d}: max err {err:.3g}, torch bf16 {torch_err:.3g}")


def test_split_kv_matches_truth_and_one_pass():
    """Few queries over many keys (v2a): 4 key splits combine to the one-pass result."""
    q, k, v = qkv_inputs(1, 19, 1025, 2, 128, seed=4)
    one = attention.attention(q, k, v, splits=1)
    split = attention.attention(q, k, v, splits=4)
    err, torch_err = check_against_truth(split, q, k, v)
    print(f"split-KV 19x1025: max err {err:.3g}, torch bf16 {torch_err:.3g}")
    assert (split.float() - one.float()).abs().max().item() <= 2 * torch_err


def _prepared(q, k, wq, wk, eps, q_rope, k_rope):
    """The eager path's normalised and rotated q, k (bf16), as the composed kernel sets do it."""
    q, k = rms_norm_heads(q, wq, eps), rms_norm_heads(k, wk, eps)
    if isinstance(q_rope, InterleavedRope):
        return rope_interleaved_f32(q, *q_rope.tables()), rope_interleaved_f32(k, *k_rope.tables())
    if q_rope is not None:
        q = apply_rope_rotate_half(q, *q_rope.tables())
    if k_rope is not None:
        k = apply_rope_rotate_half(k, *k_rope.tables())
    return q, k


@pytest.mark.parametrize("case", ["video-3d-rope", "bridge-rotate-half"])
def test_fused_attention_norm_rope_then_kernel(case):
    """The kernel sets' entry point: RMSNorm over heads + RoPE (PyTorch) then the kernel, against
    the same prologue with fp32 attention."""
    if case == "video-3d-rope":
        q, k, v = qkv_inputs(1, 60, 60, 2, 128, seed=7, std=2.0)
        q_rope = k_rope = InterleavedRope.video(128, (3, 4, 5), "cpu")
    else:
        q, k, v = qkv_inputs(1, 40, 65, 2, 128, seed=8, std=2.0)
        q_rope = RotateHalfRope(torch.arange(40).float(), 1, 128, BF16)
        k_rope = RotateHalfRope(torch.arange(5).float() * 8.33, 13, 128, BF16)
    g = torch.Generator().manual_seed(9)
    wq, wk = ((1 + 0.2 * torch.randn(2 * 128, generator=g)).to(BF16) for _ in range(2))
    out = attention.fused_attention(q, k, v, wq, wk, 1e-6, q_rope, k_rope)
    qp, kp = _prepared(q, k, wq, wk, 1e-6, q_rope, k_rope)
    check_against_truth(out, qp, kp, v)


def test_split_count_and_chunks():
    assert attention.split_count(12, 403, 43120, 132) == 8          # v2a: 48 query programs
    assert attention.split_count(40, 43120, 43120, 132) == 1        # self-attention
    assert attention.split_count(40, 43120, 403, 132) == 1          # a2v: few keys
    assert attention.split_count(1, 512, 3000, 132) == 2            # capped: >= 1024 keys each
    for lk, splits in ((43120, 8), (2100, 16), (1025, 4), (128, 2)):
        s, chunk = attention.split_chunk(lk, splits)
        assert chunk % attention.MAX_BLOCK_N == 0 and (s - 1) * chunk < lk <= s * chunk, (lk, s)
        assert s & (s - 1) == 0


def test_tma_ready_copies_only_what_tma_cannot_address():
    q, k, v = qkv_inputs(1, 16, 16, 2, 64)
    assert attention.tma_ready(k) is k                          # a strided view, aligned
    flat = torch.randn(1 + 16 * 2 * 64).to(BF16)
    shifted = flat[1:].view(1, 16, 2, 64)                       # contiguous, base 2 B off
    fixed = attention.tma_ready(shifted)
    assert fixed.data_ptr() % 16 == 0 and torch.equal(fixed, shifted)
    odd = torch.randn(1, 16, 2, 68).to(BF16)[..., :64]          # rows of 136 B
    assert attention.tma_ready(odd).stride(1) == 128


def test_bad_input_is_refused():
    q, k, v = qkv_inputs(1, 8, 8, 2, 64)
    with pytest.raises(ValueError, match="bfloat16"):
        attention.attention(q.float(), k.float(), v.float())
    with pytest.raises(ValueError, match="disagree"):
        attention.attention(q, k[:, :, :1], v[:, :, :1])
    with pytest.raises(ValueError, match="head dim"):
        attention.attention(q[..., :48], k[..., :48], v[..., :48])


def test_custom_op_has_a_fake():
    """register_fake: shape propagation without running the kernel (torch.compile's view)."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    with FakeTensorMode():
        q = torch.empty(2, 403, 12, 128, dtype=BF16)
        k = torch.empty(2, 43120, 12, 128, dtype=BF16)
        out = torch.ops.mova_rt.attention(q, k, k, 8)
    assert out.shape == (2, 403, 12, 128) and out.dtype == BF16


# ---------------------------------------------------------------------------------------------
# The sm_90 code of every variant (no GPU needed)
# ---------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def compiled():
    """Every COMPILE_CASES entry built afresh for sm_90 in a process without TRITON_INTERPRET,
    with the ptxas -v log of the build; the MOVA config also through the CUDA toolkit's ptxas."""
    return triton_compile_report("mova_rt.kernels.attention", archs=(90,), details=True, jobs=2,
                                 toolkit_ptxas=(MOVA_CONFIG,))


def test_every_variant_has_the_hopper_properties(compiled):
    """Every autotune config, split and not: wgmma (bf16) in the key loop and no pre-Hopper mma,
    no spills or local memory, no integer division anywhere, no division in the loop, shared
    memory within the SM and under the prune predicate's estimate."""
    assert len(compiled) == len(attention.COMPILE_CASES)
    assert check_hopper_properties(compiled, "attention", "bf16.bf16")


def test_toolkit_ptxas_agrees(compiled):
    """The CUDA toolkit's ptxas (-arch=sm_90a) on the MOVA config's PTX: no spills either."""
    row = next(r for r in compiled if r["name"] == MOVA_CONFIG)
    tk = row["toolkit_ptxas"]
    print(f"{MOVA_CONFIG}: Triton's ptxas {row['registers']} registers, toolkit ptxas "
          f"{tk['ptxas']}: {tk['registers']}")
    assert tk["spill_stores"] == tk["spill_loads"] == tk["stack"] == 0, tk


def test_prune_keeps_the_big_tiles_and_drops_only_what_cannot_fit():
    from mova_rt.kernels._triton import SHARED_MEMORY_LIMIT

    space = attention.all_configs()
    assert len(space) == 24
    for d in attention.HEAD_DIMS:
        kept = attention.configs_for(d)
        keys = {(c.kwargs["BLOCK_M"], c.kwargs["BLOCK_N"], c.num_warps, c.num_stages)
                for c in kept}
        assert (128, 128, 8, 2) in keys and (64, 64, 4, 3) in keys
        for c in space:
            bm, bn = c.kwargs["BLOCK_M"], c.kwargs["BLOCK_N"]
            over = (attention.shared_bytes(bm, bn, d, c.num_stages) > SHARED_MEMORY_LIMIT[90]
                    or attention.registers_per_thread(bm, bn, d, c.num_warps) > 255)
            assert (c in kept) == (not over)


# ---------------------------------------------------------------------------------------------
# The whole tiny model on the `triton` kernel set
# ---------------------------------------------------------------------------------------------
def test_tiny_model_triton_against_reference():
    """One joint forward of the tiny model (random bf16 weights) on `triton` vs `reference`:
    relative error <= 1e-2, and no worse than twice the reference path's own bf16 error against
    the same weights in fp32."""
    import copy

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
    assert resolve("triton") is not None

    def forward(kernels, weights=shared, text=inp["pos"]):
        r = eager_runner(kernels)(weights, cfg, sched, 5.0, 24.0)
        with torch.no_grad():
            return [o.float() for o in r.step.forward(r.video_dit, x, inp["audio"], text, t, 24.0)]

    ref = forward("reference")
    tri = forward("triton")
    fp32 = forward("reference", {k: copy.deepcopy(m).float() for k, m in shared.items()},
                   inp["pos"].float())
    for r, k, f in zip(ref, tri, fp32):
        rel = ((k - r).norm() / r.norm()).item()
        assert rel <= 1e-2, rel
        assert (k - f).norm() <= 2 * (r - f).norm() + 1e-6
