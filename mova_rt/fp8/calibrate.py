"""Static activation scales through nvidia-modelopt (optional): one calibrated per-tensor input
scale per quantizable Linear, x_q = e4m3(x / s), what TensorRT fp8 engines need."""

from __future__ import annotations

import torch
import torch.nn as nn

from ..errors import MovaInputError
from .quantize import FP8_MAX, quantizable


def modelopt_quantization():
    """modelopt.torch.quantization, or MovaInputError when nvidia-modelopt is not installed."""
    try:
        import modelopt.torch.quantization as mtq
    except ImportError:
        raise MovaInputError("calibration needs nvidia-modelopt (pip install nvidia-modelopt); "
                             "dynamic per-token scales need nothing") from None
    return mtq


def calibrate(modules: dict, forward_loop) -> dict:
    """Static per-tensor input scales {component: {layer: amax / 448}} of the quantizable Linear
    layers of modules {component: module}, from nvidia-modelopt's FP8 calibration (max
    calibrator) over forward_loop(), which runs the model on calibration inputs. modelopt
    rewrites the modules in place (fake-quant layers): calibrate a throwaway bf16 copy, then
    pass the scales to `apply(..., input_scales=)` (and `save`). Optional: raises
    MovaInputError when modelopt is not installed."""
    mtq = modelopt_quantization()
    layers = {c: set(quantizable(c, m)) for c, m in modules.items() if m is not None}
    holder = nn.ModuleDict({c: m for c, m in modules.items() if m is not None})
    mtq.quantize(holder, mtq.FP8_DEFAULT_CFG, lambda _: forward_loop())
    scales: dict = {c: {} for c in layers}
    for name, m in holder.named_modules():
        component, _, layer = name.partition(".")
        amax = getattr(getattr(m, "input_quantizer", None), "amax", None)
        if layer in layers.get(component, ()) and amax is not None:
            scales[component][layer] = torch.tensor(float(amax.float().max()) / FP8_MAX)
    missing = [f"{c}/{n}" for c, names in layers.items() for n in names if n not in scales[c]]
    if missing:
        raise MovaInputError(f"calibration saw no input for {len(missing)} layers (e.g. "
                             f"{missing[0]}): the forward loop must run every tower")
    return scales


