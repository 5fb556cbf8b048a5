"""LoRA files of the MOVA trainers, merged into the base weights once (spec 7).

Accepted files (all with keys `<component>.<module path>.lora_A` / `.lora_B`, optionally followed by
`.default` and/or `.weight`; component in video_dit, video_dit_2, audio_dit, dual_tower_bridge):
- accelerate trainer: a folder with `lora_weights.pt` (a dict of tensors) and optionally
  `lora_config.pt` (its `alpha` is used when numeric; its `rank` is unreliable and ignored);
- low-resource trainer: `lora_weights.pt` holding {"lora_state_dict": ..., "rank", "alpha", ...};
- a `.safetensors` file with the same keys (alpha from its metadata "alpha" if present).
Pickles are read with `torch.load(weights_only=True)`: tensors and plain containers only.

Merge: W += lora_scale * (alpha / r) * B @ A, computed in fp32 and rounded once to W's dtype; r is
taken from the shapes (A [r, in], B [out, r]); alpha = --lora_alpha, else the file's, else 16 (the
reference's default).
"""

from __future__ import annotations

import math
import os
import pickle
import re
import warnings

import torch
import torch.nn as nn

from .errors import MovaInputError

LORA_COMPONENTS = ("video_dit", "video_dit_2", "audio_dit", "dual_tower_bridge")
DEFAULT_ALPHA = 16.0
_KEY = re.compile(r"^(?P<comp>[a-z_0-9]+?)\.(?P<path>.+)\.lora_(?P<ab>[AB])(\.default)?(\.weight)?$")


def _torch_load(path: str):
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except (pickle.UnpicklingError, RuntimeError, EOFError, OSError, ValueError) as e:
        first = str(e).splitlines()[0][:160] if str(e) else type(e).__name__
        raise MovaInputError(f"cannot load LoRA file {path} safely ({first}): only tensor "
                             "dicts are accepted (torch.load weights_only=True); re-save it as "
                             ".safetensors") from None


def read_lora(path: str) -> tuple[dict[str, torch.Tensor], float | None]:
    """Returns (flat LoRA tensor dict, alpha stored with it or None)."""
    if not os.path.exists(path):
        raise MovaInputError(f"LoRA path {path} does not exist: pass --lora_path with a folder "
                             "holding lora_weights.pt, or a .pt/.safetensors LoRA file")
    alpha = None
    if os.path.isdir(path):
        weights = os.path.join(path, "lora_weights.pt")
        if not os.path.isfile(weights):
            raise MovaInputError(f"{path} has no lora_weights.pt: pass the folder the MOVA "
                                 "trainer saved, or the LoRA file itself")
        cfg_path = os.path.join(path, "lora_config.pt")
        if os.path.isfile(cfg_path):
            cfg = _torch_load(cfg_path)
            if isinstance(cfg, dict) and isinstance(cfg.get("alpha"), (int, float)):
                alpha = float(cfg["alpha"])
        path = weights
    if path.endswith(".safetensors"):
        from safetensors import safe_open
        try:
            with safe_open(path, framework="pt", device="cpu") as f:
                tensors = {k: f.get_tensor(k) for k in f.keys()}
                meta = f.metadata() or {}
        except Exception as e:
            raise MovaInputError(f"cannot read LoRA file {path} ({str(e)[:160]}): the file is "
                                 "truncated or not safetensors") from None
        if "alpha" in meta:
            try:
                alpha = float(meta["alpha"])
            except ValueError:
                pass
        return tensors, alpha
    data = _torch_load(path)
    if isinstance(data, dict) and "lora_state_dict" in data:  # low-resource trainer
        if isinstance(data.get("alpha"), (int, float)):
            alpha = float(data["alpha"])
        data = data["lora_state_dict"]
    if not isinstance(data, dict) or not all(isinstance(v, torch.Tensor) for v in data.values()):
        raise MovaInputError(f"{path} is not a LoRA state dict (expected a dict of tensors with "
                             "'<component>.<module>.lora_A/.lora_B' keys)")
    return data, alpha


