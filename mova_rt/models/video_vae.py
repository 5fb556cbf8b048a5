"""The video VAE of MOVA: the Wan2.1 VAE through diffusers' AutoencoderKLWan (spec 1.6).

Encode runs in the weight dtype without autocast; decode under autocast in the weight dtype, as the
reference does. Latents are normalised per channel with latents_mean / latents_std from the
checkpoint's config: (z - mean) * (1 / std), and back with z * std + mean, in fp32.
"""

from __future__ import annotations

from contextlib import nullcontext

import torch

from ..config import VideoVAEConfig


def build_video_vae(cfg: VideoVAEConfig):
    """AutoencoderKLWan on the meta device (the loader assigns the weights)."""
    from diffusers import AutoencoderKLWan

    with torch.device("meta"):
        return AutoencoderKLWan.from_config(dict(cfg.raw))


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
