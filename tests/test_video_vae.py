"""The Wan video VAE's RMS norms compute what the reference's diffusers (0.36) computes, whatever
diffusers release is installed (diffusers >= 0.38 normalizes bf16 inputs in fp32 instead)."""

import math
import sys

import pytest
import torch

from mova_rt.config import preset_config
from mova_rt.models.video_vae import WanRMSNorm, build_video_vae


def _library_norm_class():
    from diffusers import AutoencoderKLWan

    return sys.modules[AutoencoderKLWan.__module__].WanRMS_norm


def test_every_wan_norm_is_replaced_and_keys_are_unchanged():
    from diffusers import AutoencoderKLWan

    cfg = preset_config("tiny").video_vae
    vae = build_video_vae(cfg)
    with torch.device("meta"):
        plain = AutoencoderKLWan.from_config(dict(cfg.raw))
    library = _library_norm_class()
    assert not any(isinstance(m, library) for m in vae.modules())
    ours = [m for m in vae.modules() if isinstance(m, WanRMSNorm)]
    assert len(ours) == sum(isinstance(m, library) for m in plain.modules()) > 10
    assert list(vae.state_dict()) == list(plain.state_dict())


def _norm_formula(x, gamma, norm):
    """diffusers 0.36: `norm` (the L2 norm over channels, in x's dtype) clamped at 1e-12, a division
    in x's dtype, then * sqrt(C) * gamma (+ the absent bias, 0.0)."""
    return (x / norm.clamp_min(1e-12)) * math.sqrt(x.shape[1]) * gamma + 0.0


def test_norms_of_the_built_vae_in_bf16_match_the_reference_formula():
    """Every norm of the VAE mova-rt builds, on bf16 activations of awkward sizes (5D in the
    residual blocks, 4D in the attention block)."""
    vae = build_video_vae(preset_config("tiny").video_vae).to_empty(device="cpu")
    norms = {name: m for name, m in vae.named_modules() if hasattr(m, "gamma")}
    assert norms
    gen = torch.Generator().manual_seed(0)
    for name, norm in norms.items():
        norm = norm.to(torch.bfloat16)
        with torch.no_grad():
            norm.gamma.copy_(1 + 0.1 * torch.randn(norm.gamma.shape, generator=gen))
        c = norm.gamma.shape[0]
        shape = (2, c, 9, 11) if norm.gamma.dim() == 3 else (1, c, 3, 13, 17)
        x = (torch.randn(shape, generator=gen) * 3).to(torch.bfloat16)
        with torch.no_grad():
            got = norm(x)
        # The norm as one bf16 reduction (rounded once to bf16): equal bit for bit.
        want = _norm_formula(x, norm.gamma, torch.linalg.vector_norm(x, 2, dim=1, keepdim=True))
        assert got.dtype == torch.bfloat16
        assert torch.equal(got, want), f"{name}: {(got != want).float().mean():.2%} of elements differ"
        # The norm from a float64 sum rounded to bf16: the same but where the fp32 reduction order
        # flips the norm's last bit (~0.1% of positions, a bf16 ulp or two after the three
        # roundings that follow; normalizing in fp32 instead moves ~20% of them).
        exact = x.double().pow(2).sum(1, keepdim=True).sqrt().to(torch.bfloat16)
        with torch.no_grad():
            loose = _norm_formula(x, norm.gamma, exact)
        assert (got != loose).float().mean() < 0.01, name
        two_ulps = 2 * torch.finfo(torch.bfloat16).eps * loose.float().abs()
        assert ((got.float() - loose.float()).abs() <= two_ulps).all(), name


def test_norm_in_fp32_equals_the_library_module():
    lib = _library_norm_class()(24, images=False)
    with torch.no_grad():
        lib.gamma.copy_(1 + 0.1 * torch.randn(lib.gamma.shape))
    x = torch.randn(1, 24, 5, 7, 9)
    with torch.no_grad():
        assert torch.equal(WanRMSNorm(lib)(x), lib(x))
