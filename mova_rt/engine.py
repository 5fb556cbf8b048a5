"""Ahead-of-time engines: `mova-rt build` writes one, `mova-rt generate --engine` runs it.

What is compiled. Nearly all of a denoising step is the repeated layers: the video blocks (40 per
expert), the audio blocks (30) and the bridge's interaction layers (up to 30). Every layer of one
kind has the same code and shapes, so an engine holds one compiled *unit* per kind, whose weights
are inputs rather than constants: `video_block` (shared by both experts when their configs agree),
`audio_block`, `bridge_layer` (both conditioners of one interaction layer). Each block then calls its
unit with its own weight tensors. A unit is small to build (one layer, not 40), the engine does not
copy the checkpoint's 64 GB of bf16 weights, a LoRA merged at load time still applies, and
`--offload` keeps streaming the same tensors. What stays eager per step is tiny (patchify, the
heads, the guidance arithmetic) and the per-request constants (time embeddings, text K/V, RoPE
tables) are computed once, as without an engine.

Shapes: tokens are static (the engine is built for a height, width, frame count and fps); the
batch is dynamic from 1 to MAX_BATCH (guidance passes batched: 1, 2, or 3 with Dual CFG).

Backends:
- inductor: each unit through torch.export and AOTInductor (`aoti_compile_and_package`), a .pt2
  package with the compiled kernels (on CUDA: Inductor's Triton kernels, already autotuned, and
  cuBLAS/cuBLASLt calls), loaded with `aoti_load_package`: no tracing, no compilation, no
  autotuning at start. The GEMM choices autotuning made are written to the manifest.
- tensorrt: each unit exported to ONNX (`torch.onnx.export(dynamo=True)`, weights as inputs,
  RoPE tables in float32: TensorRT has no float64) and, where the `tensorrt` package is
  installed, built into a serialized TensorRT engine (.plan) with an optimization profile over
  the batch; `TrtUnit` runs it on the current CUDA stream. fp8: the fp8 Linear layers export as
  QuantizeLinear/DequantizeLinear (Fp8Linear.onnx_qdq), whose scales TensorRT takes only as
  build-time constants: so the activation scales must be calibrated (static), and each layer
  gets its own plan, built from the unit's graph with that layer's weights bound as constants
  (bind_weights); the plans hold the weights and share one activation buffer.

Precision: bf16, or fp8 (mova_rt/fp8/: e4m3 weights with per-channel scales, activations per
token or with calibrated static scales, torch._scaled_mm GEMMs, whose quantization Inductor fuses
into the producing kernels); the fp8 weights are quantized once at build time (or taken from
`mova-rt quantize`, --fp8_weights) and stored in the engine (`weights/`).

The manifest (manifest.json) names everything an engine depends on: the checkpoint (digest), the
model config, the request (shapes and token counts, precision, kernels, backend), the machine (GPU
name and compute capability) and the library versions, every artifact with its size and sha256.
`open_engine` + `Engine.check_*` refuse a mismatch with the build command that fixes it; nothing
falls back silently to another precision or backend.
"""

from __future__ import annotations

import dataclasses
import datetime
import hashlib
import json
import os
import platform
import time
import warnings

import torch
import torch.nn as nn

from . import __version__
from .config import asdict_public, load_config
from .errors import MovaInputError
from .files import new_folder

FORMAT = "mova-rt-engine/1"
MANIFEST = "manifest.json"
BACKENDS = ("inductor", "tensorrt")
PRECISIONS = ("bf16", "fp8")
# Kernel sets whose ops torch.export can trace (the others launch Triton or flash-attn kernels
# directly); inside an engine Inductor generates the fused kernels itself. `auto` (the default of
# build) compiles `sdpa`: RoPE in float32, the rest fused by Inductor (mova_rt/regional.py).
KERNELS = ("reference", "sdpa")
MAX_BATCH = 3
BLOCK_INPUTS = ("x", "text_k", "text_v", "t_mod", "rope_cos", "rope_sin")
BRIDGE_INPUTS = ("video", "audio", "video_cos", "video_sin", "audio_cos", "audio_sin")


# ---------------------------------------------------------------------------------------------
# 1. Units: one layer's forward with its weights as inputs
# ---------------------------------------------------------------------------------------------
class Tables:
    """A RoPE description whose tables are given (what a unit receives instead of the object)."""

    def __init__(self, cos: torch.Tensor, sin: torch.Tensor):
        self.cos, self.sin = cos, sin

    def tables(self) -> tuple:
        return self.cos, self.sin


class BridgeLayer(nn.Module):
    """The two conditioners of one interaction layer (Bridge.forward's body, as a module)."""

    def __init__(self, a2v: nn.Module, v2a: nn.Module):
        super().__init__()
        self.a2v, self.v2a = a2v, v2a

    def forward(self, video, audio, video_rope, audio_rope):
        from .models.bridge import interact
        return interact(self.a2v, self.v2a, video, audio, video_rope, audio_rope)


class Functional(nn.Module):
    """template's forward as a function of (weights list, activations...): the weights are
    swapped in by torch.func.functional_call, so the exported graph has no constants and one
    compiled unit serves every layer of the template's shape. The template is not a submodule:
    its own tensors never enter the export."""

    def __init__(self, template: nn.Module, kind: str):
        super().__init__()
        object.__setattr__(self, "_template", template)
        self.kind = kind
        self.names = [n for n, _ in template.named_parameters()]

    def forward(self, weights: list, acts: list):
        if self.kind == "block":
            x, k, v, t_mod, cos, sin = acts
            args = (x, (k, v), t_mod, Tables(cos, sin))
        else:
            video, audio = acts[:2]
            ropes = (Tables(*acts[2:4]), Tables(*acts[4:6])) if len(acts) == 6 else (None, None)
            args = (video, audio) + ropes
        return torch.func.functional_call(self._template, dict(zip(self.names, weights)), args)


def weight_signature(module: nn.Module) -> list:
    """[[name, shape, dtype]] of a layer's parameters, in the order a unit takes them."""
    return [[n, list(p.shape), str(p.dtype).replace("torch.", "")]
            for n, p in module.named_parameters()]


