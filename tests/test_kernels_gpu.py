"""The Triton kernels at MOVA's full sizes on a real GPU (skipped without CUDA).

Run on the GPU machine with the interpreter off (conftest only sets TRITON_INTERPRET when it is
unset):  TRITON_INTERPRET=0 python -m pytest -q tests/test_kernels_gpu.py
Same criterion as the interpreter tests: err(kernel, fp32 truth) <= 2 * err(torch bf16, truth)
+ 1e-3, the truth being the eager steps with fp32 attention.
"""
import pytest
import torch

from mova_rt.rope import InterleavedRope, RotateHalfRope

pytestmark = pytest.mark.skipif(
    not torch.cuda.is_available() or __import__("os").environ.get("TRITON_INTERPRET") == "1",
    reason="needs a CUDA GPU and TRITON_INTERPRET=0")

BF16 = torch.bfloat16


def _inputs(lq, lk, heads, d, seed):
    g = torch.Generator(device="cuda").manual_seed(seed)

    def rn(*shape):
        return torch.randn(shape, generator=g, device="cuda")
    q = (rn(1, lq, heads * d) * 2).to(BF16).view(1, lq, heads, d)
    k = (rn(1, lk, heads * d) * 2).to(BF16).view(1, lk, heads, d)
    v = rn(1, lk, heads, d).to(BF16)
    w = (1 + 0.2 * rn(heads * d)).to(BF16)
    return q, k, v, w


def _check(out, q, k, v, w, q_rope, k_rope):
    from test_kernels_attention import _check as check
    check(out, q, k, v, w, w, 1e-6, q_rope, k_rope)


def test_video_self_attention_360p():
    from mova_rt.kernels.attention import fused_attention
    q, k, v, w = _inputs(43120, 43120, 40, 128, 0)
    rope = InterleavedRope.video(128, (49, 22, 40), "cuda")
    _check(fused_attention(q, k, v, w, w, 1e-6, rope, rope), q, k, v, w, rope, rope)


def test_bridge_both_ways_360p():
    from mova_rt.kernels.attention import fused_attention
    per_frame = torch.arange(49, device="cuda").float() * (50 / 6)
    vr = RotateHalfRope(per_frame, 22 * 40, 128, BF16)
    ar = RotateHalfRope(torch.arange(403, device="cuda").float(), 1, 128, BF16)
    q, k, v, w = _inputs(43120, 403, 40, 128, 1)                 # a2v
    _check(fused_attention(q, k, v, w, w, 1e-6, vr, ar), q, k, v, w, vr, ar)
    q, k, v, w = _inputs(403, 43120, 12, 128, 2)                 # v2a: split-KV
    _check(fused_attention(q, k, v, w, w, 1e-6, ar, vr), q, k, v, w, ar, vr)


def test_adaln_at_video_width():
    from mova_rt.kernels import adaln
    g = torch.Generator(device="cuda").manual_seed(3)
    x = torch.randn(1, 43120, 5120, generator=g, device="cuda").to(BF16)
    y = torch.randn(1, 43120, 5120, generator=g, device="cuda").to(BF16)
    shift, scale, gate = (torch.randn(1, 1, 5120, generator=g, device="cuda").to(BF16)
                          for _ in range(3))
    out = adaln.layernorm_modulate(x, shift, scale, 1e-6)
    ref = adaln.layernorm_modulate_ref(x, shift, scale, 1e-6)
    assert (out != ref).float().mean().item() < 1e-3
    assert torch.equal(adaln.gated_residual(x, gate, y), adaln.gated_residual_ref(x, gate, y))


@pytest.mark.parametrize("mode, disk", [("group", False), ("group", True), ("cpu", False)])
def test_offload_on_the_gpu_equals_all_resident(tiny_ckpt, mode, disk):
    """Copy stream, events, pinned memory and the disk reader for real: bit-identical latents."""
    from mova_rt.pipeline import MovaPipeline
    kw = dict(height=64, width=96, num_frames=17, progress=False, num_inference_steps=5, seed=4)
    ref = MovaPipeline.from_pretrained(tiny_ckpt, device="cuda", dtype="bf16")("a train", **kw)
    pipe = MovaPipeline.from_pretrained(tiny_ckpt, device="cuda", dtype="bf16", offload=mode,
                                        stream_from_disk=disk)
    out = pipe("a train", **kw)
    assert torch.equal(out.video_latents, ref.video_latents)
    assert torch.equal(out.audio_latents, ref.audio_latents)


