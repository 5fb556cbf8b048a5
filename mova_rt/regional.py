"""Regional compilation (`--compile`): torch.compile on every DiT block and bridge conditioner, one
graph per layer kind reused by every layer of that kind, with the Inductor settings of an engine
build (mova_rt/engine.py inductor_options). The just-in-time twin of an inductor engine: it pays
tracing and compilation at the first steps instead of at build time.

The blocks must run ops torch can trace: the `sdpa` or `reference` kernel sets (Inductor fuses
the norms, RoPE and modulation itself), so `--compile` with `auto` compiles the `sdpa` set
(`kernels_for`)."""

from __future__ import annotations

import torch

from .errors import MovaInputError

TRACEABLE = ("sdpa", "reference")


def kernels_for(kernels: str | None) -> str:
    """The kernel set that --compile compiles for a requested one."""
    kernels = kernels or "auto"
    if kernels == "auto":
        return "sdpa"
    if kernels not in TRACEABLE:
        raise MovaInputError(f"--compile traces the blocks' PyTorch ops; --kernels {kernels} "
                             "launches its kernels outside them: use --kernels auto, sdpa or "
                             "reference with --compile")
    return kernels


def compile_layers(video, audio, bridge, device: torch.device, autotune: bool = False,
                   video_2=None) -> None:
    """torch.compile every block of the towers and every bridge conditioner, in place.
    autotune: Inductor's max-autotune on CUDA (GEMM templates against cuBLAS; minutes at 360p)."""
    from .engine import inductor_options
    options = inductor_options(torch.device(device), autotune=autotune)
    layers = [*video.blocks, *audio.blocks, *bridge.audio_to_video_conditioners.values(),
              *bridge.video_to_audio_conditioners.values()]
    if video_2 is not None:
        layers += list(video_2.blocks)
    for layer in layers:
        layer.compile(dynamic=False, options=options)
