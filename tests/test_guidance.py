"""Guidance (text CFG, Dual CFG, batched passes) and the exact caches of the sampler."""
import warnings

import pytest
import torch

import mova_rt.pipeline as pl
from mova_rt.models.dual_tower import dual_tower_forward
from mova_rt.sampler import Guidance, GuidedStep
from mova_rt.scheduler import FlowMatchScheduler

H, W, F_ = 64, 96, 17


@pytest.fixture
def image():
    return torch.rand(1, 3, H, W) * 2 - 1


def _v(seed):
    return torch.randn(1, 16, 5, 8, 12, generator=torch.Generator().manual_seed(seed))


def test_bridge_scale_one_is_the_released_text_cfg_exactly():
    pos, neg = _v(0), _v(1)
    g = Guidance(5.0, 1.0)
    assert g.passes() == [("pos", True), ("neg", True)]
    assert torch.equal(g.combine([pos, neg]), neg + 5.0 * (pos - neg))
    assert Guidance(1.0, 1.0).passes() == [("pos", True)]


def test_dual_cfg_formula_and_its_two_pass_special_case():
    off, neg_on, pos_on = _v(2), _v(3), _v(4)
    g = Guidance(5.0, 3.5)
    assert g.passes() == [("neg", False), ("neg", True), ("pos", True)]
    want = off + 3.5 * (neg_on - off) + 5.0 * (pos_on - neg_on)
    assert torch.allclose(g.combine([off, neg_on, pos_on]), want, atol=1e-5)
    # s_B = s_T: the (neg, on) pass cancels, leaving two passes.
    g2 = Guidance(4.0, 4.0)
    assert g2.passes() == [("neg", False), ("pos", True)]
    three = off + 4.0 * (neg_on - off) + 4.0 * (pos_on - neg_on)
    assert torch.allclose(g2.combine([off, pos_on]), three, atol=1e-5)


class Spy:
    """Velocity = a constant chosen by (text, bridge on/off) for every batch row."""

    def __init__(self, pipe, table, oom_on_batch=False):
        self.pipe, self.table, self.calls, self.oom = pipe, table, [], oom_on_batch

    def __call__(self, dit, video_in, audio_in, text, t, fps, prepared=None, bridge_from=0):
        rows = text.shape[0]
        self.calls.append((rows, bridge_from))
        if self.oom and rows > 1:
            raise torch.OutOfMemoryError("CUDA out of memory (test)")
        pos = self.pipe._pos_marker
        vals = []
        for r in range(rows):
            name = "pos" if torch.equal(text[r:r + 1], pos) else "neg"
            vals.append(self.table[(name, r >= bridge_from)])
        fill = torch.tensor(vals).view(rows, 1, 1, 1, 1)
        return (fill.expand(rows, *video_in.shape[1:2], *video_in.shape[2:]).clone()[:, :16],
                fill.view(rows, 1, 1).expand(rows, *audio_in.shape[1:]).clone())


TABLE = {("neg", False): 0.25, ("neg", True): 0.5, ("pos", True): 2.0}


def _run(pipe, monkeypatch, image, spy, **kw):
    real_encode = pipe.text_encoder.encode

    def encode(prompts, dev, dtype):
        out = real_encode(prompts, dev, dtype)
        if prompts == ["a prompt"]:
            pipe._pos_marker = out
        return out
    monkeypatch.setattr(pipe.text_encoder, "encode", encode)
    monkeypatch.setattr(pipe, "_forward", spy)
    return pipe("a prompt", image, num_frames=F_, progress=False, num_inference_steps=4,
                seed=1, **kw)


@pytest.mark.parametrize("batch", [False, True])
def test_dual_cfg_in_the_pipeline_against_explicit_passes(tiny_pipe_fp32, monkeypatch, image,
                                                          batch):
    """Three passes per step (as one batch of 3 with the bridge-off row first, or one by one);
    the latents move by the Dual CFG velocity of the three constants."""
    spy = Spy(tiny_pipe_fp32, TABLE)
    out = _run(tiny_pipe_fp32, monkeypatch, image, spy, cfg_scale=5.0, bridge_cfg_scale=3.5,
               cfg_batch=batch)
    assert out.forwards == 12
    assert spy.calls == ([(3, 1)] * 4 if batch else [(1, 1), (1, 0), (1, 0)] * 4)
    v = 0.25 + 3.5 * (0.5 - 0.25) + 5.0 * (2.0 - 0.5)
    spy0 = Spy(tiny_pipe_fp32, {k: 0.0 for k in TABLE})
    noise = _run(tiny_pipe_fp32, monkeypatch, image, spy0, cfg_scale=5.0, bridge_cfg_scale=3.5)
    sched = FlowMatchScheduler(tiny_pipe_fp32.cfg.scheduler, 4)
    ts = sched.timesteps.tolist() + [None]
    expect = noise.video_latents
    for i in range(4):
        expect = sched.step(torch.full_like(expect, v), ts[i], ts[i + 1], expect)
    assert torch.allclose(out.video_latents, expect, atol=1e-5)