# --- q/k norm + RoPE in one pass, and what `auto` runs, at full size -------------------------
def test_norm_rope_at_video_width_against_fp64():
    """kernels/norm_rope.py on a strided view of a fused q|k|v projection [1, 43120, 3 x 5120]:
    as close to the fp64 truth as the eager float32 path, and bit-identical to it but for rare
    one-ulp ties."""
    from mova_rt.kernels import backends  # noqa: F401
    from mova_rt.ops import _REGISTRY
    g = torch.Generator(device="cuda").manual_seed(5)
    qkv = (torch.randn(1, 43120, 3 * 5120, generator=g, device="cuda") * 2).to(BF16)
    x = qkv[..., 5120:10240].view(1, 43120, 40, 128)
    w = (1 + 0.2 * torch.randn(5120, generator=g, device="cuda")).to(BF16)
    for rope, half in ((InterleavedRope.video(128, (49, 22, 40), "cuda"), False),
                       (RotateHalfRope(torch.arange(49, device="cuda").float() * (50 / 6), 880,
                                       128, BF16), True)):
        got = _REGISTRY["norm_rope"]["triton"](x, w, 1e-6, rope, half)
        eager = _REGISTRY["norm_rope"]["float32"](x, w, 1e-6, rope, half)
        truth = _REGISTRY["norm_rope"]["float64"](x.double(), w.double(), 1e-6, rope, half)
        e_got = ((got.double() - truth).norm() / truth.norm()).item()
        e_eager = ((eager.double() - truth).norm() / truth.norm()).item()
        assert e_got <= 1.5 * e_eager + 1e-6, (e_got, e_eager)
        assert (got != eager).float().mean().item() < 1e-3


def _kernel_names(fn) -> list:
    from torch.profiler import ProfilerActivity, profile
    fn()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        fn()
        torch.cuda.synchronize()
    return [e.key for e in prof.key_averages() if e.device_type.name == "CUDA"]


def test_auto_runs_the_kernels_it_chose_no_silent_fallback():
    """The profiler's kernel names for what `auto` resolves to on this GPU: its attention at the
    video self-attention shape must run cuDNN's (or FlashAttention's) kernel, never the
    memory-efficient or math ones; a Triton choice must launch its Triton kernel."""
    from mova_rt.ops import resolve
    ops = resolve("auto", device="cuda")
    print("auto on this GPU:", ops.choices)
    q, k, v = (torch.randn(1, 43120, 40, 128, device="cuda", dtype=BF16) for _ in range(3))
    names = _kernel_names(lambda: ops.attention(q, k, v))
    print("attention kernels:", names)
    joined = " ".join(names).lower()
    if ops.choices["attention"] == "sdpa-priority":
        assert "cudnn" in joined or "flash" in joined, names
        assert "fmha_cutlass" not in joined and "efficient" not in joined, names
    x = torch.randn(1, 43120, 5120, device="cuda", dtype=BF16)
    shift, scale = (torch.randn(1, 1, 5120, device="cuda", dtype=BF16) for _ in range(2))
    names = _kernel_names(lambda: ops.norm_modulate(x, shift, scale, 1e-6))
    if ops.choices["norm_modulate"] == "triton":
        assert any("layernorm_modulate" in n for n in names), names
    w = torch.ones(5120, device="cuda", dtype=BF16)
    rope = InterleavedRope.video(128, (49, 22, 40), "cuda")
    names = _kernel_names(lambda: ops.norm_rope(x.view(1, 43120, 40, 128), w, 1e-6, rope))
    if ops.choices["norm_rope"] == "triton":
        assert any("norm_rope" in n for n in names), names
