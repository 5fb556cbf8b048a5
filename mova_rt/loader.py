"""The one load path for a MOVA checkpoint in the official layout (spec 2.2):

    <ckpt>/model_index.json
    <ckpt>/<component>/config.json
    <ckpt>/<component>/diffusion_pytorch_model.safetensors            (single file), or
    <ckpt>/<component>/diffusion_pytorch_model-0000i-of-0000n.safetensors
        + diffusion_pytorch_model.safetensors.index.json              (sharded)
    <ckpt>/text_encoder/model[-0000i-of-0000n].safetensors (+ model.safetensors.index.json)

Modules are built on the meta device and receive their tensors with `load_state_dict(assign=True)`
from mmap'd safetensors, cast once to the requested dtype. Loading is strict: a missing or
unexpected key, a shape or a dtype mismatch is refused with the component, the first offending
keys and the file. Checkpoint names appear only in `KEY_RENAMES` (none are needed today: our module
tree mirrors the reference's).
"""

from __future__ import annotations

import json
import os
import struct
from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn as nn
from safetensors import safe_open

from .errors import MovaInputError

# Component -> weight file stem (diffusers vs transformers naming).
WEIGHT_STEMS = {"text_encoder": "model"}
DEFAULT_STEM = "diffusion_pytorch_model"
FLOAT_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
KEY_RENAMES: dict[str, dict[str, str]] = {}
SHOW = 5  # offending keys named in an error


def weight_files(ckpt: str, component: str) -> dict[str, str]:
    """key -> absolute shard path for one component, from its index json or single file."""
    folder = os.path.join(ckpt, component)
    stem = WEIGHT_STEMS.get(component, DEFAULT_STEM)
    index = os.path.join(folder, f"{stem}.safetensors.index.json")
    single = os.path.join(folder, f"{stem}.safetensors")
    if os.path.isfile(index):
        try:
            with open(index, encoding="utf-8") as fh:
                weight_map = json.load(fh)["weight_map"]
        except (OSError, ValueError, KeyError, TypeError) as e:
            raise MovaInputError(f"cannot read {index} ({e}): restore the index file of "
                                 f"{component} from the checkpoint") from None
        out = {}
        for key, shard in weight_map.items():
            path = os.path.join(folder, shard)
            if not os.path.isfile(path):
                raise MovaInputError(f"missing weight file {path} (listed in {index}): download "
                                     f"the {component} shards again")
            out[key] = path
        return out
    if os.path.isfile(single):
        return {key: single for key in _keys_of(single, component)}
    raise MovaInputError(f"no weights for {component}: expected {single} or {index}; the "
                         "checkpoint folder is incomplete, download it again")


def _keys_of(path: str, component: str) -> list[str]:
    try:
        with safe_open(path, framework="pt", device="cpu") as f:
            return list(f.keys())
    except Exception as e:  # safetensors raises its own error types for corrupt headers
        raise MovaInputError(f"{path} is not a readable safetensors file ({_short(e)}): the "
                             f"{component} weights are truncated or corrupt; download them "
                             "again") from None


def _short(e: Exception) -> str:
    return str(e).splitlines()[0][:160] if str(e) else type(e).__name__


def _first(keys) -> str:
    keys = sorted(keys)
    more = f" and {len(keys) - SHOW} more" if len(keys) > SHOW else ""
    return ", ".join(keys[:SHOW]) + more


