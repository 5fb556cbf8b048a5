"""fp8 weights for the DiTs and the bridge (issue 5): offline quantization, its files, and the
transform that swaps a built model's Linear layers.

Scheme `fp8-e4m3/channel-token`:
- weights W [N, K] -> W_q e4m3 [N, K] and s_w fp32 [N] = max_k |W[n, k]| / 448 (a zero row keeps
  scale 1), so W ~ s_w[:, None] * W_q: one scale per output channel, fixed offline;
- activations x [M, K] -> x_q e4m3 and s_x fp32 [M] = max_k |x[m, k]| / 448 per token, at run time
  (dynamic: no calibration needed). The alternative is a static per-tensor scale per layer from
  calibration (`calibrate`, through nvidia-modelopt): x_q = e4m3(x / s), saturating; the files
  then hold `<layer>.input_scale` and the manifest says `"activations": "static-tensor"`. Static
  layers quantize their own input (the fused fp8 block needs per-token scales);
- y = (s_x[:, None] * s_w[None, :]) * (x_q @ W_q^T) + b, accumulated in fp32, out in the block
  dtype.

Which Linear layers (and why the others stay in the checkpoint dtype):
- quantized: in every DiT block of both experts and the audio DiT, self-attention q, k, v, o, text
  cross-attention q and o, FFN up and down; in the bridge, every conditioner's q, k, v, o. These
  run on every token of every forward: ~99% of the GEMM FLOPs (spec 4.2).
- kept: text cross-attention k and v (they project the 512 text rows once per request, an exact
  cache, so fp8 would cost accuracy for no time); patch embeddings (a convolution with 36 or 128
  input channels); text embeddings (once per request); time embedding and projection (the
  reference runs them in fp32); the heads (64 or 128 output channels that become the velocity
  directly); norms and modulation tables (not GEMMs).

Files: mova_rt/fp8/weights.py; calibration: mova_rt/fp8/calibrate.py.
"""

from __future__ import annotations

import re

import torch
import torch.nn as nn

from ..errors import MovaInputError
from . import cuda_ext, dispatch

FP8 = torch.float8_e4m3fn
FP8_MAX = 448.0                       # largest finite e4m3fn value
SCHEME = "fp8-e4m3/channel-token"
FORMAT = "mova-rt-fp8/1"
COMPONENTS = ("video_dit", "video_dit_2", "audio_dit", "dual_tower_bridge")
_QUANTIZED = {
    "dit": re.compile(r"^blocks\.\d+\.(self_attn\.(q|k|v|o)|cross_attn\.(q|o)|ffn\.(0|2))$"),
    "bridge": re.compile(r"^(audio_to_video|video_to_audio)_conditioners\.\d+\.inner\.(q|k|v|o)$"),
}


# ---------------------------------------------------------------------------------------------
# 1. The numerics (pure PyTorch: the reference every fast path is tested against)
# ---------------------------------------------------------------------------------------------
def quantize_rows(x: torch.Tensor) -> tuple:
    """[..., K] -> (e4m3 [..., K], fp32 scale [...]) with one scale per row: amax / 448."""
    amax = x.float().abs().amax(dim=-1)
    scale = torch.where(amax > 0, amax / FP8_MAX, torch.ones_like(amax))
    q = (x.float() / scale[..., None]).clamp(-FP8_MAX, FP8_MAX).to(FP8)
    return q, scale


def quantize_static(x: torch.Tensor, scale: torch.Tensor) -> tuple:
    """[M, K] -> (e4m3 [M, K], fp32 [M]) with one calibrated per-tensor scale (a 0-d tensor):
    values beyond 448 * scale saturate."""
    q = (x.float() / scale).clamp(-FP8_MAX, FP8_MAX).to(FP8)
    return q, scale.float().expand(x.shape[0])


def quantize_activations(x: torch.Tensor) -> tuple:
    """quantize_rows for activations [M, K]: the CUDA C++ kernel of mova_rt._C on GPUs when
    built (bit-identical, one fused pass), else the PyTorch reference; the reference too while
    torch.export or torch.compile traces it (the extension is opaque to them, and Inductor fuses
    the reference into the kernel that produces x)."""
    if torch.compiler.is_compiling() or torch.compiler.is_exporting():
        return quantize_rows(x)
    return cuda_ext._quantize_rows_cuda(x) if cuda_ext.takes(x) else quantize_rows(x)


def fp8_linear_ref(x_q, x_scale, w_q, w_scale, bias, out_dtype):
    """(s_x s_w) (x_q @ W_q^T) + b in fp32, rounded once to out_dtype. x_q [M, K], x_scale [M],
    w_q [N, K], w_scale [N], bias [N] or None."""
    y = (x_q.float() @ w_q.float().t()) * x_scale[:, None] * w_scale[None, :]
    if bias is not None:
        y = y + bias.float()
    return y.to(out_dtype)


