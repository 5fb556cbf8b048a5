"""The stages outside the denoising loop, timed apart (`mova-rt bench --time-stages`).

- text: the UMT5 encoder over two 512-token prompts (positive and negative, one after the
  other as the pipeline runs them); token ids are drawn at random (the tokenizer is excluded).
- vae_encode: the conditioning clip (first frame + zero frames) through the video VAE encoder.
- vae_decode: the video latents through the video VAE decoder, to uint8 frames on the host.
- audio_decode: the audio latents through the DAC decoder (fp32).
Each stage builds its module (random bf16 weights on the device, or from --ckpt_path), warms up
once, is timed, and frees its module before the next. The video VAE needs diffusers; without it
those stages are reported as skipped.
"""

from __future__ import annotations

import torch
import torch.nn as nn

from mova_rt.checkpoint import randomize_
from mova_rt.config import MovaConfig
from mova_rt.loader import load_state
from mova_rt.models.audio_vae import DacVAE, fold_weight_norm
from mova_rt.models.text_encoder import build_umt5_encoder, tie_umt5_embeddings, umt5_expected_keys

from .bench_step import _oom_message, free_device_memory
from .flops import Shapes
from .measure import GIB, PeakSampler, spread, time_op

BF16 = torch.bfloat16


def _materialise(module, name, device, ckpt_path, dtype, gen, **load_kw):
    if ckpt_path:
        return load_state(module, ckpt_path, name, dtype, device, **load_kw)
    # nn.Module.to, not diffusers' override: the meta module holds no values to keep in fp32,
    # and diffusers would warn about exactly that.
    return randomize_(nn.Module.to(module, dtype), gen, device)


def _text(cfg, s, device, ckpt_path, gen):
    umt5 = build_umt5_encoder(cfg.text_encoder)
    umt5 = _materialise(umt5, "text_encoder", device, ckpt_path, BF16, gen,
                        expected=umt5_expected_keys(umt5), finalize=tie_umt5_embeddings)
    vocab = cfg.text_encoder["vocab_size"]
    ids = [torch.randint(vocab, (1, s.L_t), generator=gen, device=device) for _ in range(2)]
    mask = torch.ones(1, s.L_t, dtype=torch.long, device=device)

    def run():
        for x in ids:
            umt5(input_ids=x, attention_mask=mask).last_hidden_state
    return umt5, run


def _video_vae(cfg, s, device, ckpt_path, gen, decode: bool):
    from mova_rt.models.video_vae import build_video_vae, decode_frames, encode_condition

    vae = _materialise(build_video_vae(cfg.video_vae), "video_vae", device, ckpt_path, BF16, gen)
    if decode:
        t, h, w = s.latent_grid
        latents = torch.randn(1, s.z_dim, t, h, w, generator=gen, device=device)
        return vae, lambda: decode_frames(vae, cfg.video_vae, latents)
    image = torch.rand(1, 3, s.height, s.width, generator=gen, device=device) * 2 - 1
    return vae, lambda: encode_condition(vae, cfg.video_vae, image, s.num_frames)


def _audio_decode(cfg, s, device, ckpt_path, gen):
    with torch.device("meta"):
        dac = DacVAE(cfg.audio_vae)
    fold = fold_weight_norm if cfg.audio_vae.use_weight_norm else None
    if ckpt_path:
        dac = load_state(dac, ckpt_path, "audio_vae", BF16, device, transform=fold)
    else:
        dac = _materialise(dac, "audio_vae", device, None, BF16, gen)
    dac = dac.float()   # the pipeline decodes in fp32 from weights stored at its dtype
    z = torch.randn(1, s.audio_channels, s.L_a, generator=gen, device=device)
    return dac, lambda: dac.decode(z)


STAGES = {"text": _text,
          "vae_encode": lambda *a: _video_vae(*a, decode=False),
          "vae_decode": lambda *a: _video_vae(*a, decode=True),
          "audio_decode": _audio_decode}


def run_stages(cfg: MovaConfig, s: Shapes, device: torch.device, ckpt_path: str | None,
               seed: int, reps: int, log) -> dict:
    gen = torch.Generator(device=device).manual_seed(seed + 2)
    try:
        import diffusers  # noqa: F401
        have_diffusers = True
    except ImportError:
        have_diffusers = False
    results = {}
    for name, build in STAGES.items():
        if name.startswith("vae") and not have_diffusers:
            results[name] = {"status": "skipped",
                             "message": "diffusers is not installed (the Wan video VAE needs it)"}
            log(f"stage {name}: skipped (no diffusers)")
            continue
        module = run = None
        try:
            with torch.no_grad(), PeakSampler(device) as peaks:
                module, run = build(cfg, s, device, ckpt_path, gen)
                sec = time_op(run, device, warmup=1, reps=reps)
            results[name] = {"status": "ok", **{f"{k}_s": v for k, v in spread(sec).items()},
                             "peak_vram_allocated_gib": peaks.peak_alloc / GIB}
            log(f"stage {name}: {results[name]['median_s']:.3f} s")
        except torch.OutOfMemoryError as e:
            results[name] = {"status": "oom", "message": _oom_message(e, device, name)}
            log(f"stage {name}: {results[name]['message']}")
        finally:
            del module, run
            free_device_memory(device)
    return results
