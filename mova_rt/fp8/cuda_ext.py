"""The optional CUDA C++ extension mova_rt._C (csrc/), wrapped for tensors; each kernel falls back
to its PyTorch reference where the extension, its CUDA kernels or a GPU is missing.

The kernels take raw device pointers and the current stream (the extension does not link torch),
and are registered as torch.library custom ops so they compose with torch.compile.
"""

from __future__ import annotations

import functools

import torch

try:
    from .. import _C
except ImportError:      # not built (no cmake / pybind11 at install time): fallbacks only
    _C = None

FP8 = torch.float8_e4m3fn


@functools.cache
def available() -> bool:
    """True when the extension has its CUDA kernels and a GPU is present (asked once)."""
    return _C is not None and getattr(_C, "has_cuda", False) and torch.cuda.is_available()


def build_info() -> str:
    return _C.build_info() if _C is not None else "not built"


@torch.library.custom_op("mova_rt::quantize_rows_fp8", mutates_args=())
def _quantize_rows_cuda(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    m, k = x.shape
    q = torch.empty((m, k), dtype=FP8, device=x.device)
    scale = torch.empty((m,), dtype=torch.float32, device=x.device)
    stream = torch.cuda.current_stream(x.device).cuda_stream
    _C.quantize_rows_fp8(x.data_ptr(), x.stride(0), q.data_ptr(), scale.data_ptr(), m, k, stream)
    return q, scale


@_quantize_rows_cuda.register_fake
def _(x):
    return (x.new_empty(x.shape, dtype=FP8), x.new_empty(x.shape[:1], dtype=torch.float32))


def takes(x: torch.Tensor) -> bool:
    """Whether the CUDA kernel quantizes x: bf16 [M, K] on a GPU, contiguous rows, kernel built."""
    return (x.is_cuda and x.dtype == torch.bfloat16 and x.dim() == 2 and x.stride(1) == 1
            and available())


def quantize_rows(x: torch.Tensor) -> tuple:
    """Per-row e4m3 quantization (mova_rt.fp8.quantize.quantize_rows): the CUDA kernel where it
    `takes` x, else the reference (the two are bit-identical: the same fp32 division and
    rounding). The model's layers call mova_rt.fp8.quantize.quantize_activations instead."""
    if takes(x):
        return _quantize_rows_cuda(x)
    from .quantize import quantize_rows as reference
    return reference(x)
