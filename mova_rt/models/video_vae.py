"""The video VAE of MOVA: the Wan2.1 VAE through diffusers' AutoencoderKLWan (spec 1.6), with its
RMS norms computed as the reference's diffusers (0.36) computes them.

Encode runs in the weight dtype without autocast; decode under autocast in the weight dtype, as the
reference does. Latents are normalised per channel with latents_mean / latents_std from the
checkpoint's config: (z - mean) * (1 / std), and back with z * std + mean, in fp32.

Why mova-rt owns the norm: diffusers 0.38 changed WanRMS_norm to run F.normalize on an fp32 copy of a
bf16/fp16 input (one rounding at the end); 0.36 normalizes in the activation dtype (the norm rounded
to bf16, then a bf16 division). That moves the bf16 condition latent by ~1e-2 relative. It is the only
arithmetic change in autoencoder_kl_wan.py from 0.36.0 to 0.42.1 (read for every release in
between), so replacing these modules keeps every diffusers release in setup.py's range on the
reference's arithmetic, without pinning users to an old diffusers.
"""

from __future__ import annotations

import sys
from contextlib import nullcontext

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..config import VideoVAEConfig
from ..errors import MovaInputError


class WanRMSNorm(nn.Module):
    """x / max(||x||_2, 1e-12) over the channel dim, computed in x's dtype (not upcast), then
    * sqrt(dim) * gamma + bias: diffusers 0.36's WanRMS_norm. Takes over the gamma (and bias, a
    Parameter or the float 0.0) of the module it replaces, so state-dict keys are unchanged."""

    def __init__(self, replaced: nn.Module):
        super().__init__()
        self.channel_first = replaced.channel_first
        self.scale = replaced.scale            # sqrt(dim)
        self.gamma = replaced.gamma            # [dim, 1, 1(, 1)] or [dim]
        self.bias = replaced.bias              # same shape as gamma, or 0.0

    def forward(self, x):
        dim = 1 if self.channel_first else -1
        return F.normalize(x, dim=dim) * self.scale * self.gamma + self.bias


def use_reference_norms(vae: nn.Module) -> nn.Module:
    """Replace every diffusers WanRMS_norm in `vae` by WanRMSNorm (in place; on any device)."""
    norm_class = getattr(sys.modules[type(vae).__module__], "WanRMS_norm", None)
    if norm_class is None:
        raise MovaInputError("this diffusers release has no WanRMS_norm in AutoencoderKLWan's module; "
                             "install a diffusers version within mova-rt's setup.py range")
    replaced = 0
    for parent in list(vae.modules()):
        for name, child in list(parent.named_children()):
            if isinstance(child, norm_class):
                setattr(parent, name, WanRMSNorm(child))
                replaced += 1
    if replaced == 0:
        raise MovaInputError("AutoencoderKLWan has no WanRMS_norm modules in this diffusers "
                             "release; install a diffusers version within mova-rt's setup.py range")
    return vae


def build_video_vae(cfg: VideoVAEConfig):
    """AutoencoderKLWan on the meta device (the loader assigns the weights), its RMS norms
    replaced by the reference's arithmetic (module doc)."""
    from diffusers import AutoencoderKLWan

    with torch.device("meta"):
        return use_reference_norms(AutoencoderKLWan.from_config(dict(cfg.raw)))


def _stats(cfg: VideoVAEConfig, device):
    mean = torch.tensor(cfg.latents_mean, dtype=torch.float32, device=device).view(1, -1, 1, 1, 1)
    std = torch.tensor(cfg.latents_std, dtype=torch.float32, device=device).view(1, -1, 1, 1, 1)
    return mean, std


def normalize_latents(cfg: VideoVAEConfig, z: torch.Tensor) -> torch.Tensor:
    mean, std = _stats(cfg, z.device)
    return (z.float() - mean) * (1.0 / std)


def denormalize_latents(cfg: VideoVAEConfig, z: torch.Tensor) -> torch.Tensor:
    mean, std = _stats(cfg, z.device)
    return z.float() * std + mean


@torch.no_grad()
def encode_condition(vae, cfg: VideoVAEConfig, image: torch.Tensor, num_frames: int):
    """image [1, 3, H, W] in [-1, 1] -> normalised condition latents [1, z, (F-1)/4+1, H/8, W/8]
    fp32: the image followed by F-1 zero frames, encoded whole (posterior mode)."""
    b, c, h, w = image.shape
    clip = torch.cat([image[:, :, None], image.new_zeros(b, c, num_frames - 1, h, w)], dim=2)
    dtype = next(vae.parameters()).dtype
    z = vae.encode(clip.to(dtype)).latent_dist.mode()
    return normalize_latents(cfg, z)


@torch.no_grad()
def decode_frames(vae, cfg: VideoVAEConfig, latents: torch.Tensor) -> torch.Tensor:
    """Normalised latents [1, z, T, h, w] fp32 -> uint8 frames [F, H, W, 3] (CPU), rounded like
    diffusers' postprocess: ((x / 2 + 0.5).clamp(0, 1) * 255).round()."""
    dtype = next(vae.parameters()).dtype
    z = denormalize_latents(cfg, latents)
    device_type = z.device.type
    ctx = (torch.autocast(device_type, dtype=dtype) if dtype != torch.float32 else nullcontext())
    with ctx:
        video = vae.decode(z.to(dtype)).sample                          # [1, 3, F, H, W]
    video = (video[0] / 2 + 0.5).clamp(0, 1)                            # [3, F, H, W]
    frames = (video.permute(1, 2, 3, 0).float().cpu() * 255).round()
    return frames.to(torch.uint8)
