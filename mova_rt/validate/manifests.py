"""What the manifests of engines (`mova-rt build`) and fp8 weight folders (`mova-rt quantize`)
must hold, checked when they are opened, before any artifact or weight is read.

A manifest is ours, written by a build: a field of the wrong type means a damaged or hand-edited
folder, refused in one line with the command that writes a good one. Every path a manifest names
must stay inside its folder (a manifest is a file anyone can hand over: `../../x` must not make
mova-rt read or hash files elsewhere).
"""

from __future__ import annotations

import os

from ..errors import MovaInputError
from .schema import (Any, Int, List, MapOf, Nullable, Obj, Real, Rule, Str, Tuple, check,
                     read_json, show)


class RelPath(Rule):
    """A relative path that stays inside the folder (no absolute path, no `..`)."""

    def __init__(self, plain_name: bool = False):
        self.plain_name = plain_name
        self.want = "a file name in the folder" if plain_name else "a path inside the folder"

    def ok(self, v) -> bool:
        if not isinstance(v, str) or not 0 < len(v) <= 512 or "\x00" in v or "\\" in v:
            return False
        if os.path.isabs(v) or ".." in v.split("/"):
            return False
        return "/" not in v if self.plain_name else True


TOWERS = ("video_dit", "video_dit_2", "audio_dit", "dual_tower_bridge")
DTYPES = ("bfloat16", "float16", "float32", "float64", "float8_e4m3fn", "float8_e5m2", "int8",
          "uint8", "int32", "int64", "bool")
DIM = Int(0, 1 << 40)
SHAPE = List(DIM, 0, 8)


class SizeOrName(Rule):
    """A size, or the name of a dynamic one (the batch: "B")."""
    want = "a size or the name of a dynamic size"
    _name = Str(pattern=r"[A-Za-z_]\w{0,15}")

    def ok(self, v) -> bool:
        return DIM.ok(v) or self._name.ok(v)


ACT_SHAPE = List(SizeOrName(), 0, 8)
NAMES = List(Str(max_len=512), 1, 1 << 20)
SHA256 = Str(pattern=r"[0-9a-f]{64}", want="a sha256 in hex")
# what install() reads from a unit's inputs, by unit kind
KIND_INPUTS = {"block": ("x", "rope_cos"), "bridge": ("video", "audio")}

UNIT = Obj({
    "towers": List(Str(TOWERS), 1, len(TOWERS)),
    "kind": Str(tuple(KIND_INPUTS)),
    "weights": List(Tuple(Str(max_len=512), SHAPE, Str(DTYPES),
                          want="a [name, shape, dtype] triple"), 0, 1 << 20),
    "inputs": MapOf(Tuple(ACT_SHAPE, Str(DTYPES), want="a [shape, dtype] pair")),
    "files": List(RelPath(), 1, 1 << 16),
    "build_s": Real(0.0),
    "inductor_options": MapOf(Any()),
    "autotune_choices": List(Any()),
    "input_names": NAMES, "output_names": NAMES,
    "layers": MapOf(RelPath()),
    "bound_weights": List(Int(0, 1 << 20), 0, 1 << 20),
}, required=("files", "towers", "weights", "inputs"),
   when=lambda u: ("bound_weights",) if "layers" in u else ())


def engine_rule(fmt, backends, precisions, kernels) -> Obj:
    return Obj({
        "format": Str((fmt,)), "created": Str(),
        "checkpoint": Obj({"path": Nullable(Str()), "digest": Str()}, required=("path", "digest")),
        "config": Obj({"digest": Str(), "model": MapOf(Any())}, required=("digest",)),
        "request": Obj({
            "height": Int(1, 1 << 20), "width": Int(1, 1 << 20), "num_frames": Int(1, 1 << 30),
            "fps": Real(0.0, 1000.0, lo_open=True), "precision": Str(precisions),
            "backend": Str(backends), "kernels": Str(kernels),
            "fp8_weights": Nullable(Str())},
            required=("height", "width", "num_frames", "fps", "precision", "backend", "kernels")),
        "shapes": Obj({"video_tokens": DIM, "audio_tokens": DIM, "text_tokens": DIM,
                       "latent_grid": SHAPE, "video_grid": SHAPE, "max_batch": Int(1, 64)}),
        "machine": Obj({"device": Str(), "name": Str(), "capability": Nullable(Str())},
                       required=("device", "name", "capability")),
        "versions": MapOf(Nullable(Str())),
        "units": MapOf(UNIT),
        "weights": Nullable(Obj({"dir": RelPath(), "format": Str(), "scheme": Str()},
                                required=("dir",))),
        "artifacts": MapOf(Obj({"bytes": Int(0, 1 << 50), "sha256": SHA256},
                               required=("bytes", "sha256")), key=RelPath()),
        "build_s": Real(0.0),
    }, required=("format", "checkpoint", "config", "shapes", "machine", "versions", "units",
                 "artifacts", "request"), want="a mapping (an engine manifest)")


