"""Backend registry: one table per op kind, resolved once when a model is built.

A kernel set name (`--kernels`) selects one backend per op kind. Modules receive an `Ops` object at
construction and call its functions directly: no lookup per call.

Op kinds and their contracts (activations [B, L, ...] in the model dtype):
- attention(q, k, v) -> out: q [B, Lq, H, D], k/v [B, Lk, H, D]; full softmax attention, scale
  1/sqrt(D); out [B, Lq, H, D].
- rope_interleaved(x, cos, sin) -> x': x [B, L, H, D], cos/sin [L, D/2] float64; rotates the pairs
  (2i, 2i+1), rounds once to x.dtype.
- self_attention(q, k, v, w_q, w_k, eps, rope: InterleavedRope) -> out: q/k the raw projections
  (views of [B, L, H*D]); RMSNorm of q and k over all heads (weights w_q, w_k), interleaved RoPE,
  attention. The DiTs' self-attention.
- cross_attention(q, k, v, w_q, w_k, eps, q_rope, k_rope) -> out: the same with rotate-half RoPE
  (RotateHalfRope or None for each side): the bridge, and the text cross-attention (no RoPE).
- norm_modulate(x, shift, scale, eps): LayerNorm without affine, then x * (1 + scale) + shift in
  fp32, rounded once (the reference's compiled modulate).
- gated_residual(x, gate, y): x + gate * y.
- layernorm_affine(x, weight, bias, eps): LayerNorm with affine (norm3, the bridge's y_norm).
- residual_layernorm_affine(x, gate, y, weight, bias, eps) -> (x + gate * y, its norm3): the
  residual add fused with the next norm (one pass over x and y).
- gemm(x, weight, bias): y = x W^T + b (the bench's linear shapes; Linear layers are swapped as a
  whole by the quantization transform).

Kernel sets:
- `reference`: the reference implementation's semantics, op by op in PyTorch: RoPE in float64 (as
  `rope_apply`), attention through PyTorch SDPA (the reference's own fallback).
- `sdpa`: the same with RoPE in float32 (differs from `reference` by at most one bf16 ulp on rare
  elements).
- `triton`: the fused Triton kernels of mova_rt.kernels (bf16; fp32 runs take the exact path).
- `flash-attn`: the flash-attn package's attention (optional import) with float32 RoPE.
- `triton-int8attn`: the Triton norm kernels and 8-bit attention (kernels/attention_int8.py: q
  and k in int8 per block, k smoothed, p and v bf16) with q/k RMSNorm and RoPE fused into the
  quantizing prologue; approximate (about 1% of the attention output on random inputs).
- `cudnn-fp8attn`: as `sdpa`, with cuDNN's fp8 attention (mova_rt/attention_cudnn.py, optional
  nvidia-cudnn-frontend, sm_90+): q, k, v, P and the output in e4m3; approximate (about 6% of the
  attention output on random inputs, the fp8 output alone 2.6%).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F

from .errors import MovaInputError
from .rope import apply_rope_rotate_half

KINDS = ("attention", "rope_interleaved", "self_attention", "cross_attention", "norm_modulate",
         "gated_residual", "layernorm_affine", "residual_layernorm_affine", "gemm")
_REGISTRY: dict[str, dict[str, Callable]] = {kind: {} for kind in KINDS}


def register(kind: str, name: str):
    def deco(fn):
        _REGISTRY[kind][name] = fn
        return fn
    return deco


# ---------------------------------------------------------------------------------------------
# Pure-PyTorch backends (the exact semantics every other backend is tested against)
# ---------------------------------------------------------------------------------------------
@register("attention", "sdpa")
def attention_sdpa(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    # SDPA wants [B, H, L, D]; transposes are views.
    out = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2))
    return out.transpose(1, 2)


def _rope_interleaved(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                      compute: torch.dtype) -> torch.Tensor:
    b, l, h, d = x.shape
    xp = x.to(compute).reshape(b, l, h, d // 2, 2)
    a, c = xp[..., 0], xp[..., 1]                     # [B, L, H, D/2]
    cs = cos.to(compute)[None, :, None, :]            # [1, L, 1, D/2]
    sn = sin.to(compute)[None, :, None, :]
    out = torch.stack((a * cs - c * sn, a * sn + c * cs), dim=-1)
    return out.reshape(b, l, h, d).to(x.dtype)


@register("rope_interleaved", "float64")
def rope_interleaved_f64(x, cos, sin):
    return _rope_interleaved(x, cos, sin, torch.float64)


@register("rope_interleaved", "float32")
def rope_interleaved_f32(x, cos, sin):
    return _rope_interleaved(x, cos, sin, torch.float32)


def rms_norm_heads(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """RMSNorm of [B, L, H, D] over all heads (the reference's norm_q / norm_k on [B, L, H*D])."""
    b, l, h, d = x.shape
    return F.rms_norm(x.reshape(b, l, h * d), (h * d,), weight, eps).view(b, l, h, d)


def compose_self_attention(rope_fn: Callable, attention_fn: Callable) -> Callable:
    def self_attention(q, k, v, w_q, w_k, eps, rope):
        cos, sin = rope.tables()
        q = rope_fn(rms_norm_heads(q, w_q, eps), cos, sin)
        k = rope_fn(rms_norm_heads(k, w_k, eps), cos, sin)
        return attention_fn(q, k, v)
    return self_attention


def compose_cross_attention(attention_fn: Callable) -> Callable:
    def cross_attention(q, k, v, w_q, w_k, eps, q_rope=None, k_rope=None):
        q = rms_norm_heads(q, w_q, eps)
        k = rms_norm_heads(k, w_k, eps)
        if q_rope is not None:
            q = apply_rope_rotate_half(q, *q_rope.tables())
        if k_rope is not None:
            k = apply_rope_rotate_half(k, *k_rope.tables())
        return attention_fn(q, k, v)
    return cross_attention


def modulate(x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """x * (1 + scale) + shift in fp32, rounded once to x.dtype (the reference's compiled helper)."""
    return (x.float() * (1 + scale.float()) + shift.float()).to(x.dtype)


@register("norm_modulate", "eager")
def norm_modulate_eager(x, shift, scale, eps):
    return modulate(F.layer_norm(x, x.shape[-1:], eps=eps), shift, scale)


@register("gated_residual", "eager")
def gated_residual_eager(x, gate, y):
    return x + gate * y


@register("layernorm_affine", "eager")
def layernorm_affine_eager(x, weight, bias, eps):
    return F.layer_norm(x, x.shape[-1:], weight, bias, eps)


@register("residual_layernorm_affine", "eager")
def residual_layernorm_affine_eager(x, gate, y, weight, bias, eps):
    x = gated_residual_eager(x, gate, y)
    return x, layernorm_affine_eager(x, weight, bias, eps)


register("gemm", "torch")(F.linear)


# ---------------------------------------------------------------------------------------------
# Optional backends, registered on first use
# ---------------------------------------------------------------------------------------------
def _load_triton():
    try:
        from .kernels import backends  # noqa: F401  (registers the "triton" backends)
    except ImportError as e:
        raise MovaInputError(f"--kernels triton needs Triton ({e}): pip install triton, or use "
                             "--kernels sdpa") from None


def _load_flash_attn():
    try:
        from flash_attn import flash_attn_func
    except ImportError:
        raise MovaInputError("--kernels flash-attn needs the flash-attn package (not installed): "
                             "install it on a CUDA machine, or use --kernels sdpa") from None
    register("attention", "flash-attn")(lambda q, k, v: flash_attn_func(q, k, v))


def _load_cudnn_fp8():
    from .attention_cudnn import PIP_NAME, attention_cudnn_fp8, available
    ok, why = available()
    if not ok:
        raise MovaInputError(f"--kernels cudnn-fp8attn needs cuDNN's fp8 attention ({why}): "
                             f"pip install {PIP_NAME} (it uses torch's cuDNN) on a machine with "
                             "an sm_90+ GPU, or use --kernels sdpa")
    register("attention", "cudnn-fp8")(attention_cudnn_fp8)


KERNEL_SETS = {
    "reference": {"attention": "sdpa", "rope_interleaved": "float64", "norm": "eager"},
    "sdpa": {"attention": "sdpa", "rope_interleaved": "float32", "norm": "eager"},
    "triton": {"attention": "sdpa", "rope_interleaved": "float32", "norm": "triton",
               "fused": "triton", "loader": _load_triton},
    "flash-attn": {"attention": "flash-attn", "rope_interleaved": "float32", "norm": "eager",
                   "loader": _load_flash_attn},
    "triton-int8attn": {"attention": "int8", "rope_interleaved": "float32", "norm": "triton",
                        "fused": "int8", "loader": _load_triton},
    "cudnn-fp8attn": {"attention": "cudnn-fp8", "rope_interleaved": "float32", "norm": "eager",
                      "loader": _load_cudnn_fp8},
}


@dataclass(frozen=True)
class Ops:
    name: str
    attention: Callable
    rope_interleaved: Callable
    self_attention: Callable
    cross_attention: Callable
    norm_modulate: Callable
    gated_residual: Callable
    layernorm_affine: Callable
    residual_layernorm_affine: Callable
    gemm: Callable


def resolve(kernels: str = "reference", wrap_attention: Callable | None = None) -> Ops:
    """The Ops of a kernel set. wrap_attention(fn) -> fn, when given, wraps the plain attention
    backend before the composed kinds are built on it (the meta-device plan uses it)."""
    if kernels not in KERNEL_SETS:
        raise MovaInputError(f"unknown --kernels '{kernels}': choose one of "
                             f"{', '.join(KERNEL_SETS)}")
    chosen = KERNEL_SETS[kernels]
    if "loader" in chosen:
        chosen["loader"]()
    attention = _REGISTRY["attention"][chosen["attention"]]
    if wrap_attention is not None:
        attention = wrap_attention(attention)
    rope = _REGISTRY["rope_interleaved"][chosen["rope_interleaved"]]
    norm = chosen["norm"]
    if "fused" in chosen:
        self_attention = _REGISTRY["self_attention"][chosen["fused"]]
        cross_attention = _REGISTRY["cross_attention"][chosen["fused"]]
    else:
        self_attention = compose_self_attention(rope, attention)
        cross_attention = compose_cross_attention(attention)
    return Ops(name=kernels, attention=attention, rope_interleaved=rope,
               self_attention=self_attention, cross_attention=cross_attention,
               norm_modulate=_REGISTRY["norm_modulate"][norm],
               gated_residual=_REGISTRY["gated_residual"][norm],
               layernorm_affine=_REGISTRY["layernorm_affine"][norm],
               residual_layernorm_affine=_REGISTRY["residual_layernorm_affine"][norm],
               gemm=_REGISTRY["gemm"]["torch"])