def parse_pairs(tensors: dict[str, torch.Tensor]) -> dict[str, dict[str, tuple]]:
    """{component: {module path: (A [r, in], B [out, r])}}; refuses stray or unpaired keys."""
    halves: dict[tuple, dict[str, torch.Tensor]] = {}
    for key, t in tensors.items():
        m = _KEY.match(key)
        if m is None or m["comp"] not in LORA_COMPONENTS:
            raise MovaInputError(f"LoRA key '{key}' is not of the form <component>.<module>."
                                 f"lora_A/lora_B with component in {', '.join(LORA_COMPONENTS)}: "
                                 "this is not a MOVA LoRA")
        halves.setdefault((m["comp"], m["path"]), {})[m["ab"]] = t
    out: dict[str, dict[str, tuple]] = {}
    for (comp, mpath), ab in halves.items():
        if set(ab) != {"A", "B"}:
            raise MovaInputError(f"LoRA for {comp}.{mpath} has lora_{next(iter(ab))} but not its "
                                 "partner: the file is incomplete")
        a, b = ab["A"], ab["B"]
        if a.dim() != 2 or b.dim() != 2 or b.shape[1] != a.shape[0]:
            raise MovaInputError(f"LoRA for {comp}.{mpath} has shapes A {tuple(a.shape)}, B "
                                 f"{tuple(b.shape)}: expected A [r, in] and B [out, r]")
        out.setdefault(comp, {})[mpath] = (a, b)
    return out


@torch.no_grad()
def merge_lora(components: dict[str, nn.Module], path: str, alpha: float | None = None,
               scale: float = 1.0) -> int:
    """Merges the LoRA at `path` into the loaded modules (by component name). Returns the number
    of Linear layers changed. Every LoRA key must match a Linear of a loaded component."""
    tensors, file_alpha = read_lora(path)
    pairs = parse_pairs(tensors)
    if not pairs:
        raise MovaInputError(f"LoRA {path} holds no lora_A/lora_B tensors")
    if alpha is None:
        alpha = file_alpha
    if alpha is None:
        warnings.warn(f"LoRA {path} stores no alpha; using {DEFAULT_ALPHA} like the reference "
                      "(pass --lora_alpha to set it)")
        alpha = DEFAULT_ALPHA
    if not (math.isfinite(alpha) and alpha > 0):
        raise MovaInputError(f"LoRA {path} stores alpha {alpha}, not a positive finite number: "
                             "pass --lora_alpha (e.g. 16) to set it")
    planned = []
    for comp, mods in pairs.items():
        if comp not in components or components[comp] is None:
            raise MovaInputError(f"LoRA targets {comp}, which is not loaded")
        named = dict(components[comp].named_modules())
        for mpath, (a, b) in sorted(mods.items()):
            layer = named.get(mpath)
            if not isinstance(layer, nn.Linear):
                raise MovaInputError(f"LoRA key {comp}.{mpath} matches no Linear layer of "
                                     f"{comp}: the LoRA was trained for another model")
            if tuple(layer.weight.shape) != (b.shape[0], a.shape[1]):
                raise MovaInputError(f"LoRA for {comp}.{mpath} is {b.shape[0]}x{a.shape[1]} but "
                                     f"the layer is {tuple(layer.weight.shape)}: the LoRA was "
                                     "trained for another model")
            if not (torch.isfinite(a).all() and torch.isfinite(b).all()):
                raise MovaInputError(f"LoRA for {comp}.{mpath} in {path} holds NaN or Inf "
                                     "values: the file is damaged; use an intact copy")
            planned.append((f"{comp}.{mpath}", layer, a, b))
    for name, layer, a, b in planned:
        r = a.shape[0]
        dev = layer.weight.device
        delta = (b.to(dev, torch.float32) @ a.to(dev, torch.float32)) * (scale * alpha / r)
        new = (layer.weight.float() + delta).to(layer.weight.dtype)
        if not torch.isfinite(new).all():
            raise MovaInputError(f"merging the LoRA into {name} overflows "
                                 f"{str(layer.weight.dtype).replace('torch.', '')} (--lora_scale "
                                 f"{scale:g}, alpha {alpha:g}, rank {r}): lower --lora_scale or "
                                 "--lora_alpha")
        layer.weight.copy_(new)     # (a refusal midway leaves a model the caller discards)
    return len(planned)
