"""Backend registry: one table per op kind, resolved once when a model is built.

A kernel set name (`--kernels`) selects one backend per op kind. Modules receive an `Ops` object at
construction and call its functions directly: no lookup per call.

Op kinds and their contracts (activations [B, L, ...] in the model dtype):
- attention(q, k, v) -> out: q [B, Lq, H, D], k/v [B, Lk, H, D]; full softmax attention, scale
  1/sqrt(D); out [B, Lq, H, D].
- rope_interleaved(x, cos, sin) -> x': x [B, L, H, D], cos/sin [L, D/2] float64; rotates the pairs
  (2i, 2i+1), rounds once to x.dtype.
- norm_rope(x, w, eps, rope, rotate_half) -> x': RMSNorm of x [B, L, H, D] over all heads (weight
  w [H*D]), rounded, then RoPE with the tables of `rope` (its `tables()`; None: no RoPE), rounded:
  interleaved pairs for the self-attention, rotate-half (rotate_half=True) for the bridge. The
  prologue of every attention, for q and for k.
- self_attention(q, k, v, w_q, w_k, eps, rope: InterleavedRope) -> out: q/k the raw projections
  (views of [B, L, H*D]); norm_rope of each, attention. The DiTs' self-attention.
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
  `rope_apply`), attention through PyTorch SDPA (the reference's own fallback). Bit-exact.
- `auto` (the default of generate, bench and build): per op kind, the fastest backend that keeps
  the reference's bf16 fidelity, chosen when the model is built from the GPU measurements
  committed for this kind of GPU (mova_rt/autoselect.py); an op no measurement covers, and every
  op on a CPU, keeps its reference backend.
- `sdpa`: the reference with RoPE in float32 (differs by at most one bf16 ulp on rare elements).
- `triton`: mova-rt's Triton kernels (bf16; fp32 runs take the exact path): q/k norm + RoPE in one
  pass, the adaLN / residual row kernels.
- `flash-attn`: the flash-attn package's attention (optional import) with float32 RoPE.
- `fp8attn`: auto's choices with mova-rt's 8-bit attention (kernels/attention_fp8.py: q, k, v and
  the probabilities in e4m3, both products on fp8 tensor cores; about 5% of the attention output
  on random inputs, approximate). With `--precision fp8`, the full 8-bit path.
- `triton-int8attn`: the Triton norm kernels and 8-bit attention (kernels/attention_int8.py: q
  and k in int8 per block, k smoothed, p and v bf16) with q/k RMSNorm and RoPE fused into the
  quantizing prologue; approximate (about 1% of the attention output on random inputs).
- `cudnn-fp8attn`: as `sdpa`, with cuDNN's fp8 attention (mova_rt/attention_cudnn.py, optional
  nvidia-cudnn-frontend, sm_90+): q, k, v, P and the output in e4m3; approximate (about 6% of the
  attention output on random inputs, the fp8 output alone 2.6%).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

from .errors import MovaInputError
from .rope import apply_rope_rotate_half

KINDS = ("attention", "rope_interleaved", "norm_rope", "self_attention", "cross_attention",
         "norm_modulate", "gated_residual", "layernorm_affine", "residual_layernorm_affine", "gemm")
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


# cuDNN's sm90 flash kernel first (the fastest measured at MOVA's shapes, 566 TFLOP/s on an
# H200), then FlashAttention-2; never the memory-efficient or math kernels (3x and 20x slower),
# which SDPA would otherwise take silently when the first ones refuse an input: here it raises.
SDPA_PRIORITY = (SDPBackend.CUDNN_ATTENTION, SDPBackend.FLASH_ATTENTION)


@register("attention", "sdpa-priority")
def attention_sdpa_priority(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """SDPA restricted to SDPA_PRIORITY, in that order, for 16-bit activations on a GPU; other
    dtypes and devices (fp32 runs, the CPU) take SDPA's own choice, as `sdpa`."""
    if not q.is_cuda or q.dtype not in (torch.bfloat16, torch.float16):
        return attention_sdpa(q, k, v)
    with sdpa_kernel(list(SDPA_PRIORITY), set_priority=True):
        return attention_sdpa(q, k, v)


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


def norm_rope_eager(rope_fn: Callable) -> Callable:
    """q/k RMSNorm over all heads, then RoPE from `rope.tables()` (interleaved pairs through
    `rope_fn`; rotate-half in fp32 with the activation-dtype tables; None: no RoPE), each rounded
    to the activation dtype as the reference does."""
    def norm_rope(x, w, eps, rope, rotate_half=False):
        x = rms_norm_heads(x, w, eps)
        if rope is None:
            return x
        if rotate_half:
            return apply_rope_rotate_half(x, *rope.tables())
        return rope_fn(x, *rope.tables())
    return norm_rope


register("norm_rope", "float64")(norm_rope_eager(rope_interleaved_f64))
register("norm_rope", "float32")(norm_rope_eager(rope_interleaved_f32))


