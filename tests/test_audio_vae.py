"""Tests of the continuous DAC audio VAE (mova_rt.models.audio_vae)."""

import math
import warnings

import pytest
import torch
from torch import nn

from mova_rt.config import preset_config
from mova_rt.models.audio_vae import DacVAE, ResidualUnit, Snake1d, fold_weight_norm, snake


def real_cfg():
    return preset_config("mova-360p").audio_vae


def tiny_cfg():
    return preset_config("tiny").audio_vae


def residual_unit_keys(prefix, dim):
    """The keys of one reference ResidualUnit: Snake, conv k7, Snake, conv k1."""
    return {
        f"{prefix}.block.0.alpha": (1, dim, 1),
        f"{prefix}.block.1.weight": (dim, dim, 7),
        f"{prefix}.block.1.bias": (dim,),
        f"{prefix}.block.2.alpha": (1, dim, 1),
        f"{prefix}.block.3.weight": (dim, dim, 1),
        f"{prefix}.block.3.bias": (dim,),
    }


def expected_shapes(cfg):
    """Key -> shape of the official checkpoint, written out from the reference module tree."""
    keys = {"encoder.block.0.weight": (cfg.encoder_dim, 1, 7),
            "encoder.block.0.bias": (cfg.encoder_dim,)}
    dim = cfg.encoder_dim
    for i, stride in enumerate(cfg.encoder_rates, start=1):
        half, dim = dim, dim * 2
        for j in range(3):
            keys.update(residual_unit_keys(f"encoder.block.{i}.block.{j}", half))
        keys[f"encoder.block.{i}.block.3.alpha"] = (1, half, 1)
        keys[f"encoder.block.{i}.block.4.weight"] = (dim, half, 2 * stride)
        keys[f"encoder.block.{i}.block.4.bias"] = (dim,)
    n = len(cfg.encoder_rates)
    keys[f"encoder.block.{n + 1}.alpha"] = (1, dim, 1)
    keys[f"encoder.block.{n + 2}.weight"] = (cfg.latent_dim, dim, 3)
    keys[f"encoder.block.{n + 2}.bias"] = (cfg.latent_dim,)
    lat = cfg.latent_dim
    keys.update({"quant_conv.weight": (2 * lat, lat, 1), "quant_conv.bias": (2 * lat,),
                 "post_quant_conv.weight": (lat, lat, 1), "post_quant_conv.bias": (lat,)})
    dim = cfg.decoder_dim
    keys["decoder.model.0.weight"] = (dim, lat, 7)
    keys["decoder.model.0.bias"] = (dim,)
    for i, stride in enumerate(cfg.decoder_rates, start=1):
        out = dim // 2
        keys[f"decoder.model.{i}.block.0.alpha"] = (1, dim, 1)
        keys[f"decoder.model.{i}.block.1.weight"] = (dim, out, 2 * stride)
        keys[f"decoder.model.{i}.block.1.bias"] = (out,)
        for j in range(3):
            keys.update(residual_unit_keys(f"decoder.model.{i}.block.{j + 2}", out))
        dim = out
    n = len(cfg.decoder_rates)
    keys[f"decoder.model.{n + 1}.alpha"] = (1, dim, 1)
    keys[f"decoder.model.{n + 2}.weight"] = (1, dim, 7)
    keys[f"decoder.model.{n + 2}.bias"] = (1,)
    return keys


def test_real_config_keys_and_shapes():
    cfg = real_cfg()
    with torch.device("meta"):
        vae = DacVAE(cfg)
    sd = vae.state_dict()
    got = {k: tuple(v.shape) for k, v in sd.items()}
    assert got == expected_shapes(cfg)
    assert len(got) == 224
    keys = list(got)
    assert keys[0] == "encoder.block.0.weight"
    assert keys[-1] == "decoder.model.7.bias"
    assert got["decoder.model.1.block.1.weight"] == (2048, 1024, 16)
    assert got["encoder.block.5.block.4.weight"] == (4096, 2048, 16)
    assert got["encoder.block.7.weight"] == (128, 4096, 3)
    assert got["decoder.model.5.block.4.block.1.weight"] == (64, 64, 7)
    n_enc = sum(v.numel() for k, v in sd.items() if k.startswith("encoder."))
    n_dec = sum(v.numel() for k, v in sd.items() if k.startswith("decoder."))
    n_all = sum(v.numel() for v in sd.values())
    assert n_enc == pytest.approx(296e6, rel=0.01)
    assert n_dec == pytest.approx(75.5e6, rel=0.01)
    assert n_all == pytest.approx(372e6, rel=0.01)
    assert vae.hop_length == 960 and vae.sample_rate == 48000 and vae.latent_dim == 128


def test_tiny_config_keys_and_attributes():
    cfg = tiny_cfg()
    vae = DacVAE(cfg)
    assert {k: tuple(v.shape) for k, v in vae.state_dict().items()} == expected_shapes(cfg)
    assert vae.hop_length == math.prod(cfg.encoder_rates) == 960
    assert vae.latent_dim == 16