def check_engine_manifest(manifest, path: str, manifest_name: str) -> None:
    """The engine folder `path`'s manifest (already known to be a mapping of this format)."""
    from ..engine import BACKENDS, FORMAT, KERNELS, PRECISIONS
    where = f"--engine {path}: {manifest_name}"
    fix = "the engine is damaged or incomplete; build the engine again with `mova-rt build`"
    check(manifest, engine_rule(FORMAT, BACKENDS, PRECISIONS, KERNELS), where, fix)
    request = manifest["request"]
    for name, unit in manifest["units"].items():
        for needed in ("input_names", "output_names") if request["backend"] == "tensorrt" else ():
            if needed not in unit:
                raise MovaInputError(f"{where} lacks '{needed}' in 'units.{name}': {fix}")
        for needed in KIND_INPUTS.get(unit.get("kind"), ()):
            entry = unit["inputs"].get(needed)
            if entry is None:
                raise MovaInputError(f"{where} lacks '{needed}' in 'units.{name}.inputs': {fix}")
            if len(entry[0]) < 2 or not isinstance(entry[0][1], int):
                raise MovaInputError(f"{where}: field 'units.{name}.inputs.{needed}' is "
                                     f"{show(entry[0])}, expected [batch, tokens, ...]: {fix}")


FP8_UNIT = Obj({
    "file": RelPath(plain_name=True),
    "layers": MapOf(List(Int(1, 1 << 20), 2, 2)),
    "activations": Str(("static-tensor", "dynamic-token")),
}, required=("file", "layers"))

def fp8_rule() -> Obj:
    from ..fp8.quantize import FORMAT, SCHEME
    return Obj({"format": Str((FORMAT,)), "scheme": Str((SCHEME,)), "source": Str(),
                "source_digest": Str(), "components": MapOf(FP8_UNIT)},
               required=("format", "scheme", "source_digest", "components"),
               want="a mapping (an fp8 weights manifest)")


def read_fp8_manifest(path: str, redo: str) -> dict:
    """The manifest of the fp8 weights folder `path`, read without blocking on a special file;
    its fields are checked by check_fp8_manifest once the format is known to be ours."""
    mpath = os.path.join(path, "manifest.json")
    return read_json(mpath, "fp8 weights manifest", f"write it again with `{redo}`",
                     missing=f"--fp8_weights {path} has no manifest.json: point it at a folder "
                             f"written by `{redo}`")


def check_fp8_manifest(manifest, path: str, redo: str) -> None:
    """Every field's type; a format or scheme of another version is named as such first."""
    from ..fp8.quantize import FORMAT, SCHEME
    if isinstance(manifest, dict):
        fmt, scheme = manifest.get("format"), manifest.get("scheme")
        if isinstance(fmt, str) and isinstance(scheme, str) and (fmt, scheme) != (FORMAT, SCHEME):
            raise MovaInputError(f"--fp8_weights {path}: manifest.json fields 'format' / "
                                 f"'scheme' are {fmt!r} / {scheme!r}, this mova-rt reads "
                                 f"{FORMAT} / {SCHEME}: write it again with `{redo}`")
    check(manifest, fp8_rule(), f"--fp8_weights {path}: manifest.json",
          f"the folder is damaged; write it again with `{redo}`")