_ST_DTYPES = {"F32": torch.float32, "BF16": torch.bfloat16, "F16": torch.float16,
              "F64": torch.float64, "I64": torch.int64, "I32": torch.int32, "I16": torch.int16,
              "I8": torch.int8, "U8": torch.uint8, "BOOL": torch.bool,
              "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2}


def _by_file(where: dict[str, str]) -> dict[str, list[str]]:
    """key -> path  becomes  path -> keys, so each file is opened once."""
    out: dict[str, list[str]] = {}
    for key, path in where.items():
        out.setdefault(path, []).append(key)
    return out


def _headers(files: dict[str, str], component: str, folder: str):
    """key -> (shape, dtype) from the safetensors headers, without reading tensor data."""
    meta = {}
    for path, keys in _by_file(files).items():
        try:
            with safe_open(path, framework="pt", device="cpu") as f:
                present = set(f.keys())
                absent = [k for k in keys if k not in present]
                if absent:
                    raise MovaInputError(f"{component}: {path} lacks {_first(absent)} that its "
                                         "index lists; the shard is from another checkpoint or "
                                         "damaged, download it again")
                for k in keys:
                    sl = f.get_slice(k)
                    meta[k] = (tuple(sl.get_shape()), _ST_DTYPES.get(sl.get_dtype(), None))
        except MovaInputError:
            raise
        except Exception as e:
            raise MovaInputError(f"{path} cannot be read ({_short(e)}): the {component} weights "
                                 "are truncated or corrupt; download them again") from None
    return meta


def _read_all(where: dict[str, str], component: str, convert=lambda t: t) -> dict:
    """key -> convert(tensor) for key -> path, each file opened once, one host tensor at a time."""
    out = {}
    for path, keys in _by_file(where).items():
        try:
            with safe_open(path, framework="pt", device="cpu") as f:
                for k in sorted(keys):
                    out[k] = convert(f.get_tensor(k))
        except Exception as e:
            raise MovaInputError(f"{path} cannot be read ({_short(e)}): the {component} weights "
                                 "are truncated or corrupt; download them again") from None
    return out


@dataclass(frozen=True)
class TensorLocation:
    """Where a tensor's bytes lie in a safetensors file (for streaming them from disk)."""
    path: str
    offset: int          # from the start of the file
    nbytes: int
    dtype: torch.dtype
    shape: tuple


def tensor_locations(ckpt: str, component: str) -> dict:
    """key -> TensorLocation of every tensor of the component, from the safetensors headers
    (8-byte little-endian header length, JSON header, then the data)."""
    out = {}
    renames = KEY_RENAMES.get(component, {})
    for path, keys in _by_file(weight_files(ckpt, component)).items():
        try:
            with open(path, "rb") as fh:
                n = struct.unpack("<Q", fh.read(8))[0]
                header = json.loads(fh.read(n))
        except (OSError, ValueError, struct.error) as e:
            raise MovaInputError(f"{path} cannot be read ({_short(e)}): the {component} weights "
                                 "are truncated or corrupt; download them again") from None
        for k in keys:
            h = header[k]
            begin, end = h["data_offsets"]
            out[renames.get(k, k)] = TensorLocation(path, 8 + n + begin, end - begin,
                                                    _ST_DTYPES.get(h["dtype"]), tuple(h["shape"]))
    return out


def load_state(module: nn.Module, ckpt: str, component: str, dtype: torch.dtype,
               device: torch.device | str, expected: set[str] | None = None,
               transform: Callable[[dict], dict] | None = None,
               finalize: Callable[[nn.Module], None] | None = None,
               defer: Callable[[str], bool] | None = None) -> nn.Module:
    """Fills `module` (built on the meta device) with the component's checkpoint tensors, cast to
    `dtype` on `device`, one tensor at a time (host memory holds at most one tensor).

    expected: the keys the checkpoint must hold (default: the module's state_dict keys).
    transform: applied to the whole raw tensor dict before the checks (small components only,
      e.g. folding the DAC's weight norm).
    finalize: called after assignment, e.g. to re-tie shared embeddings.
    defer: keys for which it is true are checked but not read: they stay on the meta device
      (streamed from disk later, see mova_rt.offload).
    """
    files = weight_files(ckpt, component)
    folder = os.path.join(ckpt, component)
    renames = KEY_RENAMES.get(component, {})
    if transform is None:
        meta = {renames.get(k, k): v for k, v in _headers(files, component, folder).items()}
        where = {renames.get(k, k): (p, k) for k, p in files.items()}
        loaded = None
    else:
        raw = _read_all(files, component)
        loaded = transform({renames.get(k, k): t for k, t in raw.items()})
        meta = {k: (tuple(t.shape), t.dtype) for k, t in loaded.items()}
        where = {k: (files.get(k, folder), k) for k in loaded}

    target = module.state_dict()
    want = set(target) if expected is None else set(expected)
    missing = want - set(meta)
    unexpected = set(meta) - want
    if missing:
        raise MovaInputError(f"{component}: checkpoint lacks {len(missing)} tensors "
                             f"({_first(missing)}) in {folder}: config.json and the weights "
                             "disagree, or the files are from another model; use the matching "
                             "MOVA checkpoint")
    if unexpected:
        raise MovaInputError(f"{component}: checkpoint has {len(unexpected)} unexpected tensors "
                             f"({_first(unexpected)}) in {folder}: config.json and the weights "
                             "disagree; use the config.json that came with these weights")
    for k in sorted(want):
        shape, dt = meta[k]
        if k in target and shape != tuple(target[k].shape):
            raise MovaInputError(f"{component}: tensor {k} has shape {shape} in {where[k][0]} but "
                                 f"config.json implies {tuple(target[k].shape)}; use the "
                                 "config.json that came with these weights")
        if dt not in FLOAT_DTYPES:
            raise MovaInputError(f"{component}: tensor {k} in {where[k][0]} has dtype {dt}, "
                                 "expected bf16/fp16/fp32; the file is not a MOVA weight file")

    deferred = {k for k in want if defer is not None and defer(k)}
    read = want - deferred
    if loaded is not None:
        state = {k: loaded[k].to(device=device, dtype=dtype) for k in read}
    else:
        # Read under the checkpoint's own names, cast on the way, store under ours.
        by_name = _read_all({where[k][1]: where[k][0] for k in read}, component,
                            lambda t: t.to(device=device, dtype=dtype))
        state = {k: by_name[where[k][1]] for k in read}
    module.load_state_dict(state, strict=False, assign=True)
    del state
    if finalize is not None:
        finalize(module)
    leftover = [n for n, p in list(module.named_parameters()) + list(module.named_buffers())
                if p.is_meta and n not in deferred]
    if leftover:
        raise MovaInputError(f"{component}: tensors {_first(leftover)} were not filled by the "
                             "checkpoint; this build of mova-rt does not match the checkpoint "
                             "layout")
    return module.eval().requires_grad_(False)
