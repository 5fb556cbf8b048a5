"""Tests for mova_rt.media: reference image loading, mp4 writing/probing, latents files."""

import os
import struct

import av
import numpy as np
import pytest
import torch
from PIL import Image

from mova_rt import media
from mova_rt.errors import MovaInputError


def _random_image(rng, h, w):
    return Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8))


def _top_level_boxes(path):
    """Names of the top-level ISO-BMFF boxes of an mp4, in file order."""
    names = []
    with open(path, "rb") as f:
        while header := f.read(8):
            size, name = struct.unpack(">I4s", header)
            if size == 1:
                size = struct.unpack(">Q", f.read(8))[0] - 8
            names.append(name.decode())
            f.seek(size - 8, os.SEEK_CUR)
    return names


def _clip(rng, frames=13, h=64, w=96, seconds=1.3, sr=48000):
    blocks = rng.integers(0, 256, (frames, h // 8, w // 8, 3), dtype=np.uint8)
    video = blocks.repeat(8, axis=1).repeat(8, axis=2)  # 8x8 blocks survive 4:2:0 chroma
    audio = (rng.standard_normal(int(seconds * sr)) * 0.7).astype(np.float32)
    return video, audio


def test_crop_and_resize_wide_image():
    rng = np.random.default_rng(1)
    img = _random_image(rng, 50, 201)  # wider than 3:4 -> crop width to int(50/30*40) = 66
    out = media.crop_and_resize(img, 30, 40)
    arr = np.asarray(img)
    expected = Image.fromarray(arr[:, 67:133]).resize((40, 30))
    assert out.size == (40, 30)
    assert np.array_equal(np.asarray(out), np.asarray(expected))


def test_crop_and_resize_tall_image():
    rng = np.random.default_rng(2)
    img = _random_image(rng, 301, 45)  # taller than 3:4 -> crop height to int(45/40*30) = 33
    out = media.crop_and_resize(img, 30, 40)
    arr = np.asarray(img)
    expected = Image.fromarray(arr[134:167, :]).resize((40, 30))
    assert np.array_equal(np.asarray(out), np.asarray(expected))


def test_load_reference_image_matches_diffusers(tmp_path):
    from diffusers.video_processor import VideoProcessor

    rng = np.random.default_rng(3)
    src = _random_image(rng, 77, 150)
    path = tmp_path / "ref.png"
    src.save(path)
    x = media.load_reference_image(str(path), 48, 64)
    assert x.shape == (1, 3, 48, 64) and x.dtype == torch.float32
    ref = VideoProcessor(vae_scale_factor=8).preprocess(
        media.crop_and_resize(Image.open(path).convert("RGB"), 48, 64), height=48, width=64
    )
    assert torch.equal(x, ref)
    assert x.min() >= -1 and x.max() <= 1 and x.std() > 0.1


@pytest.mark.parametrize("kind", ["corrupt", "missing", "truncated"])
def test_load_reference_image_bad_file(tmp_path, kind):
    path = tmp_path / "bad.png"
    if kind == "corrupt":
        path.write_bytes(np.random.default_rng(4).bytes(4096))
    elif kind == "truncated":
        _random_image(np.random.default_rng(5), 64, 64).save(path)
        path.write_bytes(path.read_bytes()[:300])
    with pytest.raises(MovaInputError) as exc:
        media.load_reference_image(str(path), 32, 32)
    msg = str(exc.value)
    assert "\n" not in msg and str(path) in msg and "--ref_path" in msg


def test_white_image():
    img = media.white_image(24, 40)
    assert img.mode == "RGB" and img.size == (40, 24)
    assert (np.asarray(img) == 255).all()


def test_write_and_probe_mp4(tmp_path):
    rng = np.random.default_rng(6)
    video, audio = _clip(rng)
    out = tmp_path / "sub" / "clip.mp4"  # the missing folder is created
    media.write_mp4(str(out), video, audio, fps=24, sample_rate=48000)
    info = media.probe_mp4(str(out))
    assert info["frames"] == 13 and info["fps"] == pytest.approx(24)
    assert (info["width"], info["height"]) == (96, 64)
    assert info["video_codec"] == "h264" and info["pix_fmt"] == "yuv420p"
    assert info["video_duration"] == pytest.approx(13 / 24, abs=1e-3)
    assert info["audio_codec"] == "aac" and info["audio_sample_rate"] == 48000
    assert info["audio_channels"] == 1
    assert abs(info["audio_duration"] - 13 / 24) <= 1 / 24
    assert os.listdir(out.parent) == ["clip.mp4"]  # no temp or probe file left
    boxes = _top_level_boxes(out)
    assert boxes.index("moov") < boxes.index("mdat")  # faststart
    with av.open(str(out)) as c:  # high quality (crf 5): decoded frames stay close to the input
        first = next(c.decode(video=0)).to_ndarray(format="rgb24")
    assert np.abs(first.astype(int) - video[0]).mean() < 8


def test_write_mp4_fractional_fps_and_no_audio(tmp_path):
    rng = np.random.default_rng(7)
    video, _ = _clip(rng, frames=5, h=32, w=48)
    out = tmp_path / "ntsc.mp4"
    media.write_mp4(str(out), video, None, fps=23.976, sample_rate=48000)
    info = media.probe_mp4(str(out))
    assert info["frames"] == 5 and info["fps"] == pytest.approx(23.976, abs=1e-3)
    assert info["audio_codec"] is None


def test_write_mp4_odd_size_leaves_nothing(tmp_path):
    video, audio = _clip(np.random.default_rng(8), frames=3, h=32, w=48)
    video = video[:, :, :45]
    out = tmp_path / "odd.mp4"
    with pytest.raises(MovaInputError, match="even"):
        media.write_mp4(str(out), video, audio, fps=24, sample_rate=48000)
    assert os.listdir(tmp_path) == []


def test_write_mp4_failure_midway_removes_temp_and_keeps_old_file(tmp_path, monkeypatch):
    out = tmp_path / "clip.mp4"
    out.write_bytes(b"previous")

    seen = []

    class Boom:  # fails after the video is muxed, when the temp file exists
        @staticmethod
        def from_ndarray(*args, **kwargs):
            seen.extend(os.listdir(tmp_path))
            raise RuntimeError("encoder exploded")

    monkeypatch.setattr(media.av, "AudioFrame", Boom)
    video, audio = _clip(np.random.default_rng(9), frames=3, h=32, w=48)
    with pytest.raises(RuntimeError, match="exploded"):
        media.write_mp4(str(out), video, audio, fps=24, sample_rate=48000)
    assert any(name.startswith(".clip.mp4.tmp-") for name in seen)
    assert os.listdir(tmp_path) == ["clip.mp4"] and out.read_bytes() == b"previous"


def test_probe_mp4_garbage(tmp_path):
    path = tmp_path / "junk.mp4"
    path.write_bytes(np.random.default_rng(12).bytes(5000))
    with pytest.raises(MovaInputError, match="cannot read video"):
        media.probe_mp4(str(path))


def test_unwritable_output_paths(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    (tmp_path / "dir.mp4").mkdir()
    for bad, hint in [
        (blocker / "out.mp4", "cannot create folder"),
        (tmp_path / "out.avi", ".mp4"),
        (tmp_path, "directory"),
        (tmp_path / "dir.mp4", "directory"),
    ]:
        with pytest.raises(MovaInputError, match=hint) as exc:
            media.check_output_path(str(bad))
        assert "\n" not in str(exc.value) and "--output_path" in str(exc.value)
    video, audio = _clip(np.random.default_rng(10), frames=2, h=16, w=16)
    with pytest.raises(MovaInputError):
        media.write_mp4(str(blocker / "out.mp4"), video, audio, fps=24, sample_rate=48000)
    media.check_output_path(str(tmp_path / "new" / "ok.mp4"))
    assert sorted(os.listdir(tmp_path)) == ["dir.mp4", "file", "new"]
    assert not os.listdir(tmp_path / "new")  # created, and the write probe removed


def test_save_latents_round_trip(tmp_path):
    from safetensors import safe_open

    g = torch.Generator().manual_seed(11)
    video = torch.randn(1, 4, 3, 6, 8, generator=g, dtype=torch.bfloat16).transpose(3, 4)
    audio = torch.randn(1, 8, 20, generator=g)
    path = tmp_path / "latents.safetensors"
    media.save_latents(str(path), video, audio, {"seed": "42", "prompt": "a cat"})
    with safe_open(str(path), framework="pt") as f:
        assert f.metadata() == {"seed": "42", "prompt": "a cat"}
        got_v, got_a = f.get_tensor("video_latents"), f.get_tensor("audio_latents")
    assert got_v.dtype == torch.float32 and torch.equal(got_v, video.float())
    assert torch.equal(got_a, audio)
    assert os.listdir(tmp_path) == ["latents.safetensors"]
