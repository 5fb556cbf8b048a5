"""The DiT block on the fp8 path with every activation quantized by the kernel that produces it
(issue 5, items 2 and 3): applied by `quantize.apply(..., gemm="triton")` to every DiTBlock of the
video experts and the audio DiT, as a transform; the model files are untouched.

One block, and where each GEMM input and output comes from:

    h, s   = layernorm_modulate_fp8(x, shift_msa, scale_msa)   adaLN writes e4m3 + a scale per token
    q, k, v = h @ W^T (three fp8 GEMMs reading the same h)
    a      = self_attention(q, k, v)                            (the kernel set's attention)
    x      = x + gate_msa * (a @ W_o^T)                         o GEMM, gated-residual epilogue
    h, s   = layernorm_affine_fp8(x)                            norm3 writes e4m3 + scales
    a      = cross_attention(h @ W_q^T, text K/V)
    x      = x + a @ W_o^T                                      o GEMM, residual epilogue
    h, s   = layernorm_modulate_fp8(x, shift_mlp, scale_mlp)
    x      = x + gate_mlp * FFN(h)                              up GEMM: GELU -> e4m3 epilogue;
                                                                down GEMM: gated-residual epilogue

So the bf16 normed activations and the 13,824-wide FFN hidden never reach memory, and the gated
residuals never re-read a projection's output. The attention outputs are still quantized by a
separate pass (`quantize.quantize_activations`: one read of [L, 5120] per attention).

Numerics: the same values as the unfused fp8 path (`Fp8Linear` after the bf16 norm kernels): the
norms round to bf16 before quantizing, the epilogues round as the eager residuals do. The tests
check the block against the unfused path on the same weights.
"""

from __future__ import annotations

import torch

from ..kernels import adaln
from ..kernels.fp8_gemm import EPI_GATE_RESIDUAL, EPI_GELU_FP8, fp8_gemm
from ..models.video_dit import DiTBlock
from .quantize import Fp8FFN, Fp8Linear, quantize_activations


def _gemm(lin: Fp8Linear, h: tuple, res: torch.Tensor | None = None,
          gate: torch.Tensor | None = None) -> torch.Tensor:
    """lin(h) for pre-quantized h = (e4m3 [B, L, K], scales [B, L] per token or [B, L, K/128]
    per group); with res [B, L, N]: res + gate * lin(h) (gate [B or 1, 1, N], or None for
    res + lin(h)) in the GEMM's epilogue."""
    x_q, x_s = h
    b, l, _ = x_q.shape
    a, a_s = x_q.reshape(b * l, -1), x_s.reshape(b * l, *x_s.shape[2:])
    if res is None:
        y = fp8_gemm(a, a_s, lin.weight, lin.weight_scale, lin.bias)
    else:
        g = None if gate is None else gate.expand(b, 1, -1).reshape(b, -1)
        y = fp8_gemm(a, a_s, lin.weight, lin.weight_scale, lin.bias, epilogue=EPI_GATE_RESIDUAL,
                     res=res.reshape(b * l, -1), gate=g, tokens=l, out_dtype=res.dtype)
    return y.view(b, l, -1)


def _ffn(ffn: Fp8FFN, h: tuple, res: torch.Tensor, gate: torch.Tensor) -> torch.Tensor:
    """res + gate * FFN(h): the up GEMM writes GELU(.) in e4m3 with scales per 128 columns, read
    by the down GEMM, which adds the gated residual."""
    up, down = ffn.get_submodule("0"), ffn.get_submodule("2")
    x_q, x_s = h
    b, l, _ = x_q.shape
    h_q, h_s = fp8_gemm(x_q.reshape(b * l, -1), x_s.reshape(b * l), up.weight, up.weight_scale,
                        up.bias, epilogue=EPI_GELU_FP8)
    return _gemm(down, (h_q.view(b, l, -1), h_s.view(b, l, -1)), res=res, gate=gate)


def _quantized(out: torch.Tensor) -> tuple:
    """An attention output [B, L, H, D] as (e4m3 [B, L, H*D], scales [B, L])."""
    b, l = out.shape[:2]
    q, s = quantize_activations(out.reshape(b * l, -1))
    return q.view(b, l, -1), s.view(b, l)


class Fp8DiTBlock(DiTBlock):
    """DiTBlock.forward with the producers' quantization and the fused residuals (module
    docstring). Same parameters and state-dict keys as DiTBlock; installed by `fuse`."""

    def forward(self, x: torch.Tensor, text_kv: tuple, t_mod: torch.Tensor, rope) -> torch.Tensor:
        mod = self.modulation.to(t_mod.dtype) + t_mod
        shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = mod.chunk(6, dim=1)
        b, l, _ = x.shape
        sa, ca, n3 = self.self_attn, self.cross_attn, self.norm3
        # self-attention: one quantized adaLN output feeds q, k and v
        h = adaln.layernorm_modulate_fp8(x, shift_msa, scale_msa, self.norm1.eps)
        q, k, v = (_gemm(lin, h).view(b, l, sa.num_heads, -1) for lin in (sa.q, sa.k, sa.v))
        out = sa.ops.self_attention(q, k, v, sa.norm_q.weight, sa.norm_k.weight, sa.norm_q.eps,
                                    rope)
        x = _gemm(sa.o, _quantized(out), res=x, gate=gate_msa)
        # text cross-attention (its K/V: bf16, once per request)
        h = adaln.layernorm_affine_fp8(x, n3.weight, n3.bias, n3.eps)
        q = _gemm(ca.q, h).view(b, l, ca.num_heads, -1)
        k_text, v_text = text_kv
        out = ca.ops.cross_attention(q, k_text, v_text, ca.norm_q.weight, ca.norm_k.weight,
                                     ca.norm_q.eps)
        x = _gemm(ca.o, _quantized(out), res=x)
        # FFN: GELU -> e4m3 in the up GEMM, the gated residual in the down GEMM
        h = adaln.layernorm_modulate_fp8(x, shift_mlp, scale_mlp, self.norm2.eps)
        return _ffn(self.ffn, h, res=x, gate=gate_mlp)


def fusable(block: torch.nn.Module) -> bool:
    """A DiTBlock whose GEMMs are all fp8 on the Triton kernels with per-token (not calibrated
    static) input scales: quantize.apply has swapped them and fused its FFN."""
    if type(block) is not DiTBlock:
        return False
    sa, ca = block.self_attn, block.cross_attn
    return isinstance(block.ffn, Fp8FFN) and all(
        isinstance(m, Fp8Linear) and m.gemm_name == "triton" and m.input_scale is None
        for m in (sa.q, sa.k, sa.v, sa.o, ca.q, ca.o, block.ffn.get_submodule("0"),
                  block.ffn.get_submodule("2")))


def fuse(module: torch.nn.Module) -> int:
    """Turns every fusable DiTBlock of `module` into an Fp8DiTBlock, in place (its class only:
    parameters, buffers and hooks stay). Returns how many."""
    n = 0
    for m in module.modules():
        if fusable(m):
            m.__class__ = Fp8DiTBlock
            n += 1
    return n
