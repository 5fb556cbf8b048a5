"""`mova-rt make-checkpoint`: a random-weight MOVA checkpoint in exactly the official layout
(spec 2.2): the same folders, file names, shard naming and index files, key names and config
fields as MOVA-360p, tokenizer included, so every code path runs without the 72 GB download.

Weights are random but well-scaled (Linear weights ~ N(0, 1/fan_in), norms ~ 1, modulation tables
~ N(0, 1/dim) as in the reference's init) so activations stay O(1) through the network and the
outputs are deterministic for a given seed. Stored dtypes follow the hub files: DiTs, bridge and
text encoder bf16; both VAEs fp32.
"""

from __future__ import annotations

import json
import math
import os

import torch
import torch.nn as nn
from safetensors.torch import save_file

from .config import MovaConfig, preset_config
from .errors import MovaInputError
from .files import new_folder
from .models.audio_dit import AudioDiT
from .models.audio_vae import DacVAE
from .models.bridge import Bridge
from .models.text_encoder import build_umt5_encoder
from .models.tiny_tokenizer import TOKENIZER_STYLES, write_tiny_tokenizer
from .models.video_dit import VideoDiT
from .models.video_vae import build_video_vae
from .ops import resolve

SHARDED = {"video_dit": ("diffusion_pytorch_model", 3), "video_dit_2": ("diffusion_pytorch_model", 3),
           "text_encoder": ("model", 3)}
SINGLE = {"audio_dit": "diffusion_pytorch_model", "dual_tower_bridge": "diffusion_pytorch_model",
          "video_vae": "diffusion_pytorch_model", "audio_vae": "diffusion_pytorch_model"}


def randomize_(module: nn.Module, gen: torch.Generator, device="cpu"):
    """Materialise `module` (built on meta) on `device` with well-scaled random values drawn from
    `gen` (a generator on that device): the tiny checkpoints and the benchmark's weights."""
    module.to_empty(device=device)
    for name, p in module.named_parameters():
        leaf = name.rsplit(".", 1)[-1]

        def randn():  # fp32 draws, rounded once to the parameter's dtype by copy_
            return torch.randn(p.shape, generator=gen, device=p.device)

        with torch.no_grad():
            if leaf == "modulation":
                p.copy_(randn() / math.sqrt(p.shape[-1]))
            elif leaf == "bias":
                p.copy_(randn() * 0.02)
            elif leaf == "alpha":  # DAC Snake
                p.copy_(1.0 + 0.1 * torch.rand(p.shape, generator=gen, device=p.device))
            elif p.dim() == 1:  # norm gains
                p.copy_(1.0 + 0.1 * randn())
            else:
                fan_in = p[0].numel() if p.dim() > 1 else p.numel()
                p.copy_(randn() / math.sqrt(fan_in))
    for _, b in module.named_buffers():
        if b.is_floating_point():
            b.zero_()
    # Inference weights: autograd must never record a forward over them (it would keep fp32
    # copies of the time MLPs and every activation alive, as the first GPU run showed).
    return module.requires_grad_(False)


def _state(module: nn.Module, dtype: torch.dtype, drop: set[str] = frozenset()) -> dict:
    return {k: v.detach().to(dtype).contiguous() for k, v in module.state_dict().items()
            if k not in drop}


def _write_component(folder: str, name: str, state: dict):
    os.makedirs(folder, exist_ok=True)
    meta = {"format": "pt"}
    if name in SHARDED:
        stem, n = SHARDED[name]
        keys = list(state)
        per = math.ceil(len(keys) / n)
        weight_map, total = {}, 0
        for i in range(n):
            fname = f"{stem}-{i + 1:05d}-of-{n:05d}.safetensors"
            part = {k: state[k] for k in keys[i * per:(i + 1) * per]}
            save_file(part, os.path.join(folder, fname), metadata=meta)
            for k, t in part.items():
                weight_map[k] = fname
                total += t.numel() * t.element_size()
        with open(os.path.join(folder, f"{stem}.safetensors.index.json"), "w") as fh:
            json.dump({"metadata": {"total_size": total}, "weight_map": weight_map}, fh, indent=2)
    else:
        save_file(state, os.path.join(folder, f"{SINGLE[name]}.safetensors"), metadata=meta)


def write_checkpoint(cfg: MovaConfig, out: str, seed: int = 0, tokenizer: str = "always"):
    """Writes the checkpoint for `cfg` to `out` (a new folder), atomically. `tokenizer`: the
    tokenizer.json variant (mova_rt.models.tiny_tokenizer.TOKENIZER_STYLES)."""
    with new_folder(out, ".mova-ckpt-") as tmp:
        _fill(cfg, tmp, seed, tokenizer)


def _fill(cfg: MovaConfig, root: str, seed: int, tokenizer: str):
    gen = torch.Generator().manual_seed(seed)
    ops = resolve("reference")
    for rel, doc in cfg.to_files().items():
        path = os.path.join(root, rel)
        os.makedirs(os.path.dirname(path), exist_ok=True)
        with open(path, "w", encoding="utf-8") as fh:
            json.dump(doc, fh, indent=2)
    bf16, fp32 = torch.bfloat16, torch.float32
    with torch.device("meta"):
        towers = {"video_dit": VideoDiT(cfg.video_dit, ops), "video_dit_2": VideoDiT(cfg.video_dit_2, ops),
                  "audio_dit": AudioDiT(cfg.audio_dit, ops), "dual_tower_bridge": Bridge(cfg.bridge, ops),
                  "audio_vae": DacVAE(cfg.audio_vae)}
    towers["video_vae"] = build_video_vae(cfg.video_vae)
    dtypes = {"video_vae": fp32, "audio_vae": fp32}
    for name, module in towers.items():
        _write_component(os.path.join(root, name), name,
                         _state(randomize_(module, gen), dtypes.get(name, bf16)))
        del module
    text = randomize_(build_umt5_encoder(cfg.text_encoder), gen)
    # The hub index lists `shared.weight` and the encoder tensors; the encoder's embed_tokens
    # is tied to `shared` and not stored.
    _write_component(os.path.join(root, "text_encoder"), "text_encoder",
                     _state(text, bf16, drop={"encoder.embed_tokens.weight"}))
    write_tiny_tokenizer(os.path.join(root, "tokenizer"), vocab_size=cfg.text_encoder["vocab_size"],
                         style=tokenizer)


def make_checkpoint(preset: str, out: str, seed: int = 0, tokenizer: str = "always"):
    if preset != "tiny":
        raise MovaInputError(f"make-checkpoint writes only the 'tiny' preset ({preset} would be "
                             "~72 GB of random weights); `mova-rt bench` builds the full-size "
                             "model directly on the GPU")
    if tokenizer not in TOKENIZER_STYLES:
        raise MovaInputError(f"unknown --tokenizer {tokenizer!r}; use one of {', '.join(TOKENIZER_STYLES)}")
    write_checkpoint(preset_config(preset), out, seed, tokenizer)
