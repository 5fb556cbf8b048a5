"""cuDNN's fp8 flash attention (SDPA) through nvidia-cudnn-frontend: an optional attention backend.

attention_cudnn_fp8(q, k, v) -> out: q [B, Lq, H, D], k/v [B, Lk, H, D] bf16 (or fp16) on a CUDA
device, any strides; out [B, Lq, H, D] in q's dtype. Plain softmax attention, scale 1/sqrt(D), no
mask. The math, per batch and head (x8 = e4m3 values, s_x / d_x = scale / descale of x):

    q8 = e4m3(q * s_q), k8 = e4m3(k * s_k), v8 = e4m3(v * s_v)    # per tensor, below
    S  = (q8 k8^T) * d_q * d_k / sqrt(D)                           # fp8 tensor cores, fp32 accum.
    P  = exp(S - rowmax(S))                                        # fp32, in [0, 1]
    O  = (e4m3(P * SCALE_S) v8) * DESCALE_S * d_v / rowsum(P)      # fp8 tensor cores, fp32 accum.
    out = e4m3(O * s_o) * d_o                                      # s_o = s_v, d_o = d_v

The scale recipe (chosen here, nothing is calibrated or carried between calls):
- q, k, v: one power-of-two scale per tensor from its absolute maximum, computed on the GPU (no
  host sync): amax = m * 2^e with m in [0.5, 1) gives s = 2^(8 - e), so amax * s lies in [128, 256)
  and can never reach e4m3's 448. A power of two makes x * s exact in bf16, so each element is
  rounded once (bf16 -> e4m3), and d = 1/s is exact. e4m3 is a floating-point format, so the scale
  only decides where the range ends; the 0.8 bit given up below 448 costs nothing but one more
  binade at the subnormal end (values under amax * 2^-14).
- S: not quantized (fp32 inside the kernel); descale_q * descale_k is applied to the fp32 product.
- P: a fixed SCALE_S = 256, P in [0, 1] -> [0, 256]. P is exp(S - running max) <= 1 when the
  kernel rescales at every new row maximum, which is what cuDNN's own tests set on Hopper
  (CUDNN_RESCALE_THRESHOLD 0); 256 leaves 1.75x headroom below 448. Values of P under 2^-18
  (4e-6 of the row maximum: half of e4m3's smallest subnormal, 2^-9, over 256) round to zero; the
  row sum is taken before quantization.
- O: cuDNN on Hopper writes fp8 only (bf16/fp16 output needs Blackwell and cuDNN >= 9.13: the
  frontend refuses it on sm_90), so O is e4m3 and one more pass turns it into bf16. O is a convex
  combination of v's rows (times sum(e4m3(P)) / sum(P) <= 1 + 2^-4), so s_o = s_v keeps
  |O| * s_o < 1.0625 * 256 < 448, and out = e4m3(O * s_o) * d_o is exact in bf16.

Around the kernel: three amax reductions, three quantizing passes (bf16 read, e4m3 written,
contiguous [B, L, H, D]) and one dequantizing pass; all on the current stream.

The graph is built once per (device, B, H, Lq, Lk, D) and cached (heuristics and plan building
are far too slow for every call). Input strides and dtype never reach cuDNN (its inputs are the
contiguous e4m3 copies made here), so they are not part of the key. The cuDNN handle is one per
device; its stream is set to the current stream on every call; the workspace comes from torch's
caching allocator.

attention_cudnn_fp8_ref is the same recipe in PyTorch (quantization by the same functions,
attention in fp32, global row maximum instead of the kernel's running one, which only moves the
flush-to-zero threshold of P), usable on the CPU. Nothing in this file has run on a GPU at the time
of writing: the graph was validated (and its operation graph built) for sm_90 against cuDNN 9.19
without a device; execution, speed and the GPU error bound are checked by tests/test_kernels_gpu.py.

Optional: importing this module never imports cudnn; available() says whether the backend can run
here (package, libcudnn, CUDA device of sm_90 or newer) and why not.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass
from enum import IntEnum

import torch

E4M3 = torch.float8_e4m3fn
SCALE_EXP = 8                 # s = 2^(SCALE_EXP - e): amax * s in [2^7, 2^8)
SCALE_S = 256.0               # P in [0, 1] -> [0, 256] (e4m3 max 448)
DESCALE_S = 1.0 / SCALE_S
MIN_CUDNN = 90100             # first cuDNN with fp8 SDPA forward (the frontend refuses 9.10.0 too)
PIP_NAME = "nvidia-cudnn-frontend"


# ---------------------------------------------------------------------------------------------
# 1. Quantization (shared by the cuDNN path and the reference)
# ---------------------------------------------------------------------------------------------
def pow2_scales(amax: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """amax fp32 (>= 0) -> (scale, descale) fp32, exact powers of two with amax * scale in
    [128, 256) (amax 0 gives 256). Built from the exponent bits: no log/exp rounding."""
    _, e = torch.frexp(amax)                    # amax = m 2^e, m in [0.5, 1); frexp(0) = 0, 0
    n = (SCALE_EXP - e).clamp(-126, 126).to(torch.int32)   # keep both 2^n and 2^-n normal fp32
    scale = ((n + 127) << 23).view(torch.float32)
    descale = ((127 - n) << 23).view(torch.float32)
    return scale, descale


def quantize_e4m3(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """x (any strides, bf16/fp16/fp32) -> (x8 e4m3 contiguous in x's shape, scale, descale),
    one power-of-two scale for the whole tensor; x ~= x8 * descale."""
    lo, hi = torch.aminmax(x)                          # one pass, no |x| temporary
    amax = torch.maximum(-lo, hi).float()
    scale, descale = pow2_scales(amax)
    x8 = torch.empty(x.shape, dtype=E4M3, device=x.device)
    x8.copy_(x * scale.to(x.dtype))                    # exact product, one rounding to e4m3
    return x8, scale, descale


# ---------------------------------------------------------------------------------------------
# 2. Reference: the same recipe in PyTorch, attention in fp32
# ---------------------------------------------------------------------------------------------
def attention_cudnn_fp8_ref(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                            rows: torch.Tensor | None = None, chunk: int = 256) -> torch.Tensor:
    """The recipe of attention_cudnn_fp8 in PyTorch: q/k/v quantized by quantize_e4m3, P by
    SCALE_S, O by v's scale; products in fp32. rows (query indices) restricts the output to those
    query positions (the scales still come from the whole tensors): [B, len(rows), H, D].
    chunk bounds the [B, H, chunk, Lk] fp32 scores held at once."""
    q8, _, d_q = quantize_e4m3(q)
    k8, _, d_k = quantize_e4m3(k)
    v8, s_v, d_v = quantize_e4m3(v)
    if rows is not None:
        q8 = q8[:, rows]
    qf = (q8.float() * d_q).transpose(1, 2)            # [B, H, Lq, D]
    kf = (k8.float() * d_k).transpose(1, 2)            # [B, H, Lk, D]
    vf = (v8.float() * d_v).transpose(1, 2)
    o = torch.empty(qf.shape, dtype=torch.float32, device=q.device)
    sm_scale = 1.0 / math.sqrt(q.shape[-1])
    for i in range(0, qf.shape[2], chunk):
        s = torch.matmul(qf[:, :, i:i + chunk], kf.transpose(-1, -2)) * sm_scale
        p = torch.exp(s - s.amax(-1, keepdim=True))    # [B, H, chunk, Lk], in [0, 1]
        p8 = (p * SCALE_S).to(E4M3).float() * DESCALE_S
        o[:, :, i:i + chunk] = torch.matmul(p8, vf) / p.sum(-1, keepdim=True)
    o8 = (o * s_v).to(E4M3)                            # what cuDNN writes on Hopper
    return (o8.to(q.dtype) * d_v.to(q.dtype)).transpose(1, 2)


# ---------------------------------------------------------------------------------------------
# 3. Availability (resolved once per process)
# ---------------------------------------------------------------------------------------------
@functools.cache
def _cudnn():
    """The cudnn module, or the reason it cannot be imported (a str)."""
    try:
        import cudnn                                    # dlopens libcudnn: torch's, when loaded
    except Exception as e:                              # ImportError, or OSError/AssertionError
        return f"{PIP_NAME} is not importable ({type(e).__name__}: {e})"
    return cudnn


@functools.cache
def available() -> tuple[bool, str]:
    """(True, versions) when attention_cudnn_fp8 can run here, else (False, why not)."""
    cudnn = _cudnn()
    if isinstance(cudnn, str):
        return False, cudnn
    try:
        version = cudnn.backend_version()
    except Exception as e:
        return False, (f"{PIP_NAME} {cudnn.__version__} found no cuDNN library "
                       f"({type(e).__name__}: {e})")
    if version < MIN_CUDNN:
        return False, f"cuDNN {version} is too old for fp8 attention (needs >= {MIN_CUDNN})"
    if not torch.cuda.is_available():
        return False, "no CUDA device (torch.cuda.is_available() is False)"
    major, minor = torch.cuda.get_device_capability()
    if major < 9:
        return False, f"cuDNN's fp8 attention needs sm_90 or newer (this GPU is sm_{major}{minor})"
    return True, (f"{PIP_NAME} {cudnn.__version__}, cuDNN {cudnn.backend_version_string()} "
                  f"(torch's: {torch.backends.cudnn.version()})")


# ---------------------------------------------------------------------------------------------
# 4. The cuDNN graph, built once per shape
# ---------------------------------------------------------------------------------------------
class Uid(IntEnum):
    Q = 1
    K = 2
    V = 3
    O = 4
    DESCALE_Q = 5
    DESCALE_K = 6
    DESCALE_V = 7
    DESCALE_S = 8
    SCALE_S = 9
    SCALE_O = 10
    AMAX_S = 11
    AMAX_O = 12


def _bshd(length: int, heads: int, d: int) -> tuple:
    """Strides of a contiguous [B, L, H, D] tensor listed in cuDNN's (B, H, L, D) order."""
    return (length * heads * d, d, heads * d, 1)


def build_graph(cudnn, b: int, heads: int, lq: int, lk: int, d: int, handle: int | None = None,
                sm_version: int | None = None, stage: str = "plans"):
    """The fp8 SDPA forward graph on contiguous e4m3 [B, L, H, D] tensors, built up to stage:
    "validate" (frontend checks only), "operation_graph" (cuDNN backend descriptors; both run
    without a device given sm_version and handle=0), or "plans" (needs the GPU)."""
    f8, f32 = cudnn.data_type.FP8_E4M3, cudnn.data_type.FLOAT
    g = cudnn.pygraph(io_data_type=f8, intermediate_data_type=f32, compute_data_type=f32,
                      handle=handle, sm_version=sm_version)

    def tensor(uid, dim, stride, dtype):
        return g.tensor(uid=int(uid), dim=dim, stride=stride, data_type=dtype)

    def scalar(uid):
        return tensor(uid, (1, 1, 1, 1), (1, 1, 1, 1), f32)

    q = tensor(Uid.Q, (b, heads, lq, d), _bshd(lq, heads, d), f8)
    k = tensor(Uid.K, (b, heads, lk, d), _bshd(lk, heads, d), f8)
    v = tensor(Uid.V, (b, heads, lk, d), _bshd(lk, heads, d), f8)
    o, _, amax_s, amax_o = g.sdpa_fp8(
        q=q, k=k, v=v, descale_q=scalar(Uid.DESCALE_Q), descale_k=scalar(Uid.DESCALE_K),
        descale_v=scalar(Uid.DESCALE_V), descale_s=scalar(Uid.DESCALE_S),
        scale_s=scalar(Uid.SCALE_S), scale_o=scalar(Uid.SCALE_O), generate_stats=False,
        attn_scale=1.0 / math.sqrt(d), name="mova_attention_fp8")
    o.set_uid(int(Uid.O)).set_output(True).set_dim((b, heads, lq, d)) \
        .set_stride(_bshd(lq, heads, d)).set_data_type(f8)
    for t, uid in ((amax_s, Uid.AMAX_S), (amax_o, Uid.AMAX_O)):
        t.set_uid(int(uid)).set_output(True).set_dim((1, 1, 1, 1)).set_stride((1, 1, 1, 1)) \
            .set_data_type(f32)
    g.validate()
    if stage == "validate":
        return g
    g.build_operation_graph()
    if stage == "operation_graph":
        return g
    g.create_execution_plans([cudnn.heur_mode.A, cudnn.heur_mode.FALLBACK])
    g.check_support()
    g.build_plans()
    return g


@dataclass
class _Plan:
    graph: object
    workspace_bytes: int
    scale_s: torch.Tensor        # fp32 [1] = SCALE_S, on the device
    descale_s: torch.Tensor      # fp32 [1] = DESCALE_S
    amax_s: torch.Tensor         # fp32 [1]: amax(P) written by cuDNN, never read
    amax_o: torch.Tensor         # fp32 [1]: amax(O), the same


_PLANS: dict[tuple, _Plan] = {}
_HANDLES: dict[int, int] = {}


def _handle(index: int) -> int:
    if index not in _HANDLES:
        with torch.cuda.device(index):                  # cudnnCreate binds the current device
            _HANDLES[index] = _cudnn().create_handle()
    return _HANDLES[index]


def _plan(key: tuple) -> _Plan:
    plan = _PLANS.get(key)
    if plan is None:
        index, b, heads, lq, lk, d = key
        cudnn = _cudnn()
        with torch.cuda.device(index):                  # the frontend reads the current device's SM
            try:
                graph = build_graph(cudnn, b, heads, lq, lk, d, handle=_handle(index))
            except cudnn.cudnnGraphNotSupportedError as e:
                raise RuntimeError(f"cuDNN fp8 attention does not support q [{b}, {lq}, {heads}, "
                                   f"{d}] x kv [{b}, {lk}, {heads}, {d}]: {e}") from None
        dev = torch.device("cuda", index)
        plan = _Plan(graph=graph, workspace_bytes=graph.get_workspace_size(),
                     scale_s=torch.full((1,), SCALE_S, device=dev),
                     descale_s=torch.full((1,), DESCALE_S, device=dev),
                     amax_s=torch.zeros(1, device=dev), amax_o=torch.zeros(1, device=dev))
        _PLANS[key] = plan
    return plan


# ---------------------------------------------------------------------------------------------
# 5. The op
# ---------------------------------------------------------------------------------------------
def _check_inputs(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> None:
    if q.dim() != 4 or k.dim() != 4 or v.dim() != 4:
        raise ValueError("cudnn-fp8 attention takes q, k, v as [B, L, H, D]")
    b, _, heads, d = q.shape
    if k.shape != v.shape or (k.shape[0], k.shape[2], k.shape[3]) != (b, heads, d):
        raise ValueError(f"cudnn-fp8 attention: q {tuple(q.shape)}, k {tuple(k.shape)} and "
                         f"v {tuple(v.shape)} do not fit [B, Lq, H, D] x [B, Lk, H, D]")
    if d % 16 or d > 256:
        raise ValueError(f"cudnn-fp8 attention needs a head dim that is a multiple of 16 and "
                         f"at most 256 on Hopper (got {d})")
    if q.dtype not in (torch.bfloat16, torch.float16) or k.dtype != q.dtype or v.dtype != q.dtype:
        raise ValueError(f"cudnn-fp8 attention takes bf16 or fp16 q, k, v (got {q.dtype}, "
                         f"{k.dtype}, {v.dtype})")
    if q.device.type != "cuda" or k.device != q.device or v.device != q.device:
        raise ValueError("cudnn-fp8 attention needs q, k, v on one CUDA device")


@torch.library.custom_op("mova_rt::attention_cudnn_fp8", mutates_args=())
def _attention_cudnn_fp8_op(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    ok, why = available()                               # here, not in the wrapper: opaque to dynamo
    if not ok:
        raise RuntimeError(f"cudnn-fp8 attention is unavailable: {why}")
    b, lq, heads, d = q.shape
    index = q.device.index if q.device.index is not None else torch.cuda.current_device()
    plan = _plan((index, b, heads, lq, k.shape[1], d))
    q8, _, d_q = quantize_e4m3(q)
    k8, _, d_k = quantize_e4m3(k)
    v8, s_v, d_v = quantize_e4m3(v)
    o8 = torch.empty((b, lq, heads, d), dtype=E4M3, device=q.device)
    workspace = torch.empty(max(plan.workspace_bytes, 1), dtype=torch.uint8, device=q.device)
    handle = _handle(index)
    _cudnn().set_stream(handle=handle, stream=torch.cuda.current_stream(q.device).cuda_stream)
    pack = {Uid.Q: q8, Uid.K: k8, Uid.V: v8, Uid.O: o8,
            Uid.DESCALE_Q: d_q, Uid.DESCALE_K: d_k, Uid.DESCALE_V: d_v,
            Uid.DESCALE_S: plan.descale_s, Uid.SCALE_S: plan.scale_s, Uid.SCALE_O: s_v,
            Uid.AMAX_S: plan.amax_s, Uid.AMAX_O: plan.amax_o}
    # plain int keys: the frontend's execute takes an int as a uid and anything else as a tensor
    plan.graph.execute({int(uid): t for uid, t in pack.items()}, workspace, handle=handle)
    return o8.to(q.dtype).mul_(d_v.to(q.dtype))        # exact: d_v is a power of two


@_attention_cudnn_fp8_op.register_fake
def _(q, k, v):
    return q.new_empty(q.shape)


def attention_cudnn_fp8(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """softmax(q k^T / sqrt(D)) v through cuDNN's fp8 SDPA (see the module docstring)."""
    _check_inputs(q, k, v)
    return _attention_cudnn_fp8_op(q, k, v)
