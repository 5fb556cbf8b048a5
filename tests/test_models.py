"""Model math against explicit formulas written here: the DiT block, the head, the bridge order,
the timestep sinusoid, unmasked text attention, and the precision rules of the reference."""
import math
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F

from mova_rt.config import preset_config
from mova_rt.models.bridge import Bridge
from mova_rt.models.dual_tower import dual_tower_forward
from mova_rt.models.video_dit import DiTBlock, Head, modulate, timestep_sinusoid, time_embeddings
from mova_rt.ops import resolve

OPS = resolve("reference")


def randomize(module, dtype=torch.float32):
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(torch.randn_like(p) / math.sqrt(p.shape[-1] if p.dim() > 1 else 8) + (p.dim() == 1))
    return module.to(dtype)


def attn(q, k, v, heads):
    b, lq, d = q.shape
    q, k, v = (x.view(b, x.shape[1], heads, -1).transpose(1, 2) for x in (q, k, v))
    w = torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(q.shape[-1]), dim=-1)
    return (w @ v).transpose(1, 2).reshape(b, lq, d)


def rms(x, w, eps=1e-6):
    return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps) * w


def test_sinusoid_is_cos_then_sin():
    t = torch.tensor([0.0, 999.0, 512.5])
    s = timestep_sinusoid(8, t)
    f = [10000 ** (-i / 4) for i in range(4)]
    expect = torch.tensor([[math.cos(x * fi) for fi in f] + [math.sin(x * fi) for fi in f] for x in t.tolist()])
    assert torch.allclose(s, expect, atol=1e-6) and s.dtype == torch.float32


def test_dit_block_matches_explicit_formula():
    dim, heads, ffn, L = 64, 2, 96, 10
    block = randomize(DiTBlock(dim, heads, ffn, 1e-6, OPS))
    x, ctx = torch.randn(1, L, dim), torch.randn(1, 7, dim)
    t_mod = torch.randn(1, 6, dim)
    identity = (torch.ones(L, 16, dtype=torch.float64), torch.zeros(L, 16, dtype=torch.float64))
    rope = SimpleNamespace(tables=lambda: identity)     # a RoPE that rotates by zero
    out = block(x, block.cross_attn.kv(ctx), t_mod, rope)

    sa, ca = block.self_attn, block.cross_attn
    m = (block.modulation + t_mod)[0]
    shift1, scale1, gate1, shift2, scale2, gate2 = m
    ln = lambda z: F.layer_norm(z, (dim,), eps=1e-6)
    h = ln(x) * (1 + scale1) + shift1
    q = rms(F.linear(h, sa.q.weight, sa.q.bias), sa.norm_q.weight)
    k = rms(F.linear(h, sa.k.weight, sa.k.bias), sa.norm_k.weight)
    v = F.linear(h, sa.v.weight, sa.v.bias)
    y = x + gate1 * F.linear(attn(q, k, v, heads), sa.o.weight, sa.o.bias)
    h3 = F.layer_norm(y, (dim,), block.norm3.weight, block.norm3.bias, eps=1e-6)
    q = rms(F.linear(h3, ca.q.weight, ca.q.bias), ca.norm_q.weight)
    k = rms(F.linear(ctx, ca.k.weight, ca.k.bias), ca.norm_k.weight)
    v = F.linear(ctx, ca.v.weight, ca.v.bias)
    y = y + F.linear(attn(q, k, v, heads), ca.o.weight, ca.o.bias)
    h2 = ln(y) * (1 + scale2) + shift2
    f = F.linear(F.gelu(F.linear(h2, block.ffn[0].weight, block.ffn[0].bias), approximate="tanh"),
                 block.ffn[2].weight, block.ffn[2].bias)
    expect = y + gate2 * f
    assert torch.allclose(out, expect, atol=1e-5, rtol=1e-5)


def test_head_uses_t_and_batches():
    dim = 32
    head = randomize(Head(dim, 16, (1, 2, 2), 1e-6))
    x, t = torch.randn(2, 5, dim), torch.randn(2, dim)
    out = head(x, t)
    for b in range(2):
        shift = head.modulation[0, 0] + t[b]
        scale = head.modulation[0, 1] + t[b]
        expect = F.linear(F.layer_norm(x[b], (dim,), eps=1e-6) * (1 + scale) + shift,
                          head.head.weight, head.head.bias)
        assert torch.allclose(out[b], expect, atol=1e-5)


