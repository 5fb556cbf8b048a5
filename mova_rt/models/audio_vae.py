"""MOVA's audio VAE: the continuous Descript-Audio-Codec (DAC) autoencoder.

MOVA encodes and decodes its audio track with the DAC variant that HunyuanVideo-Foley calls
"vae_128d_48k": a convolutional encoder that turns mono 48 kHz audio into 128 latent channels
at 50 frames per second, and a convolutional decoder that turns them back.  The quantizer of
the original codec is replaced by a diagonal Gaussian posterior (`quant_conv` predicts mean and
log-variance); at inference only the mean is used.

Where the numbers come from (all of them are in `audio_vae/config.json`, read into
`AudioVAEConfig`):

* encoder_rates (2, 3, 4, 5, 8): the strides of the five encoder blocks; their product is the
  hop length, 960 samples, so 48000 / 960 = 50 latent frames per second.
* encoder_dim 128: channels after the first conv; every encoder block doubles them, so the
  last block has 128 * 2**5 = 4096 channels before the final conv down to latent_dim.
* latent_dim 128: the channels of the latent that the audio DiT denoises.
* decoder_dim 2048: channels after the first decoder conv; every decoder block halves them
  while upsampling by decoder_rates (8, 5, 4, 3, 2), ending at 2048 / 2**5 = 64 channels.
* The kernel sizes (7 for the stem, ResidualUnit and decoder head convs, 3 for the encoder head,
  2 * stride for the resampling convs) and the dilations (1, 3, 9) are fixed by the DAC design.

The module tree copies the nesting of the reference implementation, so that the state-dict keys
are exactly those of the released `audio_vae/diffusion_pytorch_model.safetensors`.  The released
weights have weight norm already folded in; `fold_weight_norm` folds checkpoints that do not.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from mova_rt.config import AudioVAEConfig

RESIDUAL_DILATIONS = (1, 3, 9)


def snake(x: Tensor, alpha: Tensor) -> Tensor:
    """Snake activation  x + sin(alpha * x)**2 / (alpha + 1e-9).

    x: [B, C, ...] (viewed as [B, C, -1] for the computation); alpha: [1, C, 1].
    Returns a tensor shaped like x.
    """
    shape = x.shape
    flat = x.reshape(shape[0], shape[1], -1)
    inverse_alpha = (alpha + 1e-9).reciprocal()
    flat = flat + inverse_alpha * torch.sin(alpha * flat).pow(2)
    return flat.reshape(shape)


class Snake1d(nn.Module):
    """Snake activation with one learned frequency per channel; `alpha` has shape [1, C, 1]."""

    def __init__(self, channels: int):
        super().__init__()
        self.alpha = nn.Parameter(torch.ones(1, channels, 1))

    def forward(self, x: Tensor) -> Tensor:
        return snake(x, self.alpha)


class ResidualUnit(nn.Module):
    """Snake, dilated conv k7, Snake, conv k1, plus a skip connection.  [B, C, T] -> [B, C, T].

    Keys: block.0.alpha, block.1.{weight,bias}, block.2.alpha, block.3.{weight,bias}.
    """

    def __init__(self, dim: int, dilation: int = 1):
        super().__init__()
        self.block = nn.Sequential(
            Snake1d(dim),
            nn.Conv1d(dim, dim, kernel_size=7, dilation=dilation, padding=3 * dilation),
            Snake1d(dim),
            nn.Conv1d(dim, dim, kernel_size=1),
        )

    def forward(self, x: Tensor) -> Tensor:
        y = self.block(x)
        crop = (x.shape[-1] - y.shape[-1]) // 2
        if crop > 0:
            x = x[..., crop:-crop]
        return x + y


class EncoderBlock(nn.Module):
    """Three ResidualUnits at dim // 2 channels, Snake, then a strided conv to dim channels.

    [B, dim // 2, T] -> [B, dim, T / stride]  (T a multiple of stride).
    """

    def __init__(self, dim: int, stride: int):
        super().__init__()
        half = dim // 2
        layers = [ResidualUnit(half, dilation=d) for d in RESIDUAL_DILATIONS]
        layers.append(Snake1d(half))
        layers.append(nn.Conv1d(half, dim, kernel_size=2 * stride, stride=stride,
                                padding=math.ceil(stride / 2)))
        self.block = nn.Sequential(*layers)

    def forward(self, x: Tensor) -> Tensor:
        return self.block(x)


class Encoder(nn.Module):
    """Audio [B, 1, T] -> features [B, latent_dim, T / prod(rates)].

    block.0: conv k7 1 -> dim; block.1..n: EncoderBlocks (channels double each time);
    block.n+1: Snake; block.n+2: conv k3 to latent_dim.
    """

    def __init__(self, dim: int, rates: tuple, latent_dim: int):
        super().__init__()
        layers = [nn.Conv1d(1, dim, kernel_size=7, padding=3)]
        for stride in rates:
            dim *= 2
            layers.append(EncoderBlock(dim, stride))
        layers.append(Snake1d(dim))
        layers.append(nn.Conv1d(dim, latent_dim, kernel_size=3, padding=1))
        self.block = nn.Sequential(*layers)

    def forward(self, x: Tensor) -> Tensor:
        return self.block(x)


class DecoderBlock(nn.Module):
    """Snake, transposed conv upsampling by `stride`, then three ResidualUnits.

    [B, in_dim, L] -> [B, out_dim, L * stride].
    """

    def __init__(self, in_dim: int, out_dim: int, stride: int):
        super().__init__()
        layers = [
            Snake1d(in_dim),
            nn.ConvTranspose1d(in_dim, out_dim, kernel_size=2 * stride, stride=stride,
                               padding=math.ceil(stride / 2), output_padding=stride % 2),
        ]
        layers += [ResidualUnit(out_dim, dilation=d) for d in RESIDUAL_DILATIONS]
        self.block = nn.Sequential(*layers)

    def forward(self, x: Tensor) -> Tensor:
        return self.block(x)


class Decoder(nn.Module):
    """Latent [B, latent_dim, L] -> audio [B, 1, L * prod(rates)] in [-1, 1].

    model.0: conv k7 latent_dim -> dim; model.1..n: DecoderBlocks (channels halve each time);
    model.n+1: Snake; model.n+2: conv k7 to 1 channel; model.n+3: Tanh.
    """

    def __init__(self, latent_dim: int, dim: int, rates: tuple):
        super().__init__()
        layers = [nn.Conv1d(latent_dim, dim, kernel_size=7, padding=3)]
        for i, stride in enumerate(rates):
            layers.append(DecoderBlock(dim // 2 ** i, dim // 2 ** (i + 1), stride))
        out_dim = dim // 2 ** len(rates)
        layers.append(Snake1d(out_dim))
        layers.append(nn.Conv1d(out_dim, 1, kernel_size=7, padding=3))
        layers.append(nn.Tanh())
        self.model = nn.Sequential(*layers)

    def forward(self, x: Tensor) -> Tensor:
        return self.model(x)


class DacVAE(nn.Module):
    """The continuous DAC audio VAE (encoder, quant_conv, post_quant_conv, decoder).

    Attributes: hop_length (audio samples per latent frame), sample_rate, latent_dim.
    """

    def __init__(self, cfg: AudioVAEConfig):
        super().__init__()
        if not cfg.continuous:
            raise ValueError("only the continuous DAC is supported")
        if math.prod(cfg.decoder_rates) != cfg.hop_length:
            raise ValueError(f"decoder_rates {cfg.decoder_rates} do not upsample by the "
                             f"encoder hop length {cfg.hop_length}")
        self.cfg = cfg
        self.hop_length = cfg.hop_length
        self.sample_rate = cfg.sample_rate
        self.latent_dim = cfg.latent_dim
        self.encoder = Encoder(cfg.encoder_dim, cfg.encoder_rates, cfg.latent_dim)
        self.quant_conv = nn.Conv1d(cfg.latent_dim, 2 * cfg.latent_dim, kernel_size=1)
        self.post_quant_conv = nn.Conv1d(cfg.latent_dim, cfg.latent_dim, kernel_size=1)
        self.decoder = Decoder(cfg.latent_dim, cfg.decoder_dim, cfg.decoder_rates)

    def encode(self, audio: Tensor) -> Tensor:
        """Mono audio [B, 1, T] -> posterior mean [B, latent_dim, ceil(T / hop_length)].

        The audio is right-padded with zeros to a multiple of hop_length first.  The posterior
        is a diagonal Gaussian whose mean is the first latent_dim channels of quant_conv's
        output; the mean (the distribution's mode) is returned, nothing is sampled.
        """
        if audio.dim() != 3 or audio.shape[1] != 1:
            raise ValueError(f"expected audio of shape [B, 1, T], got {list(audio.shape)}")
        length = audio.shape[-1]
        padded = math.ceil(length / self.hop_length) * self.hop_length
        audio = F.pad(audio, (0, padded - length))
        moments = self.quant_conv(self.encoder(audio))
        mean, _logvar = moments.chunk(2, dim=1)
        return mean

    def decode(self, z: Tensor) -> Tensor:
        """Latent [B, latent_dim, L] -> audio [B, 1, L * hop_length] with values in [-1, 1]."""
        if z.dim() != 3 or z.shape[1] != self.latent_dim:
            raise ValueError(f"expected a latent of shape [B, {self.latent_dim}, L], "
                             f"got {list(z.shape)}")
        return self.decoder(self.post_quant_conv(z))


def fold_weight_norm(state_dict: dict[str, Tensor]) -> dict[str, Tensor]:
    """Replaces every weight-norm pair `X.weight_g`, `X.weight_v` by `X.weight`.

    The pairs are those written by torch.nn.utils.weight_norm(module, dim=0):
    weight = weight_g * weight_v / ||weight_v||, the norm taken over every dim except dim 0
    (weight_g has shape [N, 1, ..., 1] for a weight_v of shape [N, ...]).  The arithmetic is
    done in float32 and the result has weight_v's dtype.  All other keys pass through unchanged.
    """
    folded: dict[str, Tensor] = {}
    for key, value in state_dict.items():
        if key.endswith(".weight_g"):
            continue
        if not key.endswith(".weight_v"):
            folded[key] = value
            continue
        prefix = key[: -len(".weight_v")]
        g_key = prefix + ".weight_g"
        if g_key not in state_dict:
            raise KeyError(f"{key} has no matching {g_key}")
        v = value.float()
        g = state_dict[g_key].float()
        norm = v.reshape(v.shape[0], -1).norm(dim=1)
        norm = norm.reshape((v.shape[0],) + (1,) * (v.dim() - 1))
        folded[prefix + ".weight"] = (g * v / norm).to(value.dtype)
    orphans = [k for k in state_dict
               if k.endswith(".weight_g") and k[: -len("_g")] + "_v" not in state_dict]
    if orphans:
        raise KeyError(f"weight-norm magnitudes without directions: {orphans[:3]}")
    return folded