def randomised_tiny_vae():
    torch.manual_seed(0)
    vae = DacVAE(tiny_cfg()).eval()
    with torch.no_grad():
        for name, p in vae.named_parameters():
            if name.endswith("alpha"):
                p.uniform_(0.5, 1.5)
            elif name.endswith("bias"):
                p.normal_(0.0, 0.05)
    return vae


@pytest.mark.parametrize("length", [960 * 3, 2500, 1])
def test_encode_decode_shapes_and_range(length):
    vae = randomised_tiny_vae()
    assert all(p.abs().sum() > 0 for p in vae.parameters())
    audio = torch.rand(2, 1, length) * 1.6 - 0.8
    with torch.no_grad():
        z = vae.encode(audio)
        n_latent = math.ceil(length / 960)
        assert z.shape == (2, 16, n_latent)
        out = vae.decode(z)
    assert out.shape == (2, 1, n_latent * 960)
    assert torch.isfinite(z).all() and torch.isfinite(out).all()
    assert out.abs().max() <= 1.0
    assert out.std() > 0


def test_encode_returns_posterior_mean_and_pads_with_zeros():
    vae = randomised_tiny_vae()
    audio = torch.randn(1, 1, 1500)
    with torch.no_grad():
        z = vae.encode(audio)
        padded = torch.cat([audio, torch.zeros(1, 1, 1920 - 1500)], dim=-1)
        moments = vae.quant_conv(vae.encoder(padded))
    torch.testing.assert_close(z, moments[:, :16])


def test_decode_lengths_for_several_latent_sizes():
    vae = randomised_tiny_vae()
    with torch.no_grad():
        for n in (1, 2, 3, 5):
            assert vae.decode(torch.randn(1, 16, n)).shape == (1, 1, n * 960)


def test_snake_matches_formula():
    torch.manual_seed(1)
    x = torch.randn(2, 3, 4, 5)
    alpha = torch.rand(1, 3, 1) + 0.2
    expected = torch.empty_like(x)
    for c in range(3):
        a = alpha[0, c, 0]
        expected[:, c] = x[:, c] + torch.sin(a * x[:, c]) ** 2 / a
    torch.testing.assert_close(snake(x, alpha), expected)
    act = Snake1d(3)
    with torch.no_grad():
        act.alpha.copy_(alpha)
    torch.testing.assert_close(act(x), expected)


def test_residual_unit_matches_formula():
    torch.manual_seed(2)
    dim, dilation = 4, 3
    unit = ResidualUnit(dim, dilation=dilation)
    with torch.no_grad():
        unit.block[0].alpha.uniform_(0.5, 1.5)
        unit.block[2].alpha.uniform_(0.5, 1.5)
    x = torch.randn(2, dim, 40)
    a1, conv1 = unit.block[0].alpha, unit.block[1]
    a2, conv2 = unit.block[2].alpha, unit.block[3]
    with torch.no_grad():
        h = x + torch.sin(a1 * x) ** 2 / a1
        h = torch.nn.functional.pad(h, (3 * dilation, 3 * dilation))
        y = torch.zeros(2, dim, 40)
        for k in range(7):
            tap = h[:, :, k * dilation:k * dilation + 40]
            y += torch.einsum("oi,bit->bot", conv1.weight[:, :, k], tap)
        y += conv1.bias[None, :, None]
        y = y + torch.sin(a2 * y) ** 2 / a2
        y = torch.einsum("oi,bit->bot", conv2.weight[:, :, 0], y) + conv2.bias[None, :, None]
        torch.testing.assert_close(unit(x), x + y, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("make", [
    lambda: nn.Conv1d(4, 6, kernel_size=5),
    lambda: nn.ConvTranspose1d(4, 6, kernel_size=6, stride=3),
])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_fold_weight_norm_matches_torch(make, dtype):
    torch.manual_seed(3)
    plain = make()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        normed = nn.utils.weight_norm(make(), dim=0)
    with torch.no_grad():
        normed.weight_g.uniform_(0.5, 2.0)
        normed.weight_v.normal_()
    sd = {"layer." + k: v.detach().to(dtype) for k, v in normed.state_dict().items()}
    sd["other.alpha"] = torch.ones(1, 3, 1)
    folded = fold_weight_norm(sd)
    assert set(folded) == {"layer.weight", "layer.bias", "other.alpha"}
    assert folded["layer.weight"].dtype == dtype
    assert folded["other.alpha"] is sd["other.alpha"]
    x = torch.randn(2, 4, 11)
    with torch.no_grad():
        normed(x)
        expected = normed.weight.to(dtype)
    tol = 1e-6 if dtype == torch.float32 else 1e-2
    torch.testing.assert_close(folded["layer.weight"], expected, rtol=tol, atol=tol)
    plain.load_state_dict({k[len("layer."):]: v.float() for k, v in folded.items()
                           if k.startswith("layer.")})
    if dtype == torch.float32:
        torch.testing.assert_close(plain(x), normed(x))


def test_fold_weight_norm_rejects_half_pairs():
    with pytest.raises(KeyError):
        fold_weight_norm({"a.weight_v": torch.ones(2, 2, 1)})
    with pytest.raises(KeyError):
        fold_weight_norm({"a.weight_g": torch.ones(2, 1, 1)})