def test_batched_falls_back_to_sequential_on_out_of_memory(tiny_pipe_fp32, monkeypatch, image):
    spy = Spy(tiny_pipe_fp32, TABLE, oom_on_batch=True)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        out = _run(tiny_pipe_fp32, monkeypatch, image, spy, cfg_scale=5.0)
    assert any("ran out of GPU memory" in str(w.message) for w in caught)
    assert spy.calls[0] == (2, 0) and spy.calls[1:] == [(1, 0)] * 8 and out.forwards == 8
    spy = Spy(tiny_pipe_fp32, TABLE, oom_on_batch=True)
    with pytest.raises(torch.OutOfMemoryError):         # asked for explicitly: no fallback
        _run(tiny_pipe_fp32, monkeypatch, image, spy, cfg_scale=5.0, cfg_batch=True)


def test_batched_equals_sequential_within_bf16_rounding(tiny_ckpt, image):
    pipe = pl.MovaPipeline.from_pretrained(tiny_ckpt, device="cpu", dtype="bf16")
    kw = dict(num_frames=F_, seed=5, num_inference_steps=4, progress=False)
    seq = pipe("rain", image, cfg_batch=False, **kw)
    bat = pipe("rain", image, cfg_batch=True, **kw)
    for a, b in ((seq.video_latents, bat.video_latents), (seq.audio_latents, bat.audio_latents)):
        assert ((a - b).norm() / a.norm()).item() <= 1e-2


def test_bridge_off_rows_skip_the_bridge(tiny_pipe_fp32):
    """A batch [x, x] with bridge_from=1: row 0 equals the towers without any bridge layer, row
    1 equals the full network."""
    p = tiny_pipe_fp32
    g = torch.Generator().manual_seed(0)
    x = torch.randn(1, 36, 5, 8, 12, generator=g)
    a = torch.randn(1, 16, 36, generator=g)
    text = torch.randn(1, 512, 32, generator=g)
    t = torch.tensor([700.0])
    args = (p.video_dit, p.audio_dit, p.bridge)
    both = dual_tower_forward(*args, x.repeat(2, 1, 1, 1, 1), a.repeat(2, 1, 1), text.repeat(2, 1, 1),
                              t, 24.0, bridge_from=1)
    on = dual_tower_forward(*args, x, a, text, t, 24.0)
    layers = p.bridge.layers
    try:
        p.bridge.layers = []
        off = dual_tower_forward(*args, x, a, text, t, 24.0)
    finally:
        p.bridge.layers = layers
    for k in range(2):
        assert torch.allclose(both[k][0:1], off[k], atol=1e-5)
        assert torch.allclose(both[k][1:2], on[k], atol=1e-5)
        assert not torch.allclose(off[k], on[k], atol=1e-3)


def test_exact_caches_change_nothing(tiny_ckpt, image):
    """The step with its caches (time embeddings, text K/V, RoPE) equals the step without them,
    bit for bit, over an expert switch."""
    pipe = pl.MovaPipeline.from_pretrained(tiny_ckpt, device="cpu", dtype="bf16")
    sched = FlowMatchScheduler(pipe.cfg.scheduler, 50)
    g = torch.Generator().manual_seed(0)
    lat, aud = torch.randn(1, 16, 5, 8, 12, generator=g), torch.randn(1, 16, 36, generator=g)
    cond = torch.randn(1, 20, 5, 8, 12, generator=g)
    pos, neg = (torch.randn(1, 512, 32, generator=g).bfloat16() for _ in range(2))
    cached = GuidedStep(pipe._forward, sched, Guidance(5.0), 24.0, pipe.audio_dit, pipe.bridge)
    plain = GuidedStep(pipe._forward, sched, Guidance(5.0), 24.0)     # no towers: no caches
    a, b = (lat, aud), (lat, aud)
    for i in (16, 17, 18, 19):
        dit = pipe.video_dit if i < 18 else pipe.video_dit_2
        a = cached(dit, i, *a, cond, pos, neg)
        b = plain(dit, i, *b, cond, pos, neg)
        assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])


def test_conditioning_latent_is_encoded_once_per_image(tiny_pipe_fp32, monkeypatch, image):
    calls = []
    real = pl.encode_condition
    monkeypatch.setattr(pl, "encode_condition", lambda *a: calls.append(1) or real(*a))
    kw = dict(num_frames=F_, num_inference_steps=1, progress=False, cfg_scale=1.0)
    # An image no other test uses (the pipeline fixture lives for the whole session).
    image = torch.rand(1, 3, H, W, generator=torch.Generator().manual_seed(99)) * 2 - 1
    first = tiny_pipe_fp32("x", image, **kw)
    second = tiny_pipe_fp32("x", image.clone(), **kw)
    tiny_pipe_fp32("z", image + 0.01, **kw)
    assert len(calls) == 2
    assert torch.equal(first.video_latents, second.video_latents)   # same seed, same condition
