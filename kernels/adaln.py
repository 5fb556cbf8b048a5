"""Row kernels of a DiT block: LayerNorm + adaLN modulation, gated residual, affine LayerNorm and
the fusion of the last two. Memory-bound: each program holds whole rows in registers (one row per
program on GPUs at MOVA's widths), reads each input once and writes each output once.

Shapes: x, y [B, L, D] (bf16 or fp32, last dim contiguous; rows may be strided in B and L);
shift, scale, gate [B or 1, 1, D]; weight, bias [D]; every tensor in x's dtype. Outputs are new
contiguous [B, L, D] tensors in x's dtype.

    layernorm_modulate:  n = LN(x) (no affine; fp32 stats, rounded once to x.dtype)
                         out = round(n * (1 + scale) + shift)           (fp32 math, one rounding)
    gated_residual:      out = round(x + round(gate * y))                (eager bf16: two roundings)
    layernorm_affine:    out = round((x - mean) * rstd * weight + bias)  (one rounding)
    gated_residual_layernorm_affine: x_new = gated_residual(x, gate, y) (gate None: round(x + y)),
                         normed = layernorm_affine(x_new); one pass, returns (x_new, normed).
    layernorm_modulate_fp8, layernorm_affine_fp8 (bf16 only): the same rows quantized for the fp8
                         GEMMs that consume them (mova_rt/fp8/quantize.py): e4m3 [B, L, D] and one
                         fp32 scale per token [B, L], s = max|row| / 448, q = e4m3(row / s); the
                         bf16 rows never reach memory (no separate quantization pass).

with mean = sum(x) / D, var = sum((x - mean)^2) / D, rstd = 1 / sqrt(var + eps), all in fp32.
Each kernel rounds to x.dtype exactly where the eager PyTorch code (the `*_ref` functions) does,
so in bf16 it matches the reference bit for bit except where the fp32 summation order tips a
rounding (about 1e-4 of elements, by 1 ulp). On GPUs an fp32 `a * b + c` may become an FMA.
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

from ._triton import INTERPRET, round_bf16, round_e4m3

DTYPES = (torch.bfloat16, torch.float32)
FP8 = torch.float8_e4m3fn


# --------------------------------------------------------------------------------------------
# 1. Pure-PyTorch references (the model's eager code; also the CPU fallback)
# --------------------------------------------------------------------------------------------
def layernorm_modulate_ref(x, shift, scale, eps: float):
    n = F.layer_norm(x, (x.shape[-1],), eps=eps)
    return (n.float() * (1 + scale.float()) + shift.float()).to(x.dtype)


def layernorm_modulate_fp8_ref(x, shift, scale, eps: float):
    """The bf16 result quantized per token: quantize_rows (e4m3, scale amax / 448) of it."""
    from ..fp8.quantize import quantize_rows
    return quantize_rows(layernorm_modulate_ref(x, shift, scale, eps))


def layernorm_affine_fp8_ref(x, weight, bias, eps: float):
    from ..fp8.quantize import quantize_rows
    return quantize_rows(layernorm_affine_ref(x, weight, bias, eps))


def gated_residual_ref(x, gate, y):
    return x + gate * y


def layernorm_affine_ref(x, weight, bias, eps: float):
    return F.layer_norm(x, (x.shape[-1],), weight, bias, eps)


def gated_residual_layernorm_affine_ref(x, gate, y, weight, bias, eps: float):
    x_new = x + y if gate is None else x + gate * y
    return x_new, F.layer_norm(x_new, (x.shape[-1],), weight, bias, eps)


# --------------------------------------------------------------------------------------------
# 2. Triton kernels: ROWS rows per program, each row whole in registers ([ROWS, BLOCK_D] blocks)
# --------------------------------------------------------------------------------------------
# Launch config. Real GPUs: one row per program up to 2048 wide (more for narrow rows), more
# warps for wider rows. The interpreter pays Python overhead per program and per op, not per
# element, so it takes up to 32K elements per program (same code, only the constexpr differs).
GPU_BLOCK_ELEMS, INTERPRET_BLOCK_ELEMS, MAX_ROWS = 2048, 32768, 16


def _config(d: int, interpret: bool = INTERPRET) -> dict:
    block_d = triton.next_power_of_2(d)
    elems = INTERPRET_BLOCK_ELEMS if interpret else GPU_BLOCK_ELEMS
    return dict(ROWS=max(1, min(MAX_ROWS, elems // block_d)), BLOCK_D=block_d,
                num_warps=4 if block_d <= 2048 else 8 if block_d <= 8192 else 16)


def _launch(kernel, x: torch.Tensor, *args, **constexprs) -> None:
    """Launch `kernel` over the B * L rows of x with sizes (n_rows, L, D) after the pointers."""
    b, l, d = x.shape
    config = _config(d)
    if b * l:
        ptrs = [a for a in args if isinstance(a, torch.Tensor)]
        rest = args[len(ptrs):]
        kernel[(triton.cdiv(b * l, config["ROWS"]),)](*ptrs, b * l, l, d, *rest, **constexprs,
                                                     **config)


@triton.jit
def _round(v, DTYPE: tl.constexpr):
    """Round fp32 `v` to DTYPE (nearest even), kept in fp32 so later math sees the rounded value
    (see _triton.round_bf16 for why this is bit arithmetic on every target)."""
    if DTYPE == tl.bfloat16:
        v = round_bf16(v)
    return v


@triton.jit
def _block(n_rows, D, ROWS: tl.constexpr, BLOCK_D: tl.constexpr):
    """This program's rows [ROWS, 1] (int64: offsets may pass 2^31), columns [1, BLOCK_D] and
    the [ROWS, BLOCK_D] mask."""
    row = tl.program_id(0).to(tl.int64) * ROWS + tl.arange(0, ROWS)[:, None]
    cols = tl.arange(0, BLOCK_D)[None, :]
    return row, cols, (row < n_rows) & (cols < D)


@triton.jit
def _normalize(x, mask, D, eps):
    """(x - mean) * rstd per row of fp32 [ROWS, BLOCK_D] (masked lanes ignored, returned as 0)."""
    n = D.to(tl.float32)
    # IEEE division and sqrt (per row, so free): a plain `/` is the approximate div.full on GPUs.
    mean = tl.math.div_rn(tl.sum(x, axis=1, keep_dims=True), n)
    diff = tl.where(mask, x - mean, 0.0)
    var = tl.math.div_rn(tl.sum(diff * diff, axis=1, keep_dims=True), n)
    rstd = tl.math.div_rn(1.0, tl.math.sqrt_rn(var + eps))
    return diff * rstd


@triton.jit
def _layernorm_modulated(X, SHIFT, SCALE, n_rows, L, D, stride_xb, stride_xl, stride_shb,
                         stride_scb, eps, ROWS: tl.constexpr, BLOCK_D: tl.constexpr):
    """This program's rows of round(LN(x) * (1 + scale) + shift) (fp32 holding x.dtype values)."""
    row, cols, mask = _block(n_rows, D, ROWS, BLOCK_D)
    b = row // L
    DTYPE: tl.constexpr = X.dtype.element_ty
    x = tl.load(X + b * stride_xb + (row % L) * stride_xl + cols, mask=mask, other=0.0).to(tl.float32)
    shift = tl.load(SHIFT + b * stride_shb + cols, mask=mask, other=0.0).to(tl.float32)
    scale = tl.load(SCALE + b * stride_scb + cols, mask=mask, other=0.0).to(tl.float32)
    n = _round(_normalize(x, mask, D, eps), DTYPE)   # F.layer_norm rounds once
    return row, cols, mask, _round(n * (1.0 + scale) + shift, DTYPE)


