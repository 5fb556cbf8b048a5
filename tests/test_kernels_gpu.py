"""The Triton kernels at MOVA's full sizes on a real GPU (skipped without CUDA).

Run on the GPU machine with the interpreter off (conftest only sets TRITON_INTERPRET when it is
unset):  TRITON_INTERPRET=0 python -m pytest -q tests/test_kernels_gpu.py
Attention: bf16 by the criterion of the interpreter tests (err(kernel, fp32 truth) <= 2 *
err(torch bf16 SDPA, truth) + 1e-3, max abs); e4m3 by its stated bound (relative error against
fp32 attention, tests/test_kernels_attention_fp8.py). The profiler must see the Triton kernel
run, so a silent fallback fails. The first call per shape autotunes (15-18 configs).
"""
import pytest
import torch

from mova_rt.rope import InterleavedRope, RotateHalfRope

pytestmark = pytest.mark.skipif(
    not torch.cuda.is_available() or __import__("os").environ.get("TRITON_INTERPRET") == "1",
    reason="needs a CUDA GPU and TRITON_INTERPRET=0")

BF16 = torch.bfloat16
# (name, Lq, Lk, heads): MOVA's attentions at 360p (43,120 video tokens, 403 audio, 512 text)
SHAPES = [("video self-attention", 43120, 43120, 40), ("bridge a2v", 43120, 403, 40),
          ("bridge v2a (split-KV)", 403, 43120, 12), ("text cross-attention", 43120, 512, 40)]


def _qkv(lq, lk, heads, seed, d=128):
    """q, k, v bf16 [1, L, H, D], k and v views of one fused projection, std 1 (normalised)."""
    g = torch.Generator(device="cuda").manual_seed(seed)
    kv = torch.randn(1, lk, 2 * heads * d, generator=g, device="cuda").to(BF16)
    q = torch.randn(1, lq, heads, d, generator=g, device="cuda").to(BF16)
    return q, kv[..., :heads * d].view(1, lk, heads, d), kv[..., heads * d:].view(1, lk, heads, d)


def _truth(q, k, v):
    out = torch.nn.functional.scaled_dot_product_attention(
        *(x.float().transpose(1, 2) for x in (q, k, v)))
    return out.transpose(1, 2)


def _check(out, q, k, v, name=""):
    """style.md 6 against the fp32 truth (max abs)."""
    truth = _truth(q, k, v)
    torch_bf16 = torch.nn.functional.scaled_dot_product_attention(
        *(x.transpose(1, 2) for x in (q, k, v))).transpose(1, 2)
    torch_err = (torch_bf16.float() - truth).abs().max().item()
    err = (out.float() - truth).abs().max().item()
    print(f"{name}: max err {err:.3g}, torch bf16 {torch_err:.3g}")
    assert out.shape == q.shape and err <= 2 * torch_err + 1e-3


def _ran(fn, kernel_name):
    """fn() under the profiler; asserts a CUDA kernel named like `kernel_name` ran."""
    from torch.profiler import ProfilerActivity, profile
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        out = fn()
        torch.cuda.synchronize()
    names = {e.key for e in prof.key_averages()}
    assert any(kernel_name in n for n in names), sorted(names)[:20]
    return out


@pytest.mark.parametrize("name, lq, lk, heads", SHAPES)
def test_bf16_attention_360p(name, lq, lk, heads):
    from mova_rt.kernels.attention import attention
    q, k, v = _qkv(lq, lk, heads, seed=lq + lk)
    out = _ran(lambda: attention(q, k, v), "_attention_kernel")
    _check(out, q, k, v, name)


@pytest.mark.parametrize("name, lq, lk, heads", SHAPES)
def test_fp8_attention_360p(name, lq, lk, heads):
    from mova_rt.kernels.attention_fp8 import attention_fp8
    q, k, v = _qkv(lq, lk, heads, seed=lq + lk + 1)
    out = _ran(lambda: attention_fp8(q, k, v), "_attention_fp8_kernel")
    truth = _truth(q, k, v)
    rel = ((out.float() - truth).norm() / truth.norm()).item()
    print(f"{name}: e4m3 relative error {rel:.2%}")
    assert rel <= 0.065


def _prepared(q, k, w, q_rope, k_rope):
    """The eager prologue (RMSNorm over heads, float32 RoPE) the fused entry point runs."""
    from mova_rt.ops import apply_rope_rotate_half, rms_norm_heads, rope_interleaved_f32
    q, k = rms_norm_heads(q, w, 1e-6), rms_norm_heads(k, w, 1e-6)
    if isinstance(q_rope, InterleavedRope):
        return rope_interleaved_f32(q, *q_rope.tables()), rope_interleaved_f32(k, *k_rope.tables())
    return apply_rope_rotate_half(q, *q_rope.tables()), apply_rope_rotate_half(k, *k_rope.tables())


def test_fused_attention_norm_rope_360p():
    """The kernel sets' entry point (RMSNorm + RoPE in PyTorch, then the kernel) at the video
    self-attention shape and the bridge's v2a, against the same prologue with fp32 attention."""
    from mova_rt.kernels.attention import fused_attention
    per_frame = torch.arange(49, device="cuda").float() * (50 / 6)
    video = InterleavedRope.video(128, (49, 22, 40), "cuda")
    vr = RotateHalfRope(per_frame, 22 * 40, 128, BF16)
    ar = RotateHalfRope(torch.arange(403, device="cuda").float(), 1, 128, BF16)
    for name, lq, lk, heads, q_rope, k_rope in (("self 3D RoPE", 43120, 43120, 40, video, video),
                                                ("v2a rotate-half", 403, 43120, 12, ar, vr)):
        q, k, v = _qkv(lq, lk, heads, seed=5)
        w = (1 + 0.2 * torch.randn(heads * 128, device="cuda")).to(BF16)
        out = fused_attention(q, k, v, w, w, 1e-6, q_rope, k_rope)
        qp, kp = _prepared(q, k, w, q_rope, k_rope)
        _check(out, qp, kp, v, name)


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
