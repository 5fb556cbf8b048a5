"""Named runtime configurations that `mova-rt bench --configs` runs side by side.

A configuration turns the shared weights (one set per run, built once) into a runner: modules that
share those weight tensors (no copy) but carry the configuration's kernels, and the step to run.
Later features register theirs here (`@register`), so each is measured beside `reference`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn as nn

from mova_rt.cache import StepCache
from mova_rt.errors import MovaInputError
from mova_rt.models.audio_dit import AudioDiT
from mova_rt.models.bridge import Bridge
from mova_rt.models.dual_tower import dual_tower_forward
from mova_rt.models.video_dit import VideoDiT
from mova_rt.ops import resolve
from mova_rt.sampler import Guidance, GuidedStep
from mova_rt.scheduler import FlowMatchScheduler


@dataclass
class Runner:
    """What a configuration runs: towers (for the per-tower timing hooks) and one guided step."""
    video_dit: nn.Module
    audio_dit: nn.Module
    bridge: nn.Module
    step: GuidedStep

    def towers(self) -> dict:
        return {"video_blocks": list(self.video_dit.blocks),
                "audio_blocks": list(self.audio_dit.blocks),
                "bridge": [self.bridge]}


@dataclass(frozen=True)
class RuntimeConfig:
    name: str
    description: str
    prepare: Callable   # (shared: dict of weight modules, cfg, scheduler, cfg_scale, fps) -> Runner
    host_weights: bool = False   # wants the shared weights in host memory (offload)


CONFIGS: dict[str, RuntimeConfig] = {}


def register(name: str, description: str, host_weights: bool = False):
    def deco(fn):
        CONFIGS[name] = RuntimeConfig(name, description, fn, host_weights)
        return fn
    return deco


def share_weights(module_cls, module_cfg, ops, source: nn.Module) -> nn.Module:
    """A new module of the same architecture with `ops`, whose parameters are `source`'s tensors."""
    with torch.device("meta"):
        module = module_cls(module_cfg, ops)
    module.load_state_dict(source.state_dict(), strict=True, assign=True)
    return module.eval()


def eager_runner(kernels: str, cfg_batch: bool = False, cache: bool = False):
    def prepare(shared, cfg, scheduler: FlowMatchScheduler, cfg_scale: float, fps: float):
        ops = resolve(kernels)
        video = share_weights(VideoDiT, cfg.video_dit, ops, shared["video_dit"])
        audio = share_weights(AudioDiT, cfg.audio_dit, ops, shared["audio_dit"])
        bridge = share_weights(Bridge, cfg.bridge, ops, shared["dual_tower_bridge"])

        def forward(dit, video_in, audio_in, text, t, video_fps, **kw):
            return dual_tower_forward(dit, audio, bridge, video_in, audio_in, text, t, video_fps,
                                      **kw)
        guidance = Guidance(cfg_scale, batch=cfg_batch)
        step_cache = StepCache.every_other(len(scheduler.timesteps)) if cache else None
        return Runner(video, audio, bridge, GuidedStep(forward, scheduler, guidance, fps, audio,
                                                       bridge, step_cache))
    return prepare


register("reference", "eager PyTorch, bf16, SDPA attention, float64 video RoPE (as the reference "
         "code), sequential CFG")(eager_runner("reference"))
register("sdpa", "as reference, with the video RoPE in float32")(eager_runner("sdpa"))
register("cfg-batch", "as reference, with the two guidance passes as one batch")(
    eager_runner("reference", cfg_batch=True))
register("cache", "as cfg-batch, with step caching on every other step (--cache schedule): "
         "compare mean step times")(eager_runner("reference", cfg_batch=True, cache=True))
def offload_runner(depth: int):
    """Layerwise streaming (--offload group) over the shared weights: blocks in (pinned) host
    memory through depth + 1 GPU slots, everything else on the GPU. Run with only offload
    configurations (--configs offload-group) so the shared weights stay in host memory and the
    VRAM figures are this configuration's own; mixed with others it streams from a host copy."""
    def prepare(shared, cfg, scheduler, cfg_scale, fps):
        from mova_rt.offload import stream_modules, tower_blocks
        device = _compute_device()
        host = {name: m if next(m.parameters()).device.type == "cpu" else
                _host_copy(name, m, cfg) for name, m in shared.items()}
        runner = eager_runner("reference", cfg_batch=True)(host, cfg, scheduler, cfg_scale, fps)
        towers = (runner.video_dit, runner.audio_dit, runner.bridge)
        runner.streamer = stream_modules(
            towers, tower_blocks(runner.video_dit, runner.audio_dit, bridge=runner.bridge),
            device, depth)
        return runner
    return prepare


def _host_copy(name: str, module: nn.Module, cfg) -> nn.Module:
    """The same weights in host memory, copied tensor by tensor (no second GPU copy)."""
    from .bench_step import TOWERS, tower_config
    cls = dict(TOWERS)[name]
    with torch.device("meta"):
        host = cls(tower_config(cfg, name), resolve("reference"))
    host.load_state_dict({k: v.to("cpu") for k, v in module.state_dict().items()}, assign=True)
    return host.eval()


def _compute_device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


register("offload-group", "cfg-batch with --offload group: blocks streamed from pinned host "
         "memory, one block prefetched ahead (the low-VRAM mode)", host_weights=True)(
    offload_runner(depth=1))
register("triton", "eager modules, mova-rt's fused Triton kernels (norm + RoPE + attention, "
         "adaLN), sequential CFG")(eager_runner("triton"))
register("flash-attn", "as sdpa, with the flash-attn package's attention (when installed)")(
    eager_runner("flash-attn"))


def fp8_runner(kernels: str, gemm: str):
    """The fp8 path (mova_rt/quantize.py) over the shared weights: the towers' Linear layers
    quantized once here (prepare time), the bf16 ones left shared."""
    def prepare(shared, cfg, scheduler, cfg_scale, fps):
        from mova_rt import quantize
        runner = eager_runner(kernels)(shared, cfg, scheduler, cfg_scale, fps)
        quantize.apply({"video_dit": runner.video_dit, "audio_dit": runner.audio_dit,
                        "dual_tower_bridge": runner.bridge}, gemm=gemm)
        return runner
    return prepare


register("fp8", "triton kernels with fp8 weights (e4m3 per channel) and activations (per "
         "token, written by the norm kernels), mova-rt's Triton fp8 GEMMs with fused epilogues "
         "(bias; GELU -> fp8; gated residual) or cuBLASLt per the dispatch table")(
    fp8_runner("triton", "auto"))
register("fp8-int8attn", "as fp8, with 8-bit attention (int8 q/k per block, k smoothed, norm + "
         "RoPE fused in the quantizing prologue): the full 8-bit path")(
    fp8_runner("triton-int8attn", "auto"))
register("fp8-cublas", "as reference, with fp8 Linear layers through torch._scaled_mm "
         "(cuBLASLt)")(fp8_runner("reference", "scaled_mm"))


def parse_configs(text: str) -> list[RuntimeConfig]:
    names = [n.strip() for n in text.split(",") if n.strip()]
    if not names:
        raise MovaInputError("--configs is empty: name at least one, e.g. --configs reference")
    unknown = [n for n in names if n not in CONFIGS]
    if unknown:
        raise MovaInputError(f"unknown configuration(s) {', '.join(unknown)} in --configs: choose "
                             f"from {', '.join(CONFIGS)}")
    if len(set(names)) != len(names):
        raise MovaInputError(f"--configs names a configuration twice: {text}")
    return [CONFIGS[n] for n in names]
