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
    tower_timing: bool = True    # per-tower hooks (not on compiled layers: they would be traced)


CONFIGS: dict[str, RuntimeConfig] = {}


def register(name: str, description: str, host_weights: bool = False, tower_timing: bool = True):
    def deco(fn):
        CONFIGS[name] = RuntimeConfig(name, description, fn, host_weights, tower_timing)
        return fn
    return deco


def share_weights(module_cls, module_cfg, ops, source: nn.Module) -> nn.Module:
    """A new module of the same architecture with `ops`, whose parameters are `source`'s tensors."""
    with torch.device("meta"):
        module = module_cls(module_cfg, ops)
    module.load_state_dict(source.state_dict(), strict=True, assign=True)
    # assign=True keeps the new module's requires_grad (True): inference weights never need it
    return module.eval().requires_grad_(False)


def fuse_shared(modules: dict, shared: dict) -> None:
    """mova_rt/fuse.py on a runner's modules, whose weights are the shared modules' tensors: the
    shared modules then take the fused views too, so the separate q/k/v tensors are freed (one
    copy of the weights, as in the pipeline)."""
    from mova_rt.fuse import fuse_projections
    fuse_projections(*modules.values())
    for name, module in modules.items():
        params = dict(module.named_parameters())
        source = shared[name]
        for key, p in list(source.named_parameters()):
            if params[key] is not p and params[key].data_ptr() != p.data_ptr():
                parent, _, leaf = key.rpartition(".")
                setattr(source.get_submodule(parent), leaf, params[key])


def eager_runner(kernels: str, cfg_batch: bool = False, cache: bool = False,
                 fuse: bool = True):
    """fuse: apply auto's fused projections where it chose them (the pipeline's rule: not for
    the fp8 and offload configurations)."""
    def prepare(shared, cfg, scheduler: FlowMatchScheduler, cfg_scale: float, fps: float):
        ops = resolve(kernels, device=_compute_device())
        video = share_weights(VideoDiT, cfg.video_dit, ops, shared["video_dit"])
        audio = share_weights(AudioDiT, cfg.audio_dit, ops, shared["audio_dit"])
        bridge = share_weights(Bridge, cfg.bridge, ops, shared["dual_tower_bridge"])
        if fuse and ops.choices.get("qkv") == "fused":     # auto, where measured faster
            fuse_shared({"video_dit": video, "audio_dit": audio, "dual_tower_bridge": bridge},
                        shared)

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
register("auto", "what generate runs by default: --kernels auto (per op the fastest measured on "
         "this GPU within the reference's bf16 fidelity), guidance passes batched")(
    eager_runner("auto", cfg_batch=True))
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
        runner = eager_runner("auto", cfg_batch=True, fuse=False)(host, cfg, scheduler,
                                                                  cfg_scale, fps)
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
    return host.eval().requires_grad_(False)


def _compute_device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


register("offload-group", "auto's kernels, guidance batched, with --offload group: blocks "
         "streamed from pinned host memory, one block prefetched ahead (the low-VRAM mode); "
         "compare with auto-separate", host_weights=True)(
    offload_runner(depth=1))
register("auto-separate", "auto without fused projections: the resident twin of offload-group "
         "and of the fp8 configurations")(eager_runner("auto", cfg_batch=True, fuse=False))
register("triton", "mova-rt's Triton kernels (q/k norm + RoPE in one pass, attention, adaLN and "
         "residual rows), guidance batched")(eager_runner("triton", cfg_batch=True))
register("flash-attn", "as sdpa, with the flash-attn package's attention (when installed)")(
    eager_runner("flash-attn"))


def fp8_runner(kernels: str, gemm: str):
    """The fp8 path (mova_rt/fp8/) over the shared weights, guidance batched: the towers' Linear
    layers quantized here (prepare time; each config in its own process then drops the bf16
    originals, run_steps `release`), with the activations quantized by their producers where the
    kernel set's norms are the Triton ones."""
    def prepare(shared, cfg, scheduler, cfg_scale, fps):
        from mova_rt import fp8
        runner = eager_runner(kernels, cfg_batch=True, fuse=False)(shared, cfg, scheduler,
                                                                   cfg_scale, fps)
        producers = runner.video_dit.blocks[0].ops.choices["norm_modulate"] == "triton"
        fp8.apply({"video_dit": runner.video_dit, "audio_dit": runner.audio_dit,
                   "dual_tower_bridge": runner.bridge}, gemm=gemm, device=_compute_device(),
                  producers=producers)
        return runner
    return prepare


register("fp8", "what generate --precision fp8 runs by default: auto's kernels, e4m3 weights "
         "(per channel) and activations (per token, quantized by the adaLN / norm3 kernels where "
         "auto runs them) through torch._scaled_mm where the dispatch table measured it faster "
         "than bf16, guidance batched")(fp8_runner("auto", "auto"))
