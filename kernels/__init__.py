"""Triton kernels of mova-rt, imported as `mova_rt.kernels` (never as a bare `kernels`).

- attention.py: q/k RMSNorm + RoPE (interleaved 3D/1D, rotate-half, none) + attention in one
  kernel, with split-KV for few queries over many keys.
- adaln.py: LayerNorm + modulation, gated residual, affine LayerNorm, residual + norm fused.
- backends.py: registers them as the `triton` kernel set of mova_rt.ops.
- _triton.py: the interpreter flag, bf16 rounding, compile checks for sm_90 / sm_89.
Each has its pure-PyTorch reference (the eager path of mova_rt.ops / the `*_ref` functions).
"""