@dataclasses.dataclass
class UnitSpec:
    name: str
    kind: str                 # block | bridge
    template: nn.Module       # the first layer of its kind (its weights are the example inputs)
    towers: list              # the components whose layers call it
    inputs: dict              # activation name -> (shape with "B" for the batch, dtype)


def unit_specs(pipe, shapes, rope_dtype: torch.dtype = torch.float64) -> list:
    """The units of a pipeline for a clip (benchmarks.flops.Shapes). rope_dtype: the type of the
    video/audio blocks' RoPE tables (float64 as computed; float32 for TensorRT, which has no
    float64, with a kernel set that rotates in float32 anyway)."""
    video_2 = pipe.video_dit_2
    same = (pipe.cfg.video_dit == pipe.cfg.video_dit_2 and video_2 is not None and
            weight_signature(video_2.blocks[0]) == weight_signature(pipe.video_dit.blocks[0]))
    specs = []
    for name, dit, towers, tokens in (
            ("video_block", pipe.video_dit, ["video_dit"] + (["video_dit_2"] if same else []),
             shapes.L_v),
            ("video_2_block", None if same else video_2, ["video_dit_2"], shapes.L_v),
            ("audio_block", pipe.audio_dit, ["audio_dit"], shapes.L_a)):
        if dit is None:
            continue
        d, heads = dit.dim, dit.cfg.num_heads
        dtype = dit.patch_embedding.weight.dtype
        hd = d // heads
        specs.append(UnitSpec(name, "block", dit.blocks[0], towers, {
            "x": (["B", tokens, d], dtype), "text_k": (["B", shapes.L_t, heads, hd], dtype),
            "text_v": (["B", shapes.L_t, heads, hd], dtype), "t_mod": (["B", 6, d], dtype),
            "rope_cos": ([tokens, hd // 2], rope_dtype),
            "rope_sin": ([tokens, hd // 2], rope_dtype)}))
    bridge = pipe.bridge
    if bridge.layers:
        first = str(bridge.layers[0])
        layer = BridgeLayer(bridge.audio_to_video_conditioners[first],
                            bridge.video_to_audio_conditioners[first])
        bc = bridge.cfg
        dtype = pipe.video_dit.patch_embedding.weight.dtype
        inputs = {"video": (["B", shapes.L_v, bc.visual_hidden_dim], dtype),
                  "audio": (["B", shapes.L_a, bc.audio_hidden_dim], dtype)}
        if bc.apply_cross_rope:
            for side, tokens in (("video", shapes.L_v), ("audio", shapes.L_a)):
                inputs[f"{side}_cos"] = ([tokens, bc.head_dim], dtype)
                inputs[f"{side}_sin"] = ([tokens, bc.head_dim], dtype)
        specs.append(UnitSpec("bridge_layer", "bridge", layer, ["dual_tower_bridge"], inputs))
    return specs


def example_inputs(spec: UnitSpec, device, batch: int = 2, seed: int = 0) -> tuple:
    """(weights list, activations): the template's weights and random activations."""
    gen = torch.Generator(device="cpu").manual_seed(seed)
    acts = []
    for shape, dtype in spec.inputs.values():
        dims = [batch if d == "B" else d for d in shape]
        acts.append(torch.randn(dims, generator=gen, dtype=torch.float32).to(device, dtype))
    weights = [p.detach() for _, p in spec.template.named_parameters()]
    return weights, acts


def _dynamic_shapes(spec: UnitSpec, n_weights: int) -> tuple:
    batch = torch.export.Dim("batch", min=1, max=MAX_BATCH)
    acts = [{0: batch} if shape[0] == "B" else None for shape, _ in spec.inputs.values()]
    return ([None] * n_weights, acts)


# ---------------------------------------------------------------------------------------------
# 2. Backends: build a unit, load it
# ---------------------------------------------------------------------------------------------
class _AutotuneLog:
    """The choices Inductor's autotuning makes while a unit compiles (GEMM templates vs cuBLAS
    and their timings), via its feedback hook."""

    def __init__(self):
        self.records: list | None = None
        self.installed = False

    def __call__(self, timings, name, input_nodes, choices, profiled_time_fn, *rest):
        if self.records is None or not timings:
            return
        ranked = sorted(timings.items(), key=lambda kv: kv[1])
        try:
            shapes = [list(map(int, n.get_size())) for n in input_nodes]
        except Exception:      # symbolic sizes (the batch): recorded as text
            shapes = [[str(s) for s in n.get_size()] for n in input_nodes]
        self.records.append({"op": name, "input_shapes": shapes,
                             "chosen": _choice_name(ranked[0][0]), "ms": float(ranked[0][1]),
                             "candidates": len(ranked),
                             "runner_up": _choice_name(ranked[1][0]) if len(ranked) > 1 else None})

    def start(self):
        if not self.installed:
            from torch._inductor.select_algorithm import add_feedback_saver
            add_feedback_saver(self)
            self.installed = True
        self.records = []

    def stop(self) -> list:
        out, self.records = self.records or [], None
        return out


def _choice_name(choice) -> str:
    for attr in ("description", "name"):
        text = getattr(choice, attr, None)
        if text:
            return f"{getattr(choice, 'name', '')} {text}".strip() if attr == "description" \
                else str(text)
    return type(choice).__name__


AUTOTUNE_LOG = _AutotuneLog()


def inductor_options(device: torch.device, autotune: bool) -> dict:
    """Inductor settings of a build. emulate_precision_casts: a fused kernel rounds to bf16 where
    the eager ops would (the reference rounds after each op); without it Inductor keeps fp32
    between fused ops, which on the tiny model moves 72% of a block's outputs (0.7% relative)
    instead of 0.1% of them (0.02%). On CUDA with autotune, GEMMs are autotuned between cuBLAS
    and Inductor's Triton templates, and pointwise/reduction kernels by coordinate descent."""
    options = {"emulate_precision_casts": True}
    if device.type == "cuda" and autotune:
        options.update({"max_autotune": True, "max_autotune_gemm_backends": "ATEN,TRITON",
                        "coordinate_descent_tuning": True})
    return options


def build_inductor(spec: UnitSpec, path: str, device: torch.device, autotune: bool) -> dict:
    fn = Functional(spec.template, spec.kind)
    weights, acts = example_inputs(spec, device)
    with torch.no_grad():
        ep = torch.export.export(fn, (weights, acts),
                                 dynamic_shapes=_dynamic_shapes(spec, len(weights)))
    options = inductor_options(device, autotune)
    AUTOTUNE_LOG.start()
    try:
        with warnings.catch_warnings():   # torch's own deprecation notice about its pytree code
            warnings.filterwarnings("ignore", message=r".*treespec, LeafSpec", category=FutureWarning)
            torch._inductor.aoti_compile_and_package(ep, package_path=path,
                                                     inductor_configs=dict(options))  # adds keys
    finally:
        choices = AUTOTUNE_LOG.stop()
    return {"inductor_options": options, "autotune_choices": choices}


def export_onnx(spec: UnitSpec, path: str, device: torch.device) -> dict:
    """The unit as ONNX (weights as inputs w0..wN, then the activations by name; batch dynamic),
    written with its weights-free graph in one file."""
    fn = Functional(spec.template, spec.kind)
    weights, acts = example_inputs(spec, device)
    names = [f"w{i}" for i in range(len(weights))] + list(spec.inputs)
    with torch.no_grad():
        program = torch.onnx.export(fn, (weights, acts), dynamo=True, input_names=names,
                                    output_names=_output_names(spec), verbose=False,
                                    dynamic_shapes=_dynamic_shapes(spec, len(weights)))
    program.save(path)
    return {"input_names": names, "output_names": _output_names(spec)}


def _output_names(spec: UnitSpec) -> list:
    return ["out"] if spec.kind == "block" else ["video_out", "audio_out"]


def tensorrt_module():
    """The tensorrt package, or None when it is not installed (it cannot be on CPU machines)."""
    try:
        import tensorrt
    except ImportError:
        return None
    return tensorrt


def build_tensorrt_plan(onnx_path: str, plan_path: str, spec: UnitSpec,
                        opt_batch: int) -> dict:
    """A serialized TensorRT engine of an exported unit, strongly typed (the ONNX graph's bf16 /
    fp8 types are kept), with one optimization profile: batch 1..MAX_BATCH, best at opt_batch."""
    trt = tensorrt_module()
    logger = trt.Logger(trt.Logger.WARNING)
    builder = trt.Builder(logger)
    flags = 1 << int(trt.NetworkDefinitionCreationFlag.STRONGLY_TYPED)
    network = builder.create_network(flags)
    parser = trt.OnnxParser(network, logger)
    if not parser.parse_from_file(onnx_path):
        errors = "; ".join(str(parser.get_error(i)) for i in range(parser.num_errors))
        raise MovaInputError(f"TensorRT could not parse {onnx_path}: {errors[:300]}")
    config = builder.create_builder_config()
    profile = builder.create_optimization_profile()
    for i in range(network.num_inputs):
        tensor = network.get_input(i)
        shape = list(tensor.shape)
        if shape and shape[0] == -1:
            lo, opt, hi = ([b] + shape[1:] for b in (1, opt_batch, MAX_BATCH))
            profile.set_shape(tensor.name, lo, opt, hi)
    config.add_optimization_profile(profile)
    plan = builder.build_serialized_network(network, config)
    if plan is None:
        raise MovaInputError(f"TensorRT could not build {spec.name} (see its log above)")
    with open(plan_path, "wb") as fh:
        fh.write(plan)
    return {"tensorrt": trt.__version__, "opt_batch": opt_batch}


def unit_layers(pipe, towers: list, kind: str):
    """(key, module) of every layer that runs a unit: "<tower>.<i>" with the block, or
    "dual_tower_bridge.<i>" with the interaction layer (BridgeLayer) of bridge layer i."""
    if kind == "block":
        for tower in towers:
            for i, block in enumerate(getattr(pipe, tower).blocks):
                yield f"{tower}.{i}", block
        return
    bridge = pipe.bridge
    for i in bridge.layers:
        yield f"dual_tower_bridge.{i}", BridgeLayer(bridge.audio_to_video_conditioners[str(i)],
                                                    bridge.video_to_audio_conditioners[str(i)])


_ONNX_TYPES = {torch.float32: "FLOAT", torch.float16: "FLOAT16", torch.bfloat16: "BFLOAT16",
               torch.float64: "DOUBLE", torch.float8_e4m3fn: "FLOAT8E4M3FN"}


def bind_weights(onnx_path: str, module: nn.Module, out_path: str) -> list:
    """A copy of a unit's ONNX graph whose weight inputs w0..wN are `module`'s tensors, as
    initializers (constants): what TensorRT needs where a weight's scale must be known at build
    time (fp8 Q/DQ). Large graphs keep their weights in a side file (protobuf's 2 GB limit).
    Returns the indices of the weights bound (those the graph reads)."""
    import onnx
    model = onnx.load(onnx_path)
    graph = model.graph
    read = {name for node in graph.node for name in node.input}
    weights = {f"w{i}": p.detach() for i, (_, p) in enumerate(module.named_parameters())}
    # a weight the graph never reads (the text K/V projections: their output is an input) goes
    kept = [i for i in graph.input if i.name not in weights]
    weights = {name: t for name, t in weights.items() if name in read}
    for name, t in weights.items():
        proto = onnx.TensorProto()
        proto.name = name
        proto.data_type = getattr(onnx.TensorProto, _ONNX_TYPES[t.dtype])
        proto.dims.extend(t.shape)
        proto.raw_data = t.cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes()
        graph.initializer.append(proto)
    del graph.input[:]
    graph.input.extend(kept)
    big = sum(t.numel() * t.element_size() for t in weights.values()) > 2 ** 30
    onnx.save_model(model, out_path, save_as_external_data=big,
                    location=os.path.basename(out_path) + ".data" if big else None)
    return sorted(int(name[1:]) for name in weights)


def build_tensorrt_layers(pipe, spec: UnitSpec, tmp: str, onnx_rel: str, opt_batch: int,
                          log=print) -> dict:
    """fp8 TensorRT: one plan per layer of the unit, its weights and scales bound as constants
    (TensorRT's Q/DQ scales must be build-time constants, so one graph cannot serve layers with
    other scales). The per-layer ONNX copies are scratch, removed once their plan is built."""
    scratch = os.path.join(tmp, "scratch")
    os.makedirs(scratch, exist_ok=True)
    layers, files, info = {}, [], {}
    for key, layer in unit_layers(pipe, spec.towers, spec.kind):
        log(f"building the TensorRT engine of {key} ({spec.name}, weights bound)")
        bound = os.path.join(scratch, f"{key}.onnx")
        read = bind_weights(os.path.join(tmp, onnx_rel), layer, bound)
        plan_rel = f"units/{spec.name}/{key}.plan"
        os.makedirs(os.path.dirname(os.path.join(tmp, plan_rel)), exist_ok=True)
        info = build_tensorrt_plan(bound, os.path.join(tmp, plan_rel), spec, opt_batch)
        for f in os.listdir(scratch):
            os.remove(os.path.join(scratch, f))
        layers[key] = plan_rel
        files.append(plan_rel)
    os.rmdir(scratch)
    return dict(info, layers=layers, bound_weights=read, files=[onnx_rel] + files)


class TrtUnit:
    """Runs a .plan on the current CUDA stream with torch tensors: inputs bound by address, the
    outputs allocated per call at the shapes the engine reports for this batch. shared: the
    per-layer plans of one engine run one at a time on one stream, so their contexts share one
    activation buffer (TrtUnit.share) instead of holding one each."""

    def __init__(self, plan_path: str, input_names: list, output_names: list,
                 shared: bool = False):
        trt = tensorrt_module()
        self.trt = trt
        self.runtime = trt.Runtime(trt.Logger(trt.Logger.WARNING))
        with open(plan_path, "rb") as fh:
            self.engine = self.runtime.deserialize_cuda_engine(fh.read())
        if self.engine is None:
            raise MovaInputError(f"TensorRT could not load {plan_path}: rebuild the engine")
        self.context = (self.engine.create_execution_context(
            trt.ExecutionContextAllocationStrategy.USER_MANAGED) if shared
            else self.engine.create_execution_context())
        self.input_names, self.output_names = input_names, output_names

    def memory_size(self) -> int:
        return int(getattr(self.engine, "device_memory_size_v2", None)
                   or self.engine.device_memory_size)

    @staticmethod
    def share(units: list, device) -> torch.Tensor:
        """One activation buffer, the largest any of `units` needs, given to all their
        contexts. Returns it (the caller keeps it alive)."""
        size = max(u.memory_size() for u in units)
        buf = torch.empty(max(size, 1), dtype=torch.uint8, device=device)
        for u in units:
            if hasattr(u.context, "set_device_memory"):
                u.context.set_device_memory(buf.data_ptr(), size)
            else:
                u.context.device_memory = buf.data_ptr()
        return buf

    def __call__(self, weights: list, acts: list):
        ctx = self.context
        tensors = list(weights) + list(acts)
        for name, t in zip(self.input_names, tensors):
            t = t.contiguous()
            ctx.set_input_shape(name, tuple(t.shape))
            ctx.set_tensor_address(name, t.data_ptr())
        outs = []
        for name in self.output_names:
            shape = tuple(ctx.get_tensor_shape(name))
            dtype = _TORCH_OF_TRT[self.engine.get_tensor_dtype(name).name]
            out = torch.empty(shape, dtype=dtype, device=tensors[-1].device)
            ctx.set_tensor_address(name, out.data_ptr())
            outs.append(out)
        if not ctx.execute_async_v3(torch.cuda.current_stream().cuda_stream):
            raise RuntimeError("TensorRT execution failed")
        return outs[0] if len(outs) == 1 else tuple(outs)


_TORCH_OF_TRT = {"FLOAT": torch.float32, "HALF": torch.float16, "BF16": torch.bfloat16,
                 "FP8": torch.float8_e4m3fn, "INT32": torch.int32, "INT64": torch.int64}


# ---------------------------------------------------------------------------------------------
# 3. The manifest: what an engine depends on
# ---------------------------------------------------------------------------------------------
def machine(device: torch.device) -> dict:
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        return {"device": "cuda", "name": props.name,
                "capability": f"{props.major}.{props.minor}"}
    return {"device": device.type, "name": platform.machine(), "capability": None}


def versions(backend: str) -> dict:
    try:
        import triton
        triton_version = triton.__version__
    except ImportError:
        triton_version = None
    out = {"mova_rt": __version__, "torch": torch.__version__, "triton": triton_version,
           "cuda": torch.version.cuda, "tensorrt": None}
    if backend == "tensorrt":
        trt = tensorrt_module()
        out["tensorrt"] = trt.__version__ if trt is not None else None
    return out


def config_json(cfg):
    """The model config (nested dataclasses) as plain JSON values."""
    if dataclasses.is_dataclass(cfg):
        return {k: config_json(v) for k, v in asdict_public(cfg).items()}
    if isinstance(cfg, dict):
        return {str(k): config_json(v) for k, v in cfg.items()}
    if isinstance(cfg, (list, tuple)):
        return [config_json(v) for v in cfg]
    return cfg if isinstance(cfg, (str, int, float, bool, type(None))) else str(cfg)


def config_digest(cfg) -> str:
    text = json.dumps(config_json(cfg), sort_keys=True)
    return hashlib.sha256(text.encode()).hexdigest()


def _sha256(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 22), b""):
            h.update(chunk)
    return h.hexdigest()


def build_command(ckpt: str | None, request: dict, out: str = "build/engines/NAME",
                  preset: str | None = None) -> str:
    source = f"--ckpt_path {ckpt}" if ckpt else f"--preset {preset}"
    weights = f" --fp8_weights {request['fp8_weights']}" if request.get("fp8_weights") else ""
    default = "sdpa"                       # what the command's default, auto, compiles
    kernels = request.get("kernels") or default
    kernels = f" --kernels {kernels}" if kernels != default else ""
    return (f"mova-rt build {source} --height {request['height']} --width "
            f"{request['width']} --num_frames {request['num_frames']} --fps {request['fps']:g} "
            f"--precision {request['precision']}{weights} --backend {request['backend']}"
            f"{kernels} --out {out}")


# ---------------------------------------------------------------------------------------------
# 4. Build
# ---------------------------------------------------------------------------------------------
@dataclasses.dataclass
class BuildRequest:
    ckpt: str | None              # None: `preset` (random weights; an engine for the benchmark)
    height: int
    width: int
    num_frames: int
    fps: float = 24.0
    precision: str = "bf16"
    backend: str = "inductor"
    kernels: str = "reference"
    device: str | None = None
    autotune: bool = True
    opt_batch: int = 2        # TensorRT's profile optimum: CFG's two passes batched
    preset: str | None = None
    fp8_weights: str | None = None   # a `mova-rt quantize` folder (else quantized at build)

    def as_dict(self) -> dict:
        return {"height": self.height, "width": self.width, "num_frames": self.num_frames,
                "fps": float(self.fps), "precision": self.precision, "backend": self.backend,
                "kernels": self.kernels, "fp8_weights": self.fp8_weights and
                os.path.abspath(self.fp8_weights)}


def check_build_request(req: BuildRequest) -> torch.device:
    """Everything that can be refused before a weight is read."""
    from .config import check_sizes
    if req.backend not in BACKENDS:
        raise MovaInputError(f"--backend {req.backend} is not a backend: use "
                             f"{' or '.join(BACKENDS)}")
    if req.precision not in PRECISIONS:
        raise MovaInputError(f"--precision {req.precision} is not supported: use bf16 or fp8")
    if req.kernels not in KERNELS:
        raise MovaInputError(f"--kernels {req.kernels} cannot be compiled into an engine (its "
                             "kernels are launched outside PyTorch's graph): use --kernels "
                             f"{' or '.join(KERNELS)}; the engine's compiler generates fused "
                             "kernels itself")
    check_sizes(req.height, req.width, req.num_frames)
    if req.fps <= 0:
        raise MovaInputError(f"--fps {req.fps} must be positive")
    if not 1 <= req.opt_batch <= MAX_BATCH:
        raise MovaInputError(f"--opt_batch must be in 1..{MAX_BATCH}")
    name = req.device or ("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise MovaInputError(f"--device {name} is not a device: use cpu, cuda or cuda:N") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise MovaInputError(f"--device {name} requested but CUDA is not available: engines are "
                             "built on the kind of machine that runs them")
    if req.fp8_weights is not None and req.precision != "fp8":
        raise MovaInputError("--fp8_weights holds fp8 weights: pass --precision fp8 with it")
    if req.fp8_weights is not None and req.ckpt is None:
        raise MovaInputError("--fp8_weights belong to a checkpoint, --preset builds from random "
                             "weights: drop one of the two")
    if req.backend == "tensorrt" and req.kernels == "reference":
        raise MovaInputError("--backend tensorrt --kernels reference: the reference rotates RoPE "
                             "in float64, which TensorRT does not have: use --kernels sdpa "
                             "(RoPE in float32; the default with --backend tensorrt)")
    if req.backend == "tensorrt" and req.precision == "fp8":
        _check_static_scales(req)
    if req.backend == "tensorrt":
        if tensorrt_module() is None:
            raise MovaInputError("--backend tensorrt needs the tensorrt package (not installed "
                                 "here): install TensorRT on the CUDA machine that will run "
                                 "the engine, or use --backend inductor")
        if device.type != "cuda":
            raise MovaInputError("--backend tensorrt builds CUDA engines: run it on the GPU "
                                 "machine (--device cuda), or use --backend inductor")
    if req.precision == "fp8" and device.type == "cuda":
        cc = torch.cuda.get_device_capability(device)
        if cc < (8, 9):
            raise MovaInputError(f"--precision fp8 needs fp8 tensor cores (compute capability "
                                 f"8.9+, Ada/Hopper); this GPU is {cc[0]}.{cc[1]}: use bf16")
    return device


def _check_static_scales(req: BuildRequest) -> None:
    """TensorRT's fp8 is Q/DQ with build-time constant scales: the activations' scales must be
    calibrated (static, per tensor), which per-token quantization is not."""
    from . import fp8
    calibrate = ("mova-rt quantize --calibrate --ckpt_path CKPT --prompt \"...\" --height H "
                 "--width W --num_frames F --out FP8_DIR")
    if req.ckpt is None:
        raise MovaInputError("--backend tensorrt --precision fp8 needs calibrated activation "
                             "scales, which random --preset weights do not have: build it "
                             f"from a checkpoint with --fp8_weights written by `{calibrate}`")
    if req.fp8_weights is None:
        raise MovaInputError("--backend tensorrt --precision fp8 needs static (calibrated) "
                             "activation scales, TensorRT's fp8 takes no per-token scales: "
                             f"write them with `{calibrate}` and pass --fp8_weights FP8_DIR")
    if fp8.activations_of(req.fp8_weights) - {"static-tensor"}:
        raise MovaInputError(f"--fp8_weights {req.fp8_weights} quantizes activations per token "
                             "(no calibrated scales), TensorRT's fp8 needs static ones: write "
                             f"them with `{calibrate}`")


def build(req: BuildRequest, out: str, log=print) -> dict:
    """Writes the engine folder `out` (atomically: a complete folder or none). Returns the
    manifest."""
    from .benchmarks.flops import clip_shapes
    from .pipeline import MovaPipeline
    from . import fp8

    device = check_build_request(req)
    if req.ckpt is None:
        from .config import preset_config
        if req.preset is None:
            raise MovaInputError("build needs --ckpt_path (or --preset for a benchmark engine)")
        cfg = preset_config(req.preset)
    else:
        cfg = load_config(req.ckpt)
    shapes = clip_shapes(cfg, req.height, req.width, req.num_frames, req.fps)
    t_start = time.perf_counter()
    with new_folder(out, ".mova-engine-") as tmp:
        # the towers only: a unit's weights are inputs, so what is compiled does not depend on
        # their values (fp8: the quantized weights are stored here, once)
        if req.ckpt is None:
            log(f"random {req.preset} towers ({req.precision}): an engine for `mova-rt bench`")
            pipe = _preset_towers(cfg, device, req.precision, req.kernels)
        else:
            log(f"loading {req.ckpt} ({req.precision})")
            pipe = MovaPipeline.from_pretrained(req.ckpt, device=device, dtype="bf16",
                                                kernels=req.kernels, precision=req.precision,
                                                fp8_weights=req.fp8_weights, towers_only=True)
        weights = None
        if req.precision == "fp8" and req.ckpt is not None:
            log("writing the fp8 weights")
            fp8.save(pipe.fp8_weights, req.ckpt, os.path.join(tmp, "weights"))
            weights = {"dir": "weights", "format": fp8.FORMAT, "scheme": fp8.SCHEME}
        os.makedirs(os.path.join(tmp, "units"))
        units = {}
        rope_dtype = torch.float32 if req.backend == "tensorrt" else torch.float64
        for spec in unit_specs(pipe, shapes, rope_dtype):
            t0 = time.perf_counter()
            entry = {"towers": spec.towers, "kind": spec.kind,
                     "weights": weight_signature(spec.template),
                     "inputs": {k: [shape, str(dt).replace("torch.", "")]
                                for k, (shape, dt) in spec.inputs.items()}}
            if req.backend == "inductor":
                rel = f"units/{spec.name}.pt2"
                log(f"compiling {spec.name} (torch.export + AOTInductor)")
                entry.update(build_inductor(spec, os.path.join(tmp, rel), device, req.autotune))
                entry["files"] = [rel]
            else:
                onnx_rel = f"units/{spec.name}.onnx"
                log(f"exporting {spec.name} to ONNX")
                entry.update(export_onnx(spec, os.path.join(tmp, onnx_rel), device))
                entry["files"] = [onnx_rel]
                if req.precision == "bf16":
                    plan_rel = f"units/{spec.name}.plan"
                    log(f"building the TensorRT engine of {spec.name}")
                    entry.update(build_tensorrt_plan(os.path.join(tmp, onnx_rel),
                                                     os.path.join(tmp, plan_rel), spec,
                                                     req.opt_batch))
                    entry["files"].append(plan_rel)
                else:
                    entry.update(build_tensorrt_layers(pipe, spec, tmp, onnx_rel, req.opt_batch,
                                                       log))
            entry["build_s"] = time.perf_counter() - t0
            units[spec.name] = entry
        artifacts = {}
        for folder, _, files in os.walk(tmp):
            for f in sorted(files):
                full = os.path.join(folder, f)
                rel = os.path.relpath(full, tmp)
                artifacts[rel] = {"bytes": os.path.getsize(full), "sha256": _sha256(full)}
        manifest = {
            "format": FORMAT,
            "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "checkpoint": ({"path": os.path.abspath(req.ckpt),
                            "digest": fp8.source_digest(req.ckpt)} if req.ckpt else
                           {"path": None, "digest": f"preset:{req.preset}"}),
            "config": {"digest": config_digest(cfg), "model": config_json(cfg)},
            "request": req.as_dict(),
            "shapes": {"video_tokens": shapes.L_v, "audio_tokens": shapes.L_a,
                       "text_tokens": shapes.L_t, "latent_grid": list(shapes.latent_grid),
                       "video_grid": list(shapes.video_grid), "max_batch": MAX_BATCH},
            "machine": machine(device),
            "versions": versions(req.backend),
            "units": units,
            "weights": weights,
            "artifacts": artifacts,
            "build_s": time.perf_counter() - t_start,
        }
        with open(os.path.join(tmp, MANIFEST), "w", encoding="utf-8") as fh:
            json.dump(manifest, fh, indent=1)
            fh.write("\n")
    return manifest


def _preset_towers(cfg, device, precision: str, kernels: str):
    """A preset's towers with random bf16 weights (the benchmark's), as a pipeline-like object:
    enough to compile units, which take the weights as inputs. One expert is built: the
    presets' two experts share a config."""
    from types import SimpleNamespace
    from .benchmarks.bench_step import build_shared_weights
    from .benchmarks.configs import eager_runner
    from .scheduler import FlowMatchScheduler
    shared = build_shared_weights(cfg, device, None, seed=0)
    runner = eager_runner(kernels)(shared, cfg, FlowMatchScheduler(cfg.scheduler, 50), 5.0, 24.0)
    if precision == "fp8":
        from . import fp8
        fp8.apply({"video_dit": runner.video_dit, "audio_dit": runner.audio_dit,
                        "dual_tower_bridge": runner.bridge}, gemm="scaled_mm")
    return SimpleNamespace(cfg=cfg, video_dit=runner.video_dit, video_dit_2=runner.video_dit,
                           audio_dit=runner.audio_dit, bridge=runner.bridge, device=device)


# ---------------------------------------------------------------------------------------------
# 5. Open, check, install
# ---------------------------------------------------------------------------------------------
class Engine:
    def __init__(self, path: str, manifest: dict):
        self.path = path
        self.manifest = manifest
        self.request = manifest["request"]
        self.backend = self.request["backend"]
        self.precision = self.request["precision"]
        self.kernels = self.request["kernels"]
        self._passed: set = set()     # checks already passed (the CLI checks before loading,
                                      # from_pretrained again: the digest is read once)
        self._buffers: list = []      # TensorRT activation memory shared by per-layer plans

    def fix(self, ckpt: str | None = None, **changes) -> str:
        req = dict(self.request, **changes)
        digest = self.manifest["checkpoint"]["digest"]
        preset = digest[len("preset:"):] if digest.startswith("preset:") else None
        return build_command(ckpt or self.manifest["checkpoint"]["path"], req, preset=preset)

    @property
    def fp8_weights(self) -> str | None:
        w = self.manifest.get("weights")
        return os.path.join(self.path, w["dir"]) if w else None

    # -- checks --------------------------------------------------------------------------------
    def check_machine(self, device) -> None:
        """The device kind, GPU capability and library versions the artifacts were built with."""
        device = torch.device(device)
        if ("machine", str(device)) in self._passed:
            return
        built, here = self.manifest["machine"], machine(device)
        if built["device"] != here["device"]:
            what = built["device"] + (f" ({built['name']}, compute capability "
                                      f"{built['capability']})" if built["capability"] else "")
            raise MovaInputError(f"engine {self.path} was built for {what}, this run is on "
                                 f"{here['device']}: build one here with `{self.fix()}`")
        if built["capability"] != here["capability"]:
            raise MovaInputError(f"engine {self.path} was built for compute capability "
                                 f"{built['capability']} ({built['name']}), this GPU is "
                                 f"{here['capability']} ({here['name']}): build one on this "
                                 f"GPU with `{self.fix()}`")
        now = versions(self.backend)
        for lib in ("torch", "triton", "cuda", "tensorrt", "mova_rt"):
            if built["device"] == "cpu" and lib in ("triton", "cuda"):
                continue        # CPU artifacts are C++ built by Inductor: no Triton, no CUDA
            if self.backend != "tensorrt" and lib == "tensorrt":
                continue
            if self.manifest["versions"].get(lib) != now.get(lib):
                raise MovaInputError(
                    f"engine {self.path} was built with {lib} {self.manifest['versions'].get(lib)}"
                    f", this environment has {now.get(lib)}: rebuild it here with `{self.fix()}`")
        if built["name"] != here["name"]:
            warnings.warn(f"engine {self.path} was tuned on {built['name']}, this GPU is "
                          f"{here['name']} (same capability): it runs, maybe not at its best")
        self._passed.add(("machine", str(device)))

    def check_model(self, ckpt: str, precision: str | None, kernels: str | None,
                    lora: bool) -> None:
        from . import fp8
        key = ("model", os.path.abspath(ckpt), precision, kernels, lora)
        if key in self._passed:
            return
        built = self.manifest["checkpoint"]
        if built["path"] is None:
            raise MovaInputError(f"engine {self.path} was built from random {built['digest']} "
                                 f"weights, for `mova-rt bench --engine`: build one for {ckpt} "
                                 f"with `{self.fix(ckpt)}`")
        if fp8.source_digest(ckpt) != built["digest"]:
            raise MovaInputError(f"engine {self.path} was built from another checkpoint "
                                 f"({built['path']}), not {ckpt}: build one for it with "
                                 f"`{self.fix(ckpt)}`")
        if config_digest(load_config(ckpt)) != self.manifest["config"]["digest"]:
            raise MovaInputError(f"engine {self.path}: the model config of {ckpt} changed since "
                                 f"the build: rebuild with `{self.fix(ckpt)}`")
        if precision is not None and precision != self.precision:
            raise MovaInputError(f"engine {self.path} is {self.precision}, --precision {precision} "
                                 f"was asked: drop --precision, or build a {precision} engine "
                                 f"with `{self.fix(ckpt, precision=precision)}`")
        if kernels not in (None, "auto") and kernels != self.kernels:   # auto: the engine's
            raise MovaInputError(f"engine {self.path} was built with --kernels {self.kernels}, "
                                 f"--kernels {kernels} was asked: drop --kernels (an engine "
                                 "brings its own compiled kernels)")
        if lora and self.precision == "fp8":
            raise MovaInputError(f"engine {self.path} holds fp8 weights quantized without the "
                                 "LoRA: use a bf16 engine with --lora_path (its weights are read "
                                 "from the checkpoint, LoRA merged), or merge the LoRA into the "
                                 "checkpoint and rebuild")
        self._passed.add(key)

    def check_request(self, height: int, width: int, num_frames: int, fps: float,
                      passes: int = 1, ckpt: str | None = None) -> None:
        """Shapes and batch of a generate call against the build's."""
        r = self.request
        asked = {"height": height, "width": width, "num_frames": num_frames, "fps": float(fps)}
        wrong = [f"--{k} {asked[k]:g} (built for {r[k]:g})" for k in asked if asked[k] != r[k]]
        if wrong:
            raise MovaInputError(f"engine {self.path} does not fit this request: "
                                 f"{', '.join(wrong)}: build one with "
                                 f"`{self.fix(ckpt, **asked)}`")
        if passes > MAX_BATCH:
            raise MovaInputError(f"engine {self.path} takes batches up to {MAX_BATCH}; this "
                                 f"guidance batches {passes} passes: pass --no-cfg-batch")

    # -- install -------------------------------------------------------------------------------
    def load_unit(self, name: str, device):
        entry = self.manifest["units"][name]
        if self.backend == "inductor":
            path = os.path.join(self.path, entry["files"][0])
            index = torch.device(device).index
            try:
                return torch._inductor.aoti_load_package(
                    path, device_index=-1 if index is None else index)
            except Exception as e:
                raise MovaInputError(f"engine {self.path}: {entry['files'][0]} does not load "
                                     f"({_first_line(e)}): rebuild with `{self.fix()}`") from None
        if tensorrt_module() is None:
            raise MovaInputError(f"engine {self.path} is a TensorRT engine and the tensorrt "
                                 f"package is not installed: install it, or build an inductor "
                                 f"engine with `{self.fix(backend='inductor')}`")
        if "layers" not in entry:
            return TrtUnit(os.path.join(self.path, entry["files"][1]), entry["input_names"],
                           entry["output_names"])
        acts = entry["input_names"][len(entry["weights"]):]       # the weights are bound
        units = {key: TrtUnit(os.path.join(self.path, rel), acts, entry["output_names"],
                              shared=True) for key, rel in entry["layers"].items()}
        self._buffers.append(TrtUnit.share(list(units.values()), device))
        return units

    @property
    def bound(self) -> bool:
        """Whether the units hold their layers' weights (TensorRT fp8: one plan per layer)."""
        return any("layers" in e for e in self.manifest["units"].values())

    def install(self, pipe) -> None:
        """Every block of the towers and every interaction layer of the bridge runs its unit
        (a class swap: weights, hooks and state dict stay the module's own)."""
        by_tower, runners = {}, {}
        for name, entry in self.manifest["units"].items():
            for tower in entry["towers"]:
                by_tower[tower] = name
            runners[name] = self.load_unit(name, pipe.device)
        units = self.manifest["units"]

        def bind(name: str, key: str, layer: nn.Module) -> tuple:
            """(the layer's runner, the weights it is called with)."""
            self._check_weights(name, units[name], weight_signature(layer))
            runner = runners[name]
            if not isinstance(runner, dict):
                # the Parameter objects (offload rebinds their .data, never replaces them)
                return runner, [p for _, p in layer.named_parameters()]
            if key not in runner:
                raise self._damaged(f"unit {name} has no plan for layer {key}")
            # the plan holds the weights it reads: free the module's copy (not the others: the
            # text K/V projections run outside the unit, once per request)
            params = [p for _, p in layer.named_parameters()]
            for i in units[name]["bound_weights"]:
                params[i].data = torch.empty(0, dtype=params[i].dtype, device=params[i].device)
            return runner[key], []

        for tower in ("video_dit", "video_dit_2", "audio_dit"):
            dit = getattr(pipe, tower)
            if dit is None:
                continue
            if tower not in by_tower:
                raise self._damaged(f"it has no unit for {tower}")
            name = by_tower[tower]
            for key, block in unit_layers(pipe, [tower], "block"):
                block._engine_unit, block._engine_params = bind(name, key, block)
                block.__class__ = _engine_class(type(block), EngineBlock)
                block._engine_tokens = units[name]["inputs"]["x"][0][1]
                block._engine_rope_dtype = getattr(torch, units[name]["inputs"]["rope_cos"][1])
        bridge = pipe.bridge
        if bridge.layers:
            if "dual_tower_bridge" not in by_tower:
                raise self._damaged("it has no unit for the bridge")
            name = by_tower["dual_tower_bridge"]
            calls = {int(key.rpartition(".")[2]): bind(name, key, layer)
                     for key, layer in unit_layers(pipe, None, "bridge")}
            bridge.__class__ = _engine_class(type(bridge), EngineBridge)
            bridge._engine_calls = calls
            bridge._engine_tokens = (units[name]["inputs"]["video"][0][1],
                                     units[name]["inputs"]["audio"][0][1])

    def _check_weights(self, name: str, entry: dict, signature: list) -> None:
        if signature != entry["weights"]:
            built = {n: (s, d) for n, s, d in entry["weights"]}
            diff = next((f"{n} {s} {d} (built {built.get(n)})" for n, s, d in signature
                         if built.get(n) != (s, d)), "the weight list")
            raise MovaInputError(f"engine {self.path}: unit {name} was built for other weights "
                                 f"({diff}): rebuild with `{self.fix()}`")

    def _damaged(self, why: str) -> MovaInputError:
        return MovaInputError(f"engine {self.path} is damaged or incomplete ({why}): rebuild it "
                              f"with `{self.fix()}`")


def _first_line(e: BaseException) -> str:
    text = str(e).strip()
    return (text.splitlines()[0] if text else type(e).__name__)[:200]


def open_engine(path: str, verify: bool = True) -> Engine:
    """Reads and validates an engine folder: the manifest, every artifact it lists (size, and
    sha256 of the compiled units; the fp8 weights are checked by fp8.load)."""
    if not os.path.isdir(path):
        raise MovaInputError(f"--engine {path} is not a folder: build one with `mova-rt build "
                             "...` (see mova-rt build --help)")
    from .validate.manifests import check_engine_manifest
    from .validate.schema import read_json
    manifest = read_json(
        os.path.join(path, MANIFEST), "engine manifest", "build the engine again with `mova-rt "
        "build`",
        missing=f"--engine {path} has no {MANIFEST}: it is not an engine or its build did not "
                "finish; build it again with `mova-rt build`")
    fmt = manifest.get("format") if isinstance(manifest, dict) else None
    if isinstance(fmt, str) and fmt != FORMAT:
        raise MovaInputError(f"--engine {path}: {MANIFEST} field 'format' is {fmt!r}, this "
                             f"mova-rt reads {FORMAT}: build it again with `mova-rt build`")
    check_engine_manifest(manifest, path, MANIFEST)     # every field's type, before any use
    engine = Engine(path, manifest)
    if verify:
        for rel, info in manifest["artifacts"].items():
            full = os.path.join(path, rel)
            if not os.path.isfile(full):
                raise engine._damaged(f"{rel} is missing")
            if os.path.getsize(full) != info["bytes"]:
                raise engine._damaged(f"{rel} is {os.path.getsize(full)} bytes, the build wrote "
                                      f"{info['bytes']}")
            if not rel.startswith("weights/") and _sha256(full) != info["sha256"]:
                raise engine._damaged(f"{rel} differs from what the build wrote (sha256)")
        for entry in manifest["units"].values():
            for rel in entry["files"]:
                if rel not in manifest["artifacts"]:
                    raise engine._damaged(f"{rel} is not among its artifacts")
    return engine


# ---------------------------------------------------------------------------------------------
# 6. The modules that call units
# ---------------------------------------------------------------------------------------------
_CLASSES: dict = {}


def _engine_class(base: type, mixin: type) -> type:
    """base with `mixin`'s forward (cached, so every block of a class shares one)."""
    if issubclass(base, mixin):
        return base
    key = (base, mixin)
    if key not in _CLASSES:
        _CLASSES[key] = type(f"Engine{base.__name__}", (mixin, base), {})
    return _CLASSES[key]


def _check_tokens(module, got: int, built: int, what: str) -> None:
    if got != built:
        raise MovaInputError(f"the engine was built for {built} {what} tokens, this call has "
                             f"{got}: build an engine for this clip size")


class EngineBlock(nn.Module):
    """A DiTBlock whose forward is its engine unit, called with the block's own weights."""

    def forward(self, x, text_kv, t_mod, rope):
        _check_tokens(self, x.shape[1], self._engine_tokens, "block")
        b = x.shape[0]
        if t_mod.shape[0] != b:         # one timestep for the whole batch: the unit takes B rows
            t_mod = t_mod.expand(b, -1, -1)
        k, v = text_kv
        cos, sin = (t.to(self._engine_rope_dtype) for t in rope.tables())   # no-op: same dtype
        acts = [a.contiguous() for a in (x, k, v, t_mod, cos, sin)]   # no-ops when they are
        return self._engine_unit(self._engine_params, acts)


class EngineBridge(nn.Module):
    """A Bridge whose interaction layers run the engine's bridge unit."""

    def forward(self, i, video, audio, video_rope, audio_rope):
        from .offload import materialized
        _check_tokens(self, video.shape[1], self._engine_tokens[0], "video")
        _check_tokens(self, audio.shape[1], self._engine_tokens[1], "audio")
        a2v = self.audio_to_video_conditioners[str(i)]
        v2a = self.video_to_audio_conditioners[str(i)]
        with materialized(a2v), materialized(v2a):     # streamed weights bound (--offload group)
            acts = [video, audio]
            if video_rope is not None:
                acts += [*video_rope.tables(), *audio_rope.tables()]
            acts = [a.contiguous() for a in acts]
            unit, weights = self._engine_calls[i]
            out = unit(weights, acts)
        return tuple(out)
