"""The sampling loop's semantics, observed through a spy on the joint forward."""
import pytest
import torch

import mova_rt.pipeline as pl
from mova_rt.errors import MovaInputError
from mova_rt.media import image_to_tensor, white_image

H, W, F_ = 64, 96, 17


@pytest.fixture
def image():
    return torch.rand(1, 3, H, W) * 2 - 1


class Spy:
    """Replaces the joint forward: records calls and returns a chosen velocity."""

    def __init__(self, pipe, velocity=0.0):
        self.pipe, self.calls, self.velocity = pipe, [], velocity

    def __call__(self, dit, video_in, audio_in, text, t, fps, prepared=None, bridge_from=0):
        self.calls.append(dict(dit=dit, video_in=video_in.clone(), text=text, t=t.item(),
                               bridge_from=bridge_from))
        fill = self.velocity(text) if callable(self.velocity) else self.velocity
        return (torch.full_like(video_in[:, :16], fill), torch.full_like(audio_in, fill))


def run(pipe, monkeypatch, image, velocity=0.0, **kw):
    spy = Spy(pipe, velocity)
    monkeypatch.setattr(pipe, "_forward", spy)
    kw.setdefault("num_inference_steps", 6)
    kw.setdefault("cfg_batch", False)     # one pass per call, as the reference runs them
    out = pipe("a prompt", image, num_frames=F_, progress=False, **kw)
    return out, spy


def test_noise_is_video_then_audio_from_one_seeded_generator(tiny_pipe_fp32, monkeypatch, image):
    out, _ = run(tiny_pipe_fp32, monkeypatch, image, seed=7)   # zero velocity: latents = noise
    g = torch.Generator().manual_seed(7)
    video = torch.randn((1, 16, 5, 8, 12), generator=g, dtype=torch.float32)
    audio = torch.randn((1, 16, 36), generator=g, dtype=torch.float32)
    assert torch.equal(out.video_latents, video) and torch.equal(out.audio_latents, audio)


def test_same_seed_identical_real_run(tiny_ckpt, image):
    pipe = pl.MovaPipeline.from_pretrained(tiny_ckpt, device="cpu", dtype="bf16")
    a = pipe("rain on a roof", image, num_frames=F_, seed=3, num_inference_steps=3, progress=False)
    b = pipe("rain on a roof", image, num_frames=F_, seed=3, num_inference_steps=3, progress=False)
    c = pipe("rain on a roof", image, num_frames=F_, seed=4, num_inference_steps=3, progress=False)
    assert torch.equal(a.video_latents, b.video_latents) and torch.equal(a.audio_latents, b.audio_latents)
    assert not torch.equal(a.video_latents, c.video_latents)
    assert a.frames.shape == (F_, H, W, 3) and a.frames.dtype.name == "uint8"
    assert a.waveform.shape == (36 * 960,) and a.sample_rate == 48000


def test_expert_switch_and_remove_video_dit(tiny_ckpt, monkeypatch, image):
    pipe = pl.MovaPipeline.from_pretrained(tiny_ckpt, device="cpu", dtype="fp32")
    first, second = pipe.video_dit, pipe.video_dit_2
    _, spy = run(pipe, monkeypatch, image, num_inference_steps=50, cfg_scale=1.0,
                 remove_video_dit=True)
    used = [c["dit"] for c in spy.calls]
    assert used[:18] == [first] * 18 and used[18:] == [second] * 32
    assert all(c["t"] >= 900 for c in spy.calls[:18]) and spy.calls[18]["t"] < 900
    assert pipe.video_dit is None


def test_cfg_scale_one_runs_one_pass_per_step(tiny_pipe_fp32, monkeypatch, image):
    out, spy = run(tiny_pipe_fp32, monkeypatch, image, cfg_scale=1.0)
    assert len(spy.calls) == 6 and out.forwards == 6
    out, spy = run(tiny_pipe_fp32, monkeypatch, image, cfg_scale=5.0)
    assert len(spy.calls) == 12 and out.forwards == 12


