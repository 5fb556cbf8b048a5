"""fp8 weight folders: written once by `mova-rt quantize` (or an engine build), loaded with checks.

One safetensors file per component, `<layer>.weight` (F8_E4M3) and `<layer>.weight_scale` (F32)
(and `<layer>.input_scale` when calibrated), next to `manifest.json` (format, scheme, the source
checkpoint's fingerprint, the layers and shapes). Biases are not copied: they load from the
checkpoint.
"""

from __future__ import annotations

import hashlib
import json
import os

from safetensors import safe_open
from safetensors.torch import save_file

from ..errors import MovaInputError
from .quantize import COMPONENTS, FP8, FORMAT, SCHEME


def source_digest(ckpt: str) -> str:
    """One digest of the checkpoint's fingerprint (mova_rt.launch.checkpoint_fingerprint)."""
    from ..launch import checkpoint_fingerprint
    prints = checkpoint_fingerprint(ckpt)
    return hashlib.sha256(json.dumps(prints, sort_keys=True).encode()).hexdigest()


def save(weights, ckpt: str, out: str) -> None:
    """Writes fp8 weights to the new folder `out`, atomically. weights: {component: {layer:
    (w_q, w_scale)}} (from `apply`) or an iterable of (component, layers) pairs, consumed one
    component at a time (quantize_checkpoint)."""
    from ..files import new_folder
    with new_folder(out, ".mova-fp8-") as tmp:
        manifest = {"format": FORMAT, "scheme": SCHEME, "source": os.path.abspath(ckpt),
                    "source_digest": source_digest(ckpt), "components": {}}
        pairs = weights.items() if isinstance(weights, dict) else weights
        static = set()
        for component, layers in pairs:
            tensors = {}
            for name, entry in layers.items():
                w_q, w_scale, in_scale = (tuple(entry) + (None,))[:3]
                tensors[f"{name}.weight"] = w_q.detach().cpu().contiguous()
                tensors[f"{name}.weight_scale"] = w_scale.detach().float().cpu().contiguous()
                if in_scale is not None:
                    tensors[f"{name}.input_scale"] = in_scale.detach().float().cpu().reshape(())
                    static.add(component)
            fname = f"{component}.fp8.safetensors"
            save_file(tensors, os.path.join(tmp, fname), metadata={"scheme": SCHEME})
            manifest["components"][component] = {
                "file": fname, "layers": {n: list(e[0].shape) for n, e in layers.items()},
                "activations": "static-tensor" if component in static else "dynamic-token"}
        with open(os.path.join(tmp, "manifest.json"), "w", encoding="utf-8") as fh:
            json.dump(manifest, fh, indent=2)


def load(path: str, ckpt: str, device="cpu") -> dict:
    """{component: {layer: (w_q, w_scale, input_scale or None)}} from a folder written by `save`,
    after checking it
    belongs to `ckpt` and is complete. Raises MovaInputError naming the problem and the fix."""
    from ..validate.manifests import check_fp8_manifest, read_fp8_manifest
    redo = f"mova-rt quantize --ckpt_path {ckpt} --out NEW_FOLDER"
    manifest = read_fp8_manifest(path, redo)
    check_fp8_manifest(manifest, path, redo)        # format, then every field's type
    if manifest.get("source_digest") != source_digest(ckpt):
        raise MovaInputError(f"--fp8_weights {path} was quantized from another checkpoint "
                             f"({manifest.get('source')}), not {ckpt}: use its own fp8 weights "
                             f"or `{redo}`")
    comps = manifest.get("components", {})
    if set(comps) != set(COMPONENTS):
        raise MovaInputError(f"--fp8_weights {path} lacks {sorted(set(COMPONENTS) - set(comps))}: "
                             f"write it again with `{redo}`")
    out = {}
    for component, entry in comps.items():
        fname = os.path.join(path, entry["file"])
        static = entry.get("activations", "dynamic-token") == "static-tensor"
        layers = {}
        try:
            with safe_open(fname, framework="pt", device=str(device)) as f:
                keys = set(f.keys())
                for name, shape in entry["layers"].items():
                    w_q, w_scale = f.get_tensor(f"{name}.weight"), f.get_tensor(f"{name}.weight_scale")
                    if list(w_q.shape) != shape or w_q.dtype != FP8 or w_scale.shape != (shape[0],):
                        raise ValueError(f"{name} is {tuple(w_q.shape)} {w_q.dtype}")
                    in_scale = None
                    if static:
                        in_scale = f.get_tensor(f"{name}.input_scale")
                        if in_scale.numel() != 1 or not bool(in_scale.float() > 0):
                            raise ValueError(f"{name}.input_scale is not one positive scale")
                    layers[name] = (w_q, w_scale, in_scale)
                if len(keys) != (3 if static else 2) * len(entry["layers"]):
                    raise ValueError("the file holds tensors the manifest does not list")
        except Exception as e:       # safetensors raises several types for a damaged file
            raise MovaInputError(f"--fp8_weights {fname} is damaged or incomplete "
                                 f"({str(e).splitlines()[0][:120] if str(e) else type(e).__name__}): "
                                 f"write it again with `{redo}`") from None
        out[component] = layers
    return out


def activations_of(path: str) -> set:
    """The activation modes ("static-tensor", "dynamic-token") of an fp8 weights folder's
    components, from its manifest (empty when it has none: `load` names that problem)."""
    from ..validate.manifests import check_fp8_manifest, read_fp8_manifest
    try:
        manifest = read_fp8_manifest(path, "mova-rt quantize")
        check_fp8_manifest(manifest, path, "mova-rt quantize")
    except MovaInputError:
        return set()
    return {entry.get("activations", "dynamic-token")
            for entry in manifest["components"].values()}