@triton.jit
def _store_rows_e4m3(OUT, S, row, cols, mask, v, n_rows, D):
    """Rows v (fp32 holding the activation dtype's values) as e4m3 with one fp32 scale per row,
    amax / 448: quantize_rows of mova_rt/fp8/quantize.py, IEEE divisions and all."""
    amax = tl.max(tl.where(mask, tl.abs(v), 0.0), axis=1, keep_dims=True)       # [ROWS, 1]
    s = tl.where(amax > 0, tl.math.div_rn(amax, tl.full(amax.shape, 448.0, tl.float32)), 1.0)
    q = round_e4m3(tl.minimum(tl.maximum(tl.math.div_rn(v, s + tl.zeros_like(v)), -448.0), 448.0))
    tl.store(OUT + row * D + cols, q.to(OUT.dtype.element_ty), mask=mask)
    tl.store(S + row, s, mask=row < n_rows)


@triton.jit
def _layernorm_modulate_kernel(
        X, SHIFT, SCALE, OUT, S,                                    # pointers (S: if FP8_OUT)
        n_rows, L, D,                                               # sizes
        stride_xb, stride_xl, stride_shb, stride_scb,               # strides (last dim: 1)
        eps, FP8_OUT: tl.constexpr, ROWS: tl.constexpr, BLOCK_D: tl.constexpr):  # meta
    row, cols, mask, out = _layernorm_modulated(X, SHIFT, SCALE, n_rows, L, D, stride_xb,
                                                stride_xl, stride_shb, stride_scb, eps, ROWS,
                                                BLOCK_D)
    if FP8_OUT:
        _store_rows_e4m3(OUT, S, row, cols, mask, out, n_rows, D)
    else:
        tl.store(OUT + row * D + cols, out.to(OUT.dtype.element_ty), mask=mask)


