"""The DiT block on the fp8 path with its activations quantized once, by the kernel that produces
them: applied by `fp8.apply(..., producers=True)` to every DiTBlock whose GEMMs are all fp8, as
a transform; the model files are untouched.

One block, and where each GEMM input comes from:

    h, s    = layernorm_modulate_fp8(x, shift_msa, scale_msa)   adaLN writes e4m3 + a scale per token
    q, k, v = three _scaled_mm on the same (h, s)                bias in the epilogue, bf16 out
    a       = self_attention(q, k, v)                            (the kernel set's attention)
    x       = gated_residual(x, gate_msa, o(a))                  o quantizes a (one pass)
    h, s    = layernorm_affine_fp8(x)                            norm3 writes e4m3 + scales
    x       = x + o(cross_attention(q(h, s), text K/V))
    h, s    = layernorm_modulate_fp8(x, shift_mlp, scale_mlp)
    x       = gated_residual(x, gate_mlp, down(gelu(up(h, s))))  down quantizes the GELU output

So the bf16 normed activations never reach memory and are never re-read to be quantized, and the
q, k and v GEMMs read one quantized input. The GEMMs are torch._scaled_mm (cuBLASLt); the
attention, GELU and FFN-hidden outputs are quantized per token by `quantize_activations` (the CUDA
C++ kernel of mova_rt._C on GPUs).

Numerics: the same values as the unfused fp8 path (`Fp8Linear` after the bf16 norm kernels): the
producers round to bf16 before quantizing, exactly as quantize_rows of the bf16 norm does
(tests/test_quantize.py checks the block against the unfused one on the same weights).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ..models.bridge import ConditionalCrossAttention
from ..models.video_dit import DiTBlock, SelfAttention
from .quantize import Fp8Linear, quantize_activations


class Fp8DiTBlock(DiTBlock):
    """DiTBlock.forward with the producers' quantization (module docstring). Same parameters and
    state-dict keys as DiTBlock; installed by `fuse`."""

    def forward(self, x: torch.Tensor, text_kv: tuple, t_mod: torch.Tensor, rope) -> torch.Tensor:
        from ..kernels import adaln          # Triton: imported when such a block runs
        mod = self.modulation.to(t_mod.dtype) + t_mod
        shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = mod.chunk(6, dim=1)
        b, l, _ = x.shape
        sa, ca, n3, ops = self.self_attn, self.cross_attn, self.norm3, self.ops
        # self-attention: one quantized adaLN output feeds q, k and v
        h = adaln.layernorm_modulate_fp8(x, shift_msa, scale_msa, self.norm1.eps)
        q, k, v = (lin.forward_quantized(*h, x.dtype).view(b, l, sa.num_heads, -1)
                   for lin in (sa.q, sa.k, sa.v))
        out = ops.self_attention(q, k, v, sa.norm_q.weight, sa.norm_k.weight, sa.norm_q.eps, rope)
        x = ops.gated_residual(x, gate_msa, sa.o(out.reshape(b, l, -1)))
        # text cross-attention (its K/V: bf16, once per request)
        h = adaln.layernorm_affine_fp8(x, n3.weight, n3.bias, n3.eps)
        q = ca.q.forward_quantized(*h, x.dtype).view(b, l, ca.num_heads, -1)
        k_text, v_text = text_kv
        out = ca.ops.cross_attention(q, k_text, v_text, ca.norm_q.weight, ca.norm_k.weight,
                                     ca.norm_q.eps)
        x = x + ca.o(out.reshape(b, l, -1))
        # FFN
        h = adaln.layernorm_modulate_fp8(x, shift_mlp, scale_mlp, self.norm2.eps)
        up, down = self.ffn[0], self.ffn[2]
        y = down(F.gelu(up.forward_quantized(*h, x.dtype), approximate="tanh"))
        return ops.gated_residual(x, gate_mlp, y)


def fusable(block: torch.nn.Module) -> bool:
    """A DiTBlock whose eight GEMMs are all fp8 with per-token (not calibrated static) input
    scales, on bf16 activations: fp8.apply has swapped them."""
    if type(block) is not DiTBlock:
        return False
    sa, ca = block.self_attn, block.cross_attn
    return all(isinstance(m, Fp8Linear) and m.input_scale is None
               for m in (sa.q, sa.k, sa.v, sa.o, ca.q, ca.o, block.ffn[0], block.ffn[2]))


def fuse(module: torch.nn.Module) -> int:
    """Turns every fusable DiTBlock of `module` into an Fp8DiTBlock, in place (its class only:
    parameters, buffers and hooks stay). Returns how many."""
    n = 0
    for m in module.modules():
        if fusable(m):
            m.__class__ = Fp8DiTBlock
            n += 1
    return n


# ---------------------------------------------------------------------------------------------
# Attention modules outside fused blocks: one quantization of an input read by several GEMMs
# ---------------------------------------------------------------------------------------------
def _quantized(x: torch.Tensor) -> tuple:
    """x [B, L, K] -> (e4m3 [B*L, K], fp32 [B*L]), quantized per token once."""
    return quantize_activations(x.reshape(-1, x.shape[-1]))


class Fp8SharedSelfAttention(SelfAttention):
    """SelfAttention whose fp8 q, k and v GEMMs read one per-token quantization of x."""

    def forward(self, x: torch.Tensor, rope) -> torch.Tensor:
        b, l, _ = x.shape
        h = _quantized(x)
        q, k, v = (lin.forward_quantized(*h, x.dtype).view(b, l, self.num_heads, -1)
                   for lin in (self.q, self.k, self.v))
        out = self.ops.self_attention(q, k, v, self.norm_q.weight, self.norm_k.weight,
                                      self.norm_q.eps, rope)
        return self.o(out.reshape(b, l, -1))


class Fp8SharedCrossAttention(ConditionalCrossAttention):
    """The bridge's conditional cross-attention whose fp8 k and v GEMMs read one per-token
    quantization of the other tower's states (for v2a: the 43,120 video tokens)."""

    def forward(self, x, y, x_rope=None, y_rope=None):
        b, l, _ = x.shape
        ly = y.shape[1]
        q = self.q(x).view(b, l, self.num_heads, -1)
        h = _quantized(y)
        k, v = (lin.forward_quantized(*h, y.dtype).view(b, ly, self.num_heads, -1)
                for lin in (self.k, self.v))
        out = self.ops.cross_attention(q, k, v, self.norm_q.weight, self.norm_k.weight,
                                       self.norm_q.eps, x_rope, y_rope)
        return self.o(out.reshape(b, l, -1))


_SHARED = {SelfAttention: (Fp8SharedSelfAttention, ("q", "k", "v")),
           ConditionalCrossAttention: (Fp8SharedCrossAttention, ("k", "v"))}


def share_inputs(module: torch.nn.Module) -> int:
    """Every attention module of `module` whose GEMMs reading one input are all fp8 with
    per-token scales quantizes that input once (its class changes; parameters stay). Returns
    how many."""
    n = 0
    for m in module.modules():
        shared = _SHARED.get(type(m))
        if shared and all(isinstance(getattr(m, name), Fp8Linear)
                          and getattr(m, name).input_scale is None for name in shared[1]):
            m.__class__ = shared[0]
            n += 1
    return n
