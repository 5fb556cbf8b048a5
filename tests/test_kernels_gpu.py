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


# ---------------------------------------------------------------------------------------------
# cuDNN's fp8 SDPA (mova_rt/attention_cudnn.py): optional, skipped without nvidia-cudnn-frontend
# (scripts/device_extras.sh carries its wheel). Bound, on random std-1 q/k/v checked on a sample
# of query rows: relative RMS error against fp32 attention at most 1.25x that of the same recipe
# in PyTorch (attention_cudnn_fp8_ref, ~6% on the CPU shapes) + 1e-3, and within half of that
# error of the recipe itself.
# ---------------------------------------------------------------------------------------------
CUDNN_ROWS = 1024


def _cudnn_fp8():
    from mova_rt import attention_cudnn
    ok, why = attention_cudnn.available()
    if not ok:
        pytest.skip(why)
    return attention_cudnn


def _cudnn_inputs(lq, lk, heads, seed):
    """q [1, Lq, H, 128]; k, v strided views of one [1, Lk, 2, H, 128] tensor."""
    g = torch.Generator(device="cuda").manual_seed(seed)
    q = torch.randn(1, lq, heads, 128, generator=g, device="cuda").to(BF16)
    kv = torch.randn(1, lk, 2, heads, 128, generator=g, device="cuda").to(BF16)
    return q, kv[:, :, 0], kv[:, :, 1], g


def _attention_fp32_rows(q, k, v, rows, chunk=256):
    qf = q[:, rows].float().transpose(1, 2)                   # [1, H, R, D]
    kf, vf = (x.float().transpose(1, 2) for x in (k, v))
    out = torch.empty_like(qf)
    for i in range(0, qf.shape[2], chunk):
        s = qf[:, :, i:i + chunk] @ kf.transpose(-1, -2) / q.shape[-1] ** 0.5
        out[:, :, i:i + chunk] = torch.softmax(s, dim=-1) @ vf
    return out.transpose(1, 2)


def _rel_rms(a, b):
    return ((a.float() - b.float()).norm() / b.float().norm()).item()


def _check_cudnn_fp8(ac, q, k, v, g, out):
    assert out.shape == q.shape and out.dtype == BF16 and torch.isfinite(out).all()
    lq = q.shape[1]
    rows = (torch.randperm(lq, generator=g, device="cuda")[:CUDNN_ROWS] if lq > CUDNN_ROWS
            else torch.arange(lq, device="cuda"))
    truth = _attention_fp32_rows(q, k, v, rows)
    ref = ac.attention_cudnn_fp8_ref(q, k, v, rows=rows)
    sdpa = torch.nn.functional.scaled_dot_product_attention(
        *(x.transpose(1, 2) for x in (q, k, v))).transpose(1, 2)[:, rows]
    e_kernel, e_ref, e_diff = _rel_rms(out[:, rows], truth), _rel_rms(ref, truth), _rel_rms(
        out[:, rows], ref)
    msg = (f"relative RMS vs fp32: cudnn-fp8 {e_kernel:.4f}, recipe in PyTorch {e_ref:.4f}, "
           f"bf16 SDPA {_rel_rms(sdpa, truth):.4f}; cudnn-fp8 vs recipe {e_diff:.4f}")
    print(msg)
    assert e_kernel <= 1.25 * e_ref + 1e-3 and e_diff <= 0.5 * e_ref, msg


@pytest.mark.parametrize("lq, lk, heads", [(43120, 43120, 40), (43120, 403, 40), (403, 43120, 12)],
                         ids=["video_self", "bridge_a2v", "bridge_v2a"])
def test_cudnn_fp8_attention_at_mova_sizes(lq, lk, heads):
    ac = _cudnn_fp8()
    q, k, v, g = _cudnn_inputs(lq, lk, heads, seed=lq + heads)
    out = ac.attention_cudnn_fp8(q, k, v)
    _check_cudnn_fp8(ac, q, k, v, g, out)
    plans = len(ac._PLANS)
    again = ac.attention_cudnn_fp8(q, k, v)                     # the cached graph
    assert len(ac._PLANS) == plans and _rel_rms(again, out) < 1e-3


def test_cudnn_fp8_attention_awkward_shapes_on_a_side_stream():
    """Lengths that are no multiple of any tile, a non-default stream (the handle follows the
    current stream), and torch.compile over the custom op."""
    ac = _cudnn_fp8()
    q, k, v, g = _cudnn_inputs(97, 1025, 8, seed=11)
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        out = ac.attention_cudnn_fp8(q, k, v)
    torch.cuda.current_stream().wait_stream(side)
    _check_cudnn_fp8(ac, q, k, v, g, out)
    compiled = torch.compile(ac.attention_cudnn_fp8, fullgraph=True)
    assert _rel_rms(compiled(q, k, v), out) < 1e-3