register("fp8-int8attn", "as fp8 with the triton kernels and 8-bit attention (int8 q/k per "
         "block, k smoothed, norm + RoPE fused in the quantizing prologue)")(
    fp8_runner("triton-int8attn", "auto"))
register("fp8-attn8", "as fp8, with mova-rt's 8-bit attention (e4m3 q, k, v and probabilities, "
         "both products on fp8 tensor cores): the full 8-bit path")(fp8_runner("fp8attn", "auto"))
register("fp8-cudnnattn", "as fp8, with cuDNN's fp8 attention (nvidia-cudnn-frontend, when "
         "installed)")(fp8_runner("cudnn-fp8attn", "auto"))
register("fp8-cublas", "reference kernels with every quantizable Linear layer in e4m3 through "
         "torch._scaled_mm (cuBLASLt)")(fp8_runner("reference", "scaled_mm"))


def parse_configs(text: str, extra: dict | None = None) -> list[RuntimeConfig]:
    """extra: configurations of this run only (`engine`, from --engine)."""
    known = dict(CONFIGS, **(extra or {}))
    names = [n.strip() for n in text.split(",") if n.strip()]
    if not names:
        raise MovaInputError("--configs is empty: name at least one, e.g. --configs reference")
    unknown = [n for n in names if n not in known]
    if unknown:
        hint = " (engine needs --engine DIR)" if "engine" in unknown else ""
        raise MovaInputError(f"unknown configuration(s) {', '.join(unknown)} in --configs: choose "
                             f"from {', '.join(known)}{hint}")
    if len(set(names)) != len(names):
        raise MovaInputError(f"--configs names a configuration twice: {text}")
    return [known[n] for n in names]


# ---------------------------------------------------------------------------------------------
# Compiled layers: Inductor just in time, and ahead-of-time engines (mova_rt/engine.py)
# ---------------------------------------------------------------------------------------------
def _compiled(shared, cfg, scheduler, cfg_scale, fps):
    from mova_rt.regional import compile_layers, kernels_for
    runner = eager_runner(kernels_for("auto"), cfg_batch=True)(shared, cfg, scheduler, cfg_scale,
                                                               fps)
    compile_layers(runner.video_dit, runner.audio_dit, runner.bridge, _compute_device())
    return runner


register("compile", "generate --compile: every block and bridge layer under torch.compile "
         "(regional, Inductor's default mode; compiled at the first steps), guidance batched",
         tower_timing=False)(_compiled)


def _inductor_jit(shared, cfg, scheduler, cfg_scale, fps):
    from mova_rt.regional import compile_layers
    runner = eager_runner("reference", cfg_batch=True)(shared, cfg, scheduler, cfg_scale, fps)
    compile_layers(runner.video_dit, runner.audio_dit, runner.bridge, _compute_device(),
                   autotune=True)
    return runner


register("inductor-jit", "cfg-batch with every block and bridge layer under torch.compile "
         "(Inductor, autotuned on CUDA): compiled at the first steps, the JIT twin of an "
         "engine", tower_timing=False)(_inductor_jit)


def engine_config(path: str, shapes) -> RuntimeConfig:
    """The configuration `engine` of `mova-rt bench --engine DIR`: cfg-batch whose blocks and
    bridge layers run the engine's compiled units over the shared weights (fp8 engines: the
    shared weights quantized as the engine's were). The engine must fit the bench's clip size
    and this machine; its checkpoint is not checked (units take the weights as inputs)."""
    from mova_rt.engine import open_engine
    engine = open_engine(path)

    def prepare(shared, cfg, scheduler, cfg_scale, fps):
        from types import SimpleNamespace
        device = _compute_device()
        engine.check_machine(device)
        engine.check_request(shapes.height, shapes.width, shapes.num_frames, fps, 2)
        runner = eager_runner(engine.kernels, cfg_batch=True)(shared, cfg, scheduler, cfg_scale,
                                                              fps)
        if engine.precision == "fp8":
            from mova_rt import fp8
            fp8.apply({"video_dit": runner.video_dit, "audio_dit": runner.audio_dit,
                            "dual_tower_bridge": runner.bridge}, gemm="scaled_mm")
        engine.install(SimpleNamespace(video_dit=runner.video_dit, video_dit_2=None,
                                       audio_dit=runner.audio_dit, bridge=runner.bridge,
                                       device=device))
        return runner
    r = engine.request
    return RuntimeConfig("engine", f"cfg-batch on the {r['backend']} {r['precision']} engine "
                                   f"{path} (units compiled ahead of time)", prepare)
