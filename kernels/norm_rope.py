"""q/k RMSNorm across heads + RoPE in one pass over the tensor: the prologue of every attention.

Each attention of MOVA first normalises its q and k over all heads and rotates them:

    n   = round(x * rstd * w)          rstd = 1 / sqrt(mean(x^2) + eps) per token, over H*D (fp32)
    out = round(rotate(n))             pairs (a, b) -> (a c - b s, a s + b c), in fp32

with `round` the activation dtype's rounding, where the eager path (mova_rt.ops.norm_rope_eager)
rounds. The pairs are
- ROPE_INTERLEAVED (the DiTs' self-attention): channels (2j, 2j + 1) of each head, cos/sin of
  pair j for the token from fp32 tables [L, D/2] (the reference's float64 angles rounded to fp32:
  the `sdpa` kernel set's RoPE);
- ROPE_ROTATE_HALF (the bridge): channels (j, j + D/2), cos/sin from the reference's tables in the
  activation dtype (their two halves are equal, so [L, D/2] views of them);
- ROPE_NONE (text cross-attention): the norm alone.

One program per token: it reads the token's H*D values once, reduces the sum of squares, and
writes the normalised, rotated row once, so a [43,120, 5,120] bf16 tensor costs one read and one
write (0.88 GB; ~0.25 ms at an H200's copy rate). Before this the eager path made five passes and
the first fused attention kernel redid it inside its key loop for every query block.

Layouts: x [B, L, H, D] with any strides whose last dim is contiguous and whose heads are adjacent
(stride of H = D: views of a projection [B, L, H*D], also of a fused q|k|v [B, L, 3*H*D]); w
[H*D]; cos/sin [L, D/2] with any row stride; out [B, L, H, D] contiguous in x's dtype. bf16 only
(other dtypes take the eager path in the backend).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._triton import round_bf16

ROPE_NONE, ROPE_INTERLEAVED, ROPE_ROTATE_HALF = 0, 1, 2


@triton.jit
def _norm_rope_kernel(X, W, COS, SIN, OUT,                          # pointers
                      L, stride_xb, stride_xl, stride_tab, eps,    # sizes, strides, meta
                      HEADS: tl.constexpr, HEAD_DIM: tl.constexpr, ROPE: tl.constexpr,
                      BLOCK: tl.constexpr):
    """One token: its H*D values read once as one contiguous row (vectorised loads), arranged as
    BLOCK pairs (a, b) with pair p = head * D/2 + j (BLOCK = the next power of two of H*D/2, the
    padding masked), normalised over the token and rotated pair by pair, written back as a
    contiguous row."""
    HALF: tl.constexpr = HEAD_DIM // 2
    N: tl.constexpr = HEADS * HEAD_DIM
    row = tl.program_id(0).to(tl.int64)
    bi = row // L                                    # once per program, not per element
    li = row - bi * L
    c = tl.arange(0, 2 * BLOCK)
    ok = c < N
    x = tl.load(X + bi * stride_xb + li * stride_xl + c, mask=ok, other=0.0).to(tl.float32)
    w = tl.load(W + c, mask=ok, other=0.0).to(tl.float32)
    # RMSNorm over the whole token; IEEE division and sqrt once per row (a plain `/` is the
    # approximate div.full on GPUs).
    mean = tl.math.div_rn(tl.sum(x * x, axis=0), N * 1.0)
    rstd = tl.math.div_rn(1.0, tl.math.sqrt_rn(mean + eps))
    x = round_bf16(x * rstd * w)
    if ROPE != 0:
        if ROPE == 2:                                # channel j pairs with j + D/2 in each head
            x = tl.permute(tl.reshape(x, [2 * BLOCK // HEAD_DIM, 2, HALF]), [0, 2, 1])
        a, b = tl.split(tl.reshape(x, [BLOCK, 2]))   # the pairs: (2j, 2j + 1) for interleaved
        j = tl.arange(0, BLOCK) % HALF               # a power of two: a mask
        keep = tl.arange(0, BLOCK) < N // 2
        cos = tl.load(COS + li * stride_tab + j, mask=keep, other=1.0).to(tl.float32)
        sin = tl.load(SIN + li * stride_tab + j, mask=keep, other=0.0).to(tl.float32)
        x = tl.reshape(tl.join(round_bf16(a * cos - b * sin), round_bf16(a * sin + b * cos)),
                       [2 * BLOCK])
        if ROPE == 2:
            x = tl.reshape(tl.permute(tl.reshape(x, [2 * BLOCK // HEAD_DIM, HALF, 2]),
                                      [0, 2, 1]), [2 * BLOCK])
    tl.store(OUT + row * N + c, x.to(OUT.dtype.element_ty), mask=ok)


def _launch(x, w, eps, mode, cos, sin) -> torch.Tensor:
    bsz, seq, heads, d = x.shape
    out = torch.empty((bsz, seq, heads, d), dtype=x.dtype, device=x.device)
    if bsz * seq == 0:
        return out
    block = triton.next_power_of_2(heads * d // 2)
    tab = cos if cos is not None else w                  # ROPE_NONE: never read
    _norm_rope_kernel[(bsz * seq,)](
        x, w, tab, sin if sin is not None else w, out, seq, x.stride(0), x.stride(1),
        cos.stride(0) if cos is not None else 0, eps, HEADS=heads, HEAD_DIM=d, ROPE=mode,
        BLOCK=block, num_warps=8 if block >= 2048 else 4)
    return out


@torch.library.custom_op("mova_rt::norm_rope", mutates_args=())
def _norm_rope_op(x: torch.Tensor, w: torch.Tensor, eps: float, mode: int,
                  cos: torch.Tensor | None, sin: torch.Tensor | None) -> torch.Tensor:
    return _launch(x, w, eps, mode, cos, sin)


@_norm_rope_op.register_fake
def _(x, w, eps, mode, cos, sin):
    return x.new_empty(x.shape)


def _check(x, w, mode, cos, sin):
    if x.dim() != 4 or x.dtype != torch.bfloat16:
        raise ValueError(f"norm_rope: x must be bf16 [B, L, H, D], got {x.dtype} "
                         f"{tuple(x.shape)}")
    bsz, seq, heads, d = x.shape
    if x.stride(3) != 1 or x.stride(2) != d or d % 2 or d & (d - 1):
        raise ValueError("norm_rope: heads must be adjacent and contiguous (a view of [B, L, "
                         f"H*D]) with D a power of two; strides {x.stride()}, D {d}")
    if w.shape != (heads * d,) or not w.is_contiguous():
        raise ValueError(f"norm_rope: weight must be [{heads * d}], got {tuple(w.shape)}")
    if mode != ROPE_NONE:
        for t in (cos, sin):
            if t is None or t.dim() != 2 or t.shape[0] != seq or t.shape[1] < d // 2 or \
                    t.stride(1) != 1:
                raise ValueError(f"norm_rope: cos/sin must be [L={seq}, >= {d // 2}] rows")


def norm_rope(x: torch.Tensor, w: torch.Tensor, eps: float, mode: int = ROPE_NONE,
              cos: torch.Tensor | None = None, sin: torch.Tensor | None = None) -> torch.Tensor:
    """RMSNorm of x [B, L, H, D] over H*D with weight w, then RoPE `mode` with cos/sin [L, D/2]
    (fp32 for the interleaved pairs, the activation dtype for rotate-half): see the module
    docstring. Returns a new contiguous [B, L, H, D] bf16 tensor."""
    _check(x, w, mode, cos, sin)
    if mode != ROPE_NONE:
        cos, sin = cos[:, : x.shape[3] // 2], sin[:, : x.shape[3] // 2]
    return _norm_rope_op(x, w, float(eps), int(mode), cos, sin)


def _signature(mode: int) -> dict:
    tab = "*fp32" if mode == ROPE_INTERLEAVED else "*bf16"
    return {"X": "*bf16", "W": "*bf16", "COS": tab, "SIN": tab, "OUT": "*bf16", "L": "i32",
            "stride_xb": "i64", "stride_xl": "i64", "stride_tab": "i32", "eps": "fp32",
            "HEADS": "constexpr", "HEAD_DIM": "constexpr", "ROPE": "constexpr",
            "BLOCK": "constexpr"}


# MOVA's widths: video 40 x 128 (5,120), audio 12 x 128 (1,536), each RoPE variant; for the
# compile checks of tests/test_kernels_norm_rope.py
COMPILE_CASES = [
    {"name": f"norm_rope_h{h}_rope{mode}", "kernel": _norm_rope_kernel,
     "signature": _signature(mode),
     "constexprs": {"HEADS": h, "HEAD_DIM": 128, "ROPE": mode,
                    "BLOCK": triton.next_power_of_2(h * 64)},
     "num_warps": 8 if h * 64 >= 2048 else 4,
     # MOVA's strides and pointers are multiples of 16 elements, as the JIT will see them
     "divisible": ("X", "W", "COS", "SIN", "OUT", "stride_xb", "stride_xl", "stride_tab")}
    for h in (40, 12) for mode in (ROPE_NONE, ROPE_INTERLEAVED, ROPE_ROTATE_HALF)]