def test_modulate_rounds_once_in_bf16():
    x = torch.randn(4096).to(torch.bfloat16)
    shift, scale = torch.randn(4096).to(torch.bfloat16), torch.randn(4096).to(torch.bfloat16)
    once = (x.double() * (1 + scale.double()) + shift.double()).float().to(torch.bfloat16)
    assert torch.equal(modulate(x, shift, scale), once)
    eager = x * (1 + scale) + shift  # three bf16 roundings: what the reference avoids
    assert not torch.equal(eager, once)


def test_time_mlps_in_fp32_then_cast():
    from mova_rt.models.video_dit import VideoDiT
    cfg = preset_config("tiny").video_dit
    dit = randomize(VideoDiT(cfg, OPS), torch.bfloat16)
    t = torch.tensor([937.5])
    tt, tmod = time_embeddings(dit, t, torch.bfloat16)
    s = timestep_sinusoid(256, t)
    te = [m.float() for m in (dit.time_embedding[0], dit.time_embedding[2], dit.time_projection[1])]
    e = te[1](F.silu(te[0](s)))
    assert torch.equal(tt, e.to(torch.bfloat16))
    assert torch.equal(tmod, te[2](F.silu(e)).unflatten(1, (6, cfg.dim)).to(torch.bfloat16))


def test_bridge_reads_pre_bridge_states_of_both_towers():
    cfg = preset_config("tiny").bridge
    bridge = randomize(Bridge(cfg, OPS))
    v, a = torch.randn(1, 12, 64), torch.randn(1, 5, 64)
    vr, ar = bridge.rope((3, 2, 2), 5, 24.0, torch.float32, "cpu")
    nv, na = bridge(0, v, a, vr, ar)
    a2v, v2a = bridge.audio_to_video_conditioners["0"], bridge.video_to_audio_conditioners["0"]
    assert torch.allclose(nv, v + a2v(v, a, vr, ar))
    assert torch.allclose(na, a + v2a(a, v, ar, vr))  # original v, not nv
    assert not torch.allclose(na, a + v2a(a, nv, ar, vr))


def test_text_attention_covers_all_512_rows_without_mask():
    """Zero-padded text rows still take part in the softmax (spec 1.1): changing only the padded
    rows' embedding output must change the result, which a masked attention would not."""
    from mova_rt.models.video_dit import CrossAttention
    ca = randomize(CrossAttention(64, 2, 1e-6, OPS))
    x = torch.randn(1, 6, 64)
    ctx = torch.randn(1, 512, 64)
    base = ca(x, ca.kv(ctx))
    ctx2 = ctx.clone()
    ctx2[:, 20:] += 1.0
    assert not torch.allclose(base, ca(x, ca.kv(ctx2)), atol=1e-4)
    q = rms(F.linear(x, ca.q.weight, ca.q.bias), ca.norm_q.weight)
    k = rms(F.linear(ctx, ca.k.weight, ca.k.bias), ca.norm_k.weight)
    v = F.linear(ctx, ca.v.weight, ca.v.bias)
    assert torch.allclose(base, F.linear(attn(q, k, v, 2), ca.o.weight, ca.o.bias), atol=1e-5)


def test_joint_forward_bf16_close_to_fp32(tiny_pipe_fp32):
    """Per-forward bf16 error stays within the spec's budget (~1e-2 relative)."""
    import copy
    p = tiny_pipe_fp32
    vin, ain = torch.randn(1, 36, 5, 8, 12), torch.randn(1, 16, 36)
    text = torch.randn(1, 512, 32)
    text[:, 9:] = 0
    t = torch.tensor([873.2])
    v32, a32 = dual_tower_forward(p.video_dit, p.audio_dit, p.bridge, vin, ain, text, t, 24.0)
    mods = [copy.deepcopy(m).to(torch.bfloat16) for m in (p.video_dit, p.audio_dit, p.bridge)]
    v16, a16 = dual_tower_forward(*mods, vin, ain, text, t, 24.0)
    assert v16.dtype == torch.bfloat16
    for lo, hi in ((v16, v32), (a16, a32)):
        rel = (lo.float() - hi).norm() / hi.norm()
        assert 1e-5 < rel < 2e-2, rel.item()