def fp8_linear_scaled_mm(x_q, x_scale, w_q, w_scale, bias, out_dtype):
    """The same through torch._scaled_mm (cuBLASLt on sm_89+, also on the CPU) with row-wise
    scales and the bias in its epilogue: the fp32 accumulator scaled, the bias added and rounded
    once to out_dtype, as the reference does (bit-identical to it on the CPU)."""
    return torch._scaled_mm(x_q, w_q.t(), scale_a=x_scale[:, None].contiguous(),
                            scale_b=w_scale[None, :].contiguous(),
                            bias=None if bias is None else bias.to(out_dtype),
                            out_dtype=out_dtype)


GEMMS = {"reference": fp8_linear_ref, "scaled_mm": fp8_linear_scaled_mm}


class Fp8Linear(nn.Module):
    """A Linear whose weight is e4m3 with per-output-channel scales; the input is quantized per
    token on the fly (or arrives quantized by its producer: `forward_quantized`). Holds the
    original bias (checkpoint dtype). The fp8 weight and its scales are (frozen) parameters, so
    offload streams them like any weight."""

    def __init__(self, w_q: torch.Tensor, w_scale: torch.Tensor, bias: torch.Tensor | None,
                 gemm: str = "scaled_mm", input_scale: torch.Tensor | None = None):
        super().__init__()
        self.out_features, self.in_features = w_q.shape
        self.weight = nn.Parameter(w_q, requires_grad=False)
        self.weight_scale = nn.Parameter(w_scale.float(), requires_grad=False)
        self.bias = None if bias is None else nn.Parameter(bias, requires_grad=False)
        self.gemm_name = gemm
        self.gemm = GEMMS[gemm]
        # a calibrated static per-tensor input scale (calibrate), or None: per token at run time
        self.input_scale = None if input_scale is None else nn.Parameter(
            input_scale.detach().float().reshape(()), requires_grad=False)

    def quantize_input(self, x: torch.Tensor) -> tuple:
        """x [M, K] -> (e4m3 [M, K], fp32 scales [M]): static when calibrated, else per token."""
        if self.input_scale is not None:
            return quantize_static(x, self.input_scale)
        return quantize_activations(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.input_scale is not None and torch.onnx.is_in_onnx_export():
            return self.onnx_qdq(x)
        lead = x.shape[:-1]
        x_q, x_scale = self.quantize_input(x.reshape(-1, self.in_features))   # [M, K], [M]
        y = self.gemm(x_q, x_scale, self.weight, self.weight_scale, self.bias, x.dtype)
        return y.view(*lead, self.out_features)

    def forward_quantized(self, x_q: torch.Tensor, x_scale: torch.Tensor,
                          out_dtype: torch.dtype = torch.bfloat16) -> torch.Tensor:
        """The layer on an input its producer quantized per token: x_q e4m3 [..., K], x_scale
        fp32 [...] (the adaLN / norm3 kernels' fp8 output, mova_rt/fp8/block.py)."""
        lead = x_q.shape[:-1]
        y = self.gemm(x_q.reshape(-1, self.in_features), x_scale.reshape(-1), self.weight,
                      self.weight_scale, self.bias, out_dtype)
        return y.view(*lead, self.out_features)

    def onnx_qdq(self, x: torch.Tensor) -> torch.Tensor:
        """The same layer as ONNX QuantizeLinear / DequantizeLinear nodes (opset 19, e4m3fn,
        saturating), the form TensorRT fuses into an fp8 GEMM: x (fp32) -> Q(s_x) -> DQ(s_x);
        W_q -> DQ(s_w, axis 0); MatMul, + bias, in fp32, rounded once to x's dtype: the
        reference's numerics. Only while torch.onnx.export traces a calibrated layer (TensorRT
        takes build-time constant scales: no per-token form)."""
        from torch.onnx import ops
        xf = x.float()
        zero = torch.zeros((), dtype=FP8, device=x.device)
        q = ops.symbolic("QuantizeLinear", [xf, self.input_scale, zero], attrs={"saturate": 1},
                         dtype=FP8, shape=xf.shape, version=19)
        xd = ops.symbolic("DequantizeLinear", [q, self.input_scale, zero], attrs={},
                          dtype=torch.float32, shape=xf.shape, version=19)
        zeros = torch.zeros(self.out_features, dtype=FP8, device=x.device)
        w = ops.symbolic("DequantizeLinear", [self.weight, self.weight_scale, zeros],
                         attrs={"axis": 0}, dtype=torch.float32, shape=self.weight.shape,
                         version=19)
        y = xd @ w.t()
        if self.bias is not None:
            y = y + self.bias.float()
        return y.to(x.dtype)

    def extra_repr(self) -> str:
        act = "static input scale" if self.input_scale is not None else "per-token inputs"
        return (f"in_features={self.in_features}, out_features={self.out_features}, "
                f"{self.gemm_name}, {act}")


# ---------------------------------------------------------------------------------------------
# 2. Which layers, and the transform
# ---------------------------------------------------------------------------------------------
def quantizable(component: str, module: nn.Module) -> list:
    """Names of the Linear layers of a component that the scheme quantizes (module docstring)."""
    pattern = _QUANTIZED["bridge" if component == "dual_tower_bridge" else "dit"]
    return [name for name, m in module.named_modules()
            if isinstance(m, nn.Linear) and pattern.match(name)]


def _set(module: nn.Module, name: str, child: nn.Module) -> None:
    parent, _, leaf = name.rpartition(".")
    setattr(module.get_submodule(parent) if parent else module, leaf, child)


def quantize_component(component: str, module: nn.Module) -> dict:
    """{layer: (w_q, w_scale)} of a built component, computed from its weights."""
    out = {}
    for name in quantizable(component, module):
        out[name] = quantize_rows(module.get_submodule(name).weight.detach())
    return out


def plan(component: str, module: nn.Module, gemm: str = "auto", device=None) -> dict:
    """{layer: GEMM backend} of a component's quantizable layers: `gemm` for every layer, or, for
    "auto", per layer from the dispatch table for the GPU of `device` (mova_rt/fp8/dispatch.py),
    where "bf16" keeps the layer a bf16 Linear (the small audio-row GEMMs measured slower in
    fp8)."""
    gpu = dispatch.device_name(device) if device is not None else None
    out = {}
    for name in quantizable(component, module):
        linear = module.get_submodule(name)
        out[name] = gemm if gemm != "auto" else dispatch.pick(
            linear.out_features, linear.in_features, dispatch.rows_of(component, name), gpu)
    return out


def apply(modules: dict, weights: dict | None = None, gemm: str = "scaled_mm",
          input_scales: dict | None = None, device=None, producers: bool = False) -> dict:
    """Swaps the quantizable Linear layers of modules {component: module} for Fp8Linear, in place.
    weights: {component: {layer: (w_q, w_scale[, input_scale])}} from `load` or `with_scales`
    (input_scale: a calibrated static scale, or None); input_scales {component: {layer:
    scale}} from `calibrate` sets (or replaces) those; weights None quantizes the modules' own
    weights (on load). gemm: a GEMMS backend, or "auto": per layer from the dispatch table
    (`plan`; layers it keeps in bf16 stay Linear). device: where the fp8 layers go, each
    quantized there one at a time, so a model loaded in host memory never has its bf16 weights
    on the GPU (None: where each layer is). producers: DiT blocks whose GEMMs are all fp8 take
    their inputs quantized by the kernels that produce them (mova_rt/fp8/block.py; Triton);
    elsewhere the fp8 q/k/v (and the bridge's k/v) GEMMs share one quantization of their input.
    Returns the fp8 weights used (for `save`)."""
    if gemm not in GEMMS and gemm != "auto":
        raise MovaInputError(f"unknown fp8 GEMM backend {gemm!r}: choose auto, "
                             f"{', '.join(GEMMS)}")
    used = {}
    for component, module in modules.items():
        if module is None:
            continue
        given = None if weights is None else weights[component]
        layers = plan(component, module, gemm, device)
        if given is not None and set(given) != set(layers):
            raise MovaInputError(f"the fp8 weights of {component} hold other layers than the model "
                                 "has: quantize this checkpoint again with mova-rt quantize")
        used[component] = {}
        for name, chosen in layers.items():
            linear = module.get_submodule(name)
            dev = torch.device(device) if device is not None else (
                linear.bias.device if linear.weight.is_meta and linear.bias is not None
                else linear.weight.device)
            if chosen == "bf16":
                if linear.weight.is_meta:
                    raise MovaInputError(f"{component}/{name} runs in bf16 but its bf16 weight "
                                         "was not loaded (mova-rt bug: see deferred_weights)")
                continue
            if given is not None:
                w_q, w_scale, in_scale = (tuple(given[name]) + (None,))[:3]
            else:
                w_q, w_scale = quantize_rows(linear.weight.detach().to(dev))
                in_scale = None
            if tuple(w_q.shape) != tuple(linear.weight.shape):
                raise MovaInputError(
                    f"fp8 weight {component}/{name} is {tuple(w_q.shape)} but the model's is "
                    f"{tuple(linear.weight.shape)}: quantize this checkpoint again")
            if input_scales is not None:
                in_scale = input_scales[component][name]
            bias = None if linear.bias is None else linear.bias.detach().to(dev)
            _set(module, name, Fp8Linear(w_q.to(dev), w_scale.to(dev), bias, chosen,
                                         None if in_scale is None else in_scale.to(dev)))
            used[component][name] = (w_q, w_scale, in_scale)
            del linear                                   # its bf16 weight is freed here
        from . import block
        if producers:
            block.fuse(module)
        block.share_inputs(module)      # one quantization per input read by several GEMMs
    return used


def deferred_weights(component: str, module: nn.Module, gemm: str = "auto", device=None):
    """A load_state `defer` predicate: the `.weight` keys of the layers `plan` quantizes, whose
    bf16 values are not needed when fp8 weights are given (they are never read)."""
    keys = {f"{name}.weight" for name, g in plan(component, module, gemm, device).items()
            if g != "bf16"}
    return keys.__contains__
