"""Triton kernels of mova-rt, imported as `mova_rt.kernels` (never as a bare `kernels`).

- attention.py: softmax attention for Hopper (bf16; TMA, wgmma, split-KV for few queries over
  many keys); fused_attention puts the q/k RMSNorm + RoPE (PyTorch) in front of it.
- attention_fp8.py: 8-bit attention, q/k/p/v in e4m3 (both products on e4m3 wgmma), its
  quantizing prologue in Triton.
- attention_int8.py: 8-bit attention with int8 q/k (p, v bf16), q/k norm + RoPE fused into its
  prologue (the in-register tile code of rope_tiles.py).
- adaln.py: LayerNorm + modulation, gated residual, affine LayerNorm, residual + norm fused.
- backends.py: registers them as the `triton` kernel set of mova_rt.ops.
- _triton.py: the interpreter flag, bf16/e4m3 rounding, compile checks for sm_90 / sm_89 (shared
  memory, and from the compiled code: registers, spills, the main loop's wgmma, divisions).
Each has its pure-PyTorch reference (the eager path of mova_rt.ops / the `*_ref` functions).
"""