@triton.jit
def _gated_residual_kernel(
        X, GATE, Y, OUT,                                            # pointers
        n_rows, L, D,                                               # sizes
        stride_xb, stride_xl, stride_gb, stride_yb, stride_yl,      # strides (last dim: 1)
        ROWS: tl.constexpr, BLOCK_D: tl.constexpr):                  # meta
    row, cols, mask = _block(n_rows, D, ROWS, BLOCK_D)
    b, l = row // L, row % L
    DTYPE: tl.constexpr = OUT.dtype.element_ty
    x = tl.load(X + b * stride_xb + l * stride_xl + cols, mask=mask, other=0.0).to(tl.float32)
    y = tl.load(Y + b * stride_yb + l * stride_yl + cols, mask=mask, other=0.0).to(tl.float32)
    gate = tl.load(GATE + b * stride_gb + cols, mask=mask, other=0.0).to(tl.float32)
    out = _round(x + _round(gate * y, DTYPE), DTYPE)
    tl.store(OUT + row * D + cols, out.to(DTYPE), mask=mask)


@triton.jit
def _layernorm_affined(X, W, B, n_rows, L, D, stride_xb, stride_xl, eps, ROWS: tl.constexpr,
                       BLOCK_D: tl.constexpr):
    """This program's rows of round(LN(x) * weight + bias) (fp32 holding x.dtype values)."""
    row, cols, mask = _block(n_rows, D, ROWS, BLOCK_D)
    x = tl.load(X + (row // L) * stride_xb + (row % L) * stride_xl + cols, mask=mask,
                other=0.0).to(tl.float32)
    w = tl.load(W + cols, mask=cols < D, other=0.0).to(tl.float32)
    bias = tl.load(B + cols, mask=cols < D, other=0.0).to(tl.float32)
    return row, cols, mask, _round(_normalize(x, mask, D, eps) * w + bias, X.dtype.element_ty)


@triton.jit
def _layernorm_affine_kernel(
        X, W, B, OUT, S,                                            # pointers (S: if FP8_OUT)
        n_rows, L, D,                                               # sizes
        stride_xb, stride_xl,                                       # strides (last dim: 1)
        eps, FP8_OUT: tl.constexpr, ROWS: tl.constexpr, BLOCK_D: tl.constexpr):  # meta
    row, cols, mask, out = _layernorm_affined(X, W, B, n_rows, L, D, stride_xb, stride_xl, eps,
                                              ROWS, BLOCK_D)
    if FP8_OUT:
        _store_rows_e4m3(OUT, S, row, cols, mask, out, n_rows, D)
    else:
        tl.store(OUT + row * D + cols, out.to(OUT.dtype.element_ty), mask=mask)


@triton.jit
def _gated_residual_layernorm_affine_kernel(
        X, GATE, Y, W, B, X_OUT, N_OUT,                             # pointers (GATE: if HAS_GATE)
        n_rows, L, D,                                               # sizes
        stride_xb, stride_xl, stride_gb, stride_yb, stride_yl,      # strides (last dim: 1)
        eps, HAS_GATE: tl.constexpr, ROWS: tl.constexpr, BLOCK_D: tl.constexpr):  # meta
    row, cols, mask = _block(n_rows, D, ROWS, BLOCK_D)
    b, l = row // L, row % L
    DTYPE: tl.constexpr = X_OUT.dtype.element_ty
    x = tl.load(X + b * stride_xb + l * stride_xl + cols, mask=mask, other=0.0).to(tl.float32)
    y = tl.load(Y + b * stride_yb + l * stride_yl + cols, mask=mask, other=0.0).to(tl.float32)
    if HAS_GATE:
        gate = tl.load(GATE + b * stride_gb + cols, mask=mask, other=0.0).to(tl.float32)
        y = _round(gate * y, DTYPE)
    x = _round(x + y, DTYPE)                                        # masked lanes stay 0
    tl.store(X_OUT + row * D + cols, x.to(DTYPE), mask=mask)
    w = tl.load(W + cols, mask=cols < D, other=0.0).to(tl.float32)
    bias = tl.load(B + cols, mask=cols < D, other=0.0).to(tl.float32)
    out = _round(_normalize(x, mask, D, eps) * w + bias, DTYPE)
    tl.store(N_OUT + row * D + cols, out.to(DTYPE), mask=mask)


# --------------------------------------------------------------------------------------------
# 3. Launchers (check inputs, allocate, set the grid) registered as torch custom ops
# --------------------------------------------------------------------------------------------
def _check_rows(name: str, x: torch.Tensor, *others: torch.Tensor) -> None:
    """x [B, L, D] in bf16/fp32 with a contiguous last dim; others [B, L, D] alike."""
    if x.dim() != 3:
        raise ValueError(f"{name}: x must be [B, L, D], got shape {tuple(x.shape)}")
    if x.dtype not in DTYPES:
        raise ValueError(f"{name}: dtype must be bfloat16 or float32, got {x.dtype}")
    for t in others:
        if t.shape != x.shape:
            raise ValueError(f"{name}: expected shape {tuple(x.shape)}, got {tuple(t.shape)}")
    _check_like(name, x, *others)


def _check_like(name: str, x: torch.Tensor, *others: torch.Tensor) -> None:
    """Same dtype and device as x, last dim contiguous (x included)."""
    for t in (x, *others):
        if t.dtype != x.dtype or t.device != x.device:
            raise ValueError(f"{name}: all tensors must match x ({x.dtype}, {x.device}), "
                             f"got {t.dtype} on {t.device}")
        if t.stride(-1) != 1 and t.shape[-1] != 1:
            raise ValueError(f"{name}: last dim must be contiguous (stride 1), got strides "
                             f"{tuple(t.stride())}")


def _per_batch(name: str, x: torch.Tensor, v: torch.Tensor, what: str) -> torch.Tensor:
    """A [B or 1, 1, D] modulation tensor expanded to [B, 1, D] (stride 0 over B when 1)."""
    b, _, d = x.shape
    if v.dim() != 3 or v.shape[1] != 1 or v.shape[2] != d or v.shape[0] not in (1, b):
        raise ValueError(f"{name}: {what} must be [{b} or 1, 1, {d}], got {tuple(v.shape)}")
    _check_like(name, x, v)
    return v.expand(b, 1, d)


def _affine(name: str, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor) -> None:
    for what, v in (("weight", weight), ("bias", bias)):
        if v.shape != (x.shape[-1],):
            raise ValueError(f"{name}: {what} must be [{x.shape[-1]}], got {tuple(v.shape)}")
    _check_like(name, x, weight, bias)


def _empty(x: torch.Tensor) -> torch.Tensor:
    return torch.empty(x.shape, dtype=x.dtype, device=x.device)


# The launchers, registered as custom ops: opaque to torch.compile, the fakes give the outputs.
@torch.library.custom_op("mova_rt::layernorm_modulate", mutates_args=())
def layernorm_modulate(x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor,
                       eps: float) -> torch.Tensor:
    _check_rows("layernorm_modulate", x)
    shift = _per_batch("layernorm_modulate", x, shift, "shift")
    scale = _per_batch("layernorm_modulate", x, scale, "scale")
    out = _empty(x)
    _launch(_layernorm_modulate_kernel, x, x, shift, scale, out, out,
            x.stride(0), x.stride(1), shift.stride(0), scale.stride(0), eps, FP8_OUT=False)
    return out


@torch.library.custom_op("mova_rt::gated_residual", mutates_args=())
def gated_residual(x: torch.Tensor, gate: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    _check_rows("gated_residual", x, y)
    gate = _per_batch("gated_residual", x, gate, "gate")
    out = _empty(x)
    _launch(_gated_residual_kernel, x, x, gate, y, out,
            x.stride(0), x.stride(1), gate.stride(0), y.stride(0), y.stride(1))
    return out


@torch.library.custom_op("mova_rt::layernorm_affine", mutates_args=())
def layernorm_affine(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor,
                     eps: float) -> torch.Tensor:
    _check_rows("layernorm_affine", x)
    _affine("layernorm_affine", x, weight, bias)
    out = _empty(x)
    _launch(_layernorm_affine_kernel, x, x, weight, bias, out, out, x.stride(0), x.stride(1), eps,
            FP8_OUT=False)
    return out


def _empty_fp8(x: torch.Tensor) -> tuple:
    b, l, d = x.shape
    return (torch.empty((b, l, d), dtype=FP8, device=x.device),
            torch.empty((b, l), dtype=torch.float32, device=x.device))


def _fp8_outputs(name: str, x: torch.Tensor) -> tuple:
    """Checks x (bf16 rows: the fp8 path's activations) and allocates (e4m3 rows, row scales)."""
    _check_rows(name, x)
    if x.dtype != torch.bfloat16:
        raise ValueError(f"{name}: the fp8 path runs on bf16 activations, got {x.dtype}")
    return _empty_fp8(x)


@torch.library.custom_op("mova_rt::layernorm_modulate_fp8", mutates_args=())
def layernorm_modulate_fp8(x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor,
                           eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    name = "layernorm_modulate_fp8"
    q, s = _fp8_outputs(name, x)
    shift = _per_batch(name, x, shift, "shift")
    scale = _per_batch(name, x, scale, "scale")
    _launch(_layernorm_modulate_kernel, x, x, shift, scale, q, s,
            x.stride(0), x.stride(1), shift.stride(0), scale.stride(0), eps, FP8_OUT=True)
    return q, s


@torch.library.custom_op("mova_rt::layernorm_affine_fp8", mutates_args=())
def layernorm_affine_fp8(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor,
                         eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    q, s = _fp8_outputs("layernorm_affine_fp8", x)
    _affine("layernorm_affine_fp8", x, weight, bias)
    _launch(_layernorm_affine_kernel, x, x, weight, bias, q, s, x.stride(0), x.stride(1), eps,
            FP8_OUT=True)
    return q, s


@torch.library.custom_op("mova_rt::gated_residual_layernorm_affine", mutates_args=())
def gated_residual_layernorm_affine(x: torch.Tensor, gate: Optional[torch.Tensor], y: torch.Tensor,
                                    weight: torch.Tensor, bias: torch.Tensor,
                                    eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    name = "gated_residual_layernorm_affine"
    _check_rows(name, x, y)
    g = x if gate is None else _per_batch(name, x, gate, "gate")   # x: a placeholder pointer
    _affine(name, x, weight, bias)
    x_new, normed = _empty(x), _empty(x)
    _launch(_gated_residual_layernorm_affine_kernel, x, x, g, y, weight, bias, x_new, normed,
            x.stride(0), x.stride(1), g.stride(0), y.stride(0), y.stride(1), eps,
            HAS_GATE=gate is not None)
    return x_new, normed


@layernorm_modulate.register_fake
@gated_residual.register_fake
@layernorm_affine.register_fake
def _(x, *args):
    return _empty(x)


@gated_residual_layernorm_affine.register_fake
def _(x, *args):
    return _empty(x), _empty(x)


@layernorm_modulate_fp8.register_fake
@layernorm_affine_fp8.register_fake
def _(x, *args):
    return _empty_fp8(x)


# --------------------------------------------------------------------------------------------
# 4. Ahead-of-time compile cases at MOVA's real widths (video 5120, audio 1536), bf16
# --------------------------------------------------------------------------------------------
def _case(kernel, n_ptrs: int, n_strides: int, d: int, eps: bool = True, **extra) -> dict:
    """compile_for arguments for `kernel` at width d, bf16, with the launch config of a GPU.
    With FP8_OUT in extra, the last two pointers are the output (e4m3 or bf16) and the fp32
    row scales."""
    config = _config(d, interpret=False)
    num_warps = config.pop("num_warps")
    constexprs = {**extra, **config}
    ptrs = ["*bf16"] * n_ptrs
    if "FP8_OUT" in extra:
        ptrs[-2:] = ["*fp8e4nv" if extra["FP8_OUT"] else "*bf16", "*fp32"]
    types = ptrs + ["i32"] * (3 + n_strides) + ["fp32"] * eps
    signature = dict(zip(kernel.arg_names, types + ["constexpr"] * len(constexprs)))
    return dict(name=f"{kernel.fn.__name__}[D={d}{''.join(f',{k}={v}' for k, v in extra.items())}]",
                kernel=kernel, signature=signature, constexprs=constexprs, num_warps=num_warps)


COMPILE_CASES = [case for d in (5120, 1536) for case in (
    _case(_layernorm_modulate_kernel, 5, 4, d, FP8_OUT=False),
    _case(_gated_residual_kernel, 4, 5, d, eps=False),
    _case(_layernorm_affine_kernel, 5, 2, d, FP8_OUT=False),
    _case(_layernorm_modulate_kernel, 5, 4, d, FP8_OUT=True),
    _case(_layernorm_affine_kernel, 5, 2, d, FP8_OUT=True),
    _case(_gated_residual_layernorm_affine_kernel, 7, 5, d, HAS_GATE=True),
    _case(_gated_residual_layernorm_affine_kernel, 7, 5, d, HAS_GATE=False),
)]
