"""fp8 for the DiTs and the bridge: one package, used by the pipeline, engines and the benchmark,
and importing none of them.

- quantize.py: the numerics (per-row e4m3 quantization, the fp8 GEMM backends), `Fp8Linear`, and
  `apply`, the transform that swaps a built model's Linear layers;
- block.py: the DiT block with every activation quantized by its producer (Triton path);
- dispatch.py: which fp8 GEMM runs each weight shape, from committed GPU measurements;
- weights.py: fp8 weight folders (`mova-rt quantize`), saved atomically, loaded with checks;
- calibrate.py: static activation scales through nvidia-modelopt (optional);
- cuda_ext.py: the optional CUDA C++ extension mova_rt._C, with PyTorch fallbacks.

The `mova-rt quantize` command itself (mova_rt/quantize_cmd.py) lives outside: calibration runs
the pipeline.
"""

from .calibrate import calibrate
from .quantize import (COMPONENTS, FORMAT, FP8, FP8_MAX, GEMMS, SCHEME, Fp8Linear, apply,
                       deferred_weights, plan, quantizable, quantize_activations,
                       quantize_component, quantize_rows,
                       quantize_static)
from .weights import activations_of, load, save, source_digest

__all__ = ["COMPONENTS", "FORMAT", "FP8", "FP8_MAX", "GEMMS", "SCHEME", "Fp8Linear",
           "activations_of", "apply", "calibrate", "deferred_weights", "load", "plan",
           "quantizable", "quantize_activations",
           "quantize_component", "quantize_rows", "quantize_static", "save", "source_digest"]