def compose_self_attention(norm_rope: Callable, attention_fn: Callable) -> Callable:
    def self_attention(q, k, v, w_q, w_k, eps, rope):
        return attention_fn(norm_rope(q, w_q, eps, rope), norm_rope(k, w_k, eps, rope), v)
    return self_attention


def compose_cross_attention(norm_rope: Callable, attention_fn: Callable) -> Callable:
    def cross_attention(q, k, v, w_q, w_k, eps, q_rope=None, k_rope=None):
        return attention_fn(norm_rope(q, w_q, eps, q_rope, True),
                            norm_rope(k, w_k, eps, k_rope, True), v)
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


_NORMS = ("norm_modulate", "gated_residual", "layernorm_affine", "residual_layernorm_affine")
_EAGER = {"attention": "sdpa", "rope_interleaved": "float64", "norm_rope": "float64",
          **{kind: "eager" for kind in _NORMS}}

# A kernel set: the backend of each op kind (kinds not named: the reference's), the fused
# attention of `fused` (norm + RoPE + attention in one kernel) when it has one, and the loader
# of its optional package. `auto` is resolved per device (mova_rt/autoselect.py).
KERNEL_SETS = {
    "reference": {},
    "sdpa": {"rope_interleaved": "float32", "norm_rope": "float32"},
    "triton": {"attention": "triton", "rope_interleaved": "float32", "norm_rope": "triton",
               **{kind: "triton" for kind in _NORMS}, "loader": _load_triton},
    # auto's choices with mova-rt's 8-bit attention (e4m3 for QK and PV; approximate)
    "fp8attn": {"base": "auto", "attention": "fp8", "loader": _load_triton},
    "flash-attn": {"attention": "flash-attn", "rope_interleaved": "float32",
                   "norm_rope": "float32", "loader": _load_flash_attn},
    "triton-int8attn": {"attention": "int8", "rope_interleaved": "float32", "norm_rope": "triton",
                        **{kind: "triton" for kind in _NORMS}, "fused": "int8",
                        "loader": _load_triton},
    # auto's choices with cuDNN's fp8 attention (mova_rt/attention_cudnn.py; approximate)
    "cudnn-fp8attn": {"base": "auto", "attention": "cudnn-fp8", "loader": _load_cudnn_fp8},
    "auto": None,
}


@dataclass(frozen=True)
class Ops:
    name: str
    attention: Callable
    rope_interleaved: Callable
    norm_rope: Callable
    self_attention: Callable
    cross_attention: Callable
    norm_modulate: Callable
    gated_residual: Callable
    layernorm_affine: Callable
    residual_layernorm_affine: Callable
    gemm: Callable
    choices: dict = field(default_factory=dict)    # op kind -> backend name (reports, tests)


def resolve(kernels: str = "reference", wrap_attention: Callable | None = None,
            device=None) -> Ops:
    """The Ops of a kernel set, for a model that runs on `device` (None: the CPU); `auto` picks
    per op kind from the measurements committed for this GPU (mova_rt/autoselect.py).
    wrap_attention(fn) -> fn, when given, wraps the plain attention backend before the composed
    kinds are built on it (the meta-device plan uses it)."""
    if kernels not in KERNEL_SETS:
        raise MovaInputError(f"unknown --kernels '{kernels}': choose one of "
                             f"{', '.join(KERNEL_SETS)}")
    if kernels == "auto":
        from .autoselect import choose
        chosen = choose(device)
    else:
        chosen = dict(KERNEL_SETS[kernels])
        if chosen.pop("base", None) == "auto":
            from .autoselect import choose
            chosen = {**choose(device), **chosen}
    if "loader" in chosen:
        chosen.pop("loader")()
    elif any(v == "triton" for v in chosen.values()):
        _load_triton()
    fused = chosen.pop("fused", None)
    picks = {**_EAGER, **chosen}
    # kinds outside the registry (auto's "qkv": a model transform, mova_rt/fuse.py) are choices
    fn = {kind: _REGISTRY[kind][name] for kind, name in picks.items() if kind in _REGISTRY}
    attention = fn["attention"]
    if wrap_attention is not None:
        attention = wrap_attention(attention)
    if fused is not None:
        self_attention = _REGISTRY["self_attention"][fused]
        cross_attention = _REGISTRY["cross_attention"][fused]
    else:
        self_attention = compose_self_attention(fn["norm_rope"], attention)
        cross_attention = compose_cross_attention(fn["norm_rope"], attention)
    if fused is not None:
        picks["attention"] = f"{fused} (norm + RoPE fused)"
    return Ops(name=kernels, attention=attention, rope_interleaved=fn["rope_interleaved"],
               norm_rope=fn["norm_rope"], self_attention=self_attention,
               cross_attention=cross_attention, norm_modulate=fn["norm_modulate"],
               gated_residual=fn["gated_residual"], layernorm_affine=fn["layernorm_affine"],
               residual_layernorm_affine=fn["residual_layernorm_affine"],
               gemm=_REGISTRY["gemm"]["torch"], choices=picks)