def test_cfg_combination(tiny_pipe_fp32, monkeypatch, image):
    """v = v_neg + s (v_pos - v_neg): with constant velocities 2 (prompt) and 0.5 (negative) and
    s = 3, each step moves by 0.5 + 3 * 1.5 = 5 times d sigma; over the schedule x -> x - 5."""
    pos = tiny_pipe_fp32.text_encoder.encode(["a prompt"], "cpu", torch.float32)
    velocity = lambda text: 2.0 if torch.equal(text, pos) else 0.5
    out, spy = run(tiny_pipe_fp32, monkeypatch, image, velocity=velocity, cfg_scale=3.0, seed=1)
    g = torch.Generator().manual_seed(1)
    noise = torch.randn((1, 16, 5, 8, 12), generator=g)
    assert torch.allclose(out.video_latents, noise - 5.0, atol=1e-5)


def test_model_input_channels_mask_and_condition(tiny_pipe_fp32, monkeypatch, image):
    _, spy = run(tiny_pipe_fp32, monkeypatch, image, num_inference_steps=2, cfg_scale=1.0, seed=5)
    x = spy.calls[0]["video_in"]
    assert x.shape == (1, 36, 5, 8, 12)
    g = torch.Generator().manual_seed(5)
    assert torch.equal(x[:, :16], torch.randn((1, 16, 5, 8, 12), generator=g))  # noisy latents
    mask = x[:, 16:20]
    assert torch.all(mask[:, :, 0] == 1) and torch.all(mask[:, :, 1:] == 0)
    from mova_rt.models.video_vae import encode_condition
    cond = encode_condition(tiny_pipe_fp32.video_vae, tiny_pipe_fp32.cfg.video_vae, image, F_)
    assert torch.equal(x[:, 20:], cond)
    # condition latents are normalised with the config's mean/std
    raw = tiny_pipe_fp32.video_vae.encode(torch.cat(
        [image[:, :, None], torch.zeros(1, 3, F_ - 1, H, W)], 2)).latent_dist.mode()
    vcfg = tiny_pipe_fp32.cfg.video_vae
    mean = torch.tensor(vcfg.latents_mean).view(1, -1, 1, 1, 1)
    std = torch.tensor(vcfg.latents_std).view(1, -1, 1, 1, 1)
    assert torch.allclose(cond, (raw - mean) / std, atol=1e-5)


def test_nan_latents_abort_before_decoding(tiny_pipe_fp32, monkeypatch, image):
    decoded = []
    monkeypatch.setattr(pl, "decode_frames", lambda *a: decoded.append(1))
    with pytest.raises(MovaInputError, match="NaN/Inf"):
        run(tiny_pipe_fp32, monkeypatch, image, velocity=float("nan"))
    assert decoded == []


@pytest.mark.parametrize("h,w,f,match", [(65, 96, 17, "multiples of 16"), (64, 90, 17, "multiples of 16"),
                                         (64, 96, 18, "multiple of 4")])
def test_bad_sizes(tiny_pipe_fp32, h, w, f, match):
    with pytest.raises(MovaInputError, match=match):
        tiny_pipe_fp32("x", torch.zeros(1, 3, h, w), num_frames=f, progress=False)


def test_white_first_frame():
    x = image_to_tensor(white_image(16, 32))
    assert x.shape == (1, 3, 16, 32) and torch.all(x == 1.0)


def test_audio_latent_length_matches_spec():
    assert pl.audio_latent_length(48000, 960, 193, 24.0) == 403
    assert pl.audio_latent_length(48000, 960, 121, 24.0) == 253


def test_api_takes_the_cli_arguments(tiny_pipe_fp32, monkeypatch, tmp_path):
    """A file path, a PIL image, or nothing (white frame), with height/width as on the CLI."""
    from PIL import Image
    img = Image.fromarray((torch.rand(90, 150, 3) * 255).byte().numpy())
    img.save(tmp_path / "r.png")
    firsts = []
    for image, ref in ((None, str(tmp_path / "r.png")), (img, None), (None, None)):
        spy = Spy(tiny_pipe_fp32)
        monkeypatch.setattr(tiny_pipe_fp32, "_forward", spy)
        out = tiny_pipe_fp32("a prompt", image, ref_path=ref, height=H, width=W, num_frames=F_,
                             cfg_scale=1.0, num_inference_steps=1, progress=False)
        assert out.frames.shape == (F_, H, W, 3)
        firsts.append(spy.calls[0]["video_in"][:, 20:])
    assert torch.equal(firsts[0], firsts[1])       # path and PIL image give the same condition
    assert not torch.equal(firsts[0], firsts[2])   # the white frame differs
    with pytest.raises(MovaInputError, match="height and width"):
        tiny_pipe_fp32("x", None, num_frames=F_, progress=False)
