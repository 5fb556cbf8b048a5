"""Softmax attention for Hopper (bf16): out = softmax(q k^T / sqrt(D)) v, one kernel.

q [B, Lq, H, D], k/v [B, Lk, H, D] bf16 with any strides whose last dim is contiguous (often
views of a fused projection [B, L, 3*H*D]); D = 32, 64 or 128 (MOVA: 128; the tiny test model:
32); out [B, Lq, H, D] contiguous bf16.
q and k arrive normalised and rotated (the q/k RMSNorm + RoPE prologue runs before: one pass per
tensor, never inside the key loop).

One program owns BLOCK_M queries of one (batch, head) and streams the keys in tiles of BLOCK_N
(FlashAttention-2 schedule, online softmax in base 2):

    s     = q k_j^T                         [BLOCK_M, BLOCK_N] fp32 (wgmma, bf16 operands)
    m'    = max(m, rowmax(s) * c)           c = log2(e) / sqrt(D): the softmax scale and the
    p     = exp2(s * c - m')                base change, applied by the FMA that subtracts the
    alpha = exp2(m - m')                    running max (the same instruction count as folding
    l     = l * alpha + rowsum(p)           c into q, without rounding q * c to bf16 again)
    acc   = tl.dot(p.bf16, v_j, acc * alpha)  accumulated in place (wgmma with the fp32
                                             accumulator in registers)
    out   = acc / l

Hopper properties of the compiled loop (checked on CPU by tests/test_kernels_attention.py for
every config below):
- q, k, v, out move through TMA tensor descriptors built per program over the (batch, head)
  plane [L, D] (strides from the tensor, so strided views need no copy); the loads are
  multi-buffered by Triton's pipeliner (num_stages) with mbarriers; out-of-range rows of the
  last tiles are zero-filled by the TMA unit, so no load carries a mask.
- the loop covers the full key tiles only; the last, partial tile (if any) runs once after it
  with the column mask; no integer division anywhere (the split index comes from shifts).
- both products are wgmma; the PV wgmma of tile j stays in flight while tile j+1's K tile
  arrives and its QK product is issued.

Split-KV (flash-decoding) for few queries over many keys (the bridge's v2a: 403 queries x 43,120
keys, 12 heads: 48 programs for 132 SMs): S = 2^LOG_SPLITS programs per query block each take a
contiguous chunk of keys and write their normalised partial output and log2-sum-exp
lse = m + log2(l); `_combine_kernel` merges them exactly:

    out = sum_s 2^(lse_s - M) o_s / sum_s 2^(lse_s - M),   M = max_s lse_s

Under the Triton interpreter (CPU tests) the operands are upcast to fp32 before the dots (its
bf16 dot is wrong) and p / out are rounded to bf16 by bit arithmetic (its casts truncate), so the
interpreter computes what the GPU computes.
"""

from __future__ import annotations

import functools
import math

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

from ._triton import INTERPRET, SHARED_MEMORY_LIMIT, round_bf16

LOG2E = 1.4426950408889634
HEAD_DIMS = (32, 64, 128)
MAX_BLOCK_N = 128            # split chunks are multiples of it, so every BLOCK_N divides them
INTERPRET_BLOCK_M, INTERPRET_BLOCK_N = 32, 32   # interpreter tiles: several per test shape
COMBINE_BLOCK_M = 32


# ---------------------------------------------------------------------------------------------
# 1. Reference
# ---------------------------------------------------------------------------------------------
def attention_ref(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """Softmax attention with fp32 logits, softmax and sums; out in q's dtype, [B, Lq, H, D]."""
    out = F.scaled_dot_product_attention(q.float().transpose(1, 2), k.float().transpose(1, 2),
                                         v.float().transpose(1, 2))
    return out.transpose(1, 2).to(q.dtype)


# ---------------------------------------------------------------------------------------------
# 2. Kernels
# ---------------------------------------------------------------------------------------------
@triton.jit
def _tile(acc, m_i, l_i, q, k_desc, v_desc, n0, end, qk_scale,
          BLOCK_N: tl.constexpr, MASK: tl.constexpr, INTERPRET: tl.constexpr):
    """One key tile [n0, n0 + BLOCK_N) of the online softmax; MASK only for the partial tile."""
    k = k_desc.load([n0, 0])
    if INTERPRET:
        k = k.to(tl.float32)
    s = tl.dot(q, k.T)
    if MASK:
        s = tl.where((n0 + tl.arange(0, BLOCK_N) < end)[None, :], s, float("-inf"))
    m_new = tl.maximum(m_i, tl.max(s, axis=1) * qk_scale)
    p = tl.math.exp2(s * qk_scale - m_new[:, None])
    alpha = tl.math.exp2(m_i - m_new)
    l_i = l_i * alpha + tl.sum(p, axis=1)
    acc = acc * alpha[:, None]
    v = v_desc.load([n0, 0])
    if INTERPRET:
        acc = tl.dot(round_bf16(p), v.to(tl.float32), acc)
    else:
        acc = tl.dot(p.to(v.dtype), v, acc)
    return acc, m_new, l_i


@triton.jit
def _attention_kernel(
        Q, K, V, O, OP, LSE,                                      # pointers
        Lq, Lk, CHUNK, LOG_SPLITS,                                # sizes
        sqb, sqm, sqh, skb, skn, skh, svb, svn, svh, sob, som, soh,   # strides (last dim 1)
        qk_scale,                                                 # meta
        HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
        SPLIT: tl.constexpr, INTERPRET: tl.constexpr):
    """Grid (cdiv(Lq, BLOCK_M) << LOG_SPLITS, H, B). Program (m, split) takes keys
    [split * CHUNK, min((split + 1) * CHUNK, Lk)); without SPLIT, CHUNK >= Lk."""
    pid = tl.program_id(0)
    h = tl.program_id(1)
    b = tl.program_id(2)
    split = pid & ((1 << LOG_SPLITS) - 1)
    m0 = (pid >> LOG_SPLITS) * BLOCK_M
    bl = b.to(tl.int64)
    q_desc = tl.make_tensor_descriptor(Q + bl * sqb + h * sqh, [Lq, HEAD_DIM], [sqm, 1],
                                       [BLOCK_M, HEAD_DIM])
    k_desc = tl.make_tensor_descriptor(K + bl * skb + h * skh, [Lk, HEAD_DIM], [skn, 1],
                                       [BLOCK_N, HEAD_DIM])
    v_desc = tl.make_tensor_descriptor(V + bl * svb + h * svh, [Lk, HEAD_DIM], [svn, 1],
                                       [BLOCK_N, HEAD_DIM])
    q = q_desc.load([m0, 0])                 # rows past Lq arrive as zeros and are not stored
    if INTERPRET:
        q = q.to(tl.float32)

    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, HEAD_DIM], dtype=tl.float32)
    start = split * CHUNK
    end = tl.minimum(start + CHUNK, Lk)
    full_end = start + (end - start) // BLOCK_N * BLOCK_N      # BLOCK_N is a power of two: shifts
    for n0 in range(start, full_end, BLOCK_N):
        acc, m_i, l_i = _tile(acc, m_i, l_i, q, k_desc, v_desc, n0, end, qk_scale,
                              BLOCK_N, False, INTERPRET)
    if full_end < end:
        acc, m_i, l_i = _tile(acc, m_i, l_i, q, k_desc, v_desc, full_end, end, qk_scale,
                              BLOCK_N, True, INTERPRET)

    out = acc / l_i[:, None]
    if SPLIT:
        # Partials [S, B, H, Lq, D] fp32 and lse [S, B, H, Lq] (log2 units, scale included).
        plane = ((split * tl.num_programs(2) + bl) * tl.num_programs(1) + h) * Lq
        op_desc = tl.make_tensor_descriptor(OP + plane * HEAD_DIM, [Lq, HEAD_DIM], [HEAD_DIM, 1],
                                            [BLOCK_M, HEAD_DIM])
        op_desc.store([m0, 0], out)
        rows = m0 + tl.arange(0, BLOCK_M)
        tl.store(LSE + plane + rows, m_i + tl.math.log2(l_i), mask=rows < Lq)
    else:
        o_desc = tl.make_tensor_descriptor(O + bl * sob + h * soh, [Lq, HEAD_DIM], [som, 1],
                                           [BLOCK_M, HEAD_DIM])
        if INTERPRET:
            out = round_bf16(out)
        o_desc.store([m0, 0], out.to(tl.bfloat16))


@triton.jit
def _combine_kernel(OP, LSE, O,                                   # pointers
                    Lq, S,                                        # sizes
                    sob, som, soh,                                # strides
                    HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, INTERPRET: tl.constexpr):
    """Grid (cdiv(Lq, BLOCK_M), H, B): merge the S partial outputs of split-KV (module
    docstring) into out [B, Lq, H, D] bf16. Every split holds at least one key (the launcher
    guarantees it), so every lse is finite."""
    pid = tl.program_id(0)
    h = tl.program_id(1)
    b = tl.program_id(2).to(tl.int64)
    nb = tl.num_programs(2)
    nh = tl.num_programs(1)
    rows = pid * BLOCK_M + tl.arange(0, BLOCK_M)
    ok = rows < Lq
    d = tl.arange(0, HEAD_DIM)
    top = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    for s in range(S):
        plane = ((s * nb + b) * nh + h) * Lq
        top = tl.maximum(top, tl.load(LSE + plane + rows, mask=ok, other=0.0))
    acc = tl.zeros([BLOCK_M, HEAD_DIM], dtype=tl.float32)
    den = tl.zeros([BLOCK_M], dtype=tl.float32)
    for s in range(S):
        plane = ((s * nb + b) * nh + h) * Lq
        w = tl.math.exp2(tl.load(LSE + plane + rows, mask=ok, other=0.0) - top)
        part = tl.load(OP + (plane + rows)[:, None] * HEAD_DIM + d[None, :], mask=ok[:, None],
                       other=0.0)
        acc += w[:, None] * part
        den += w
    out = acc / den[:, None]
    if INTERPRET:
        out = round_bf16(out)
    tl.store(O + b * sob + h * soh + rows[:, None] * som + d[None, :], out.to(tl.bfloat16),
             mask=ok[:, None])


# ---------------------------------------------------------------------------------------------
# 3. Configs: the autotune space and what fits an SM
# ---------------------------------------------------------------------------------------------
REGISTERS_PER_THREAD = 255
# Registers a thread needs beyond the tiles (addresses, loop state, row statistics): from the
# ptxas reports of the configs below, with margin (tests check the kept configs do not spill).
REGISTER_OVERHEAD = 40


def shared_bytes(block_m: int, block_n: int, head_dim: int, stages: int, elt: int = 2) -> int:
    """Shared memory of one program: the q tile and `stages` buffers of the k and v tiles, or the
    epilogue's staging tile for the TMA store (fp32 partials of split-KV: [BLOCK_M, D] x 4 B),
    which reuses them; plus 1 KiB for barriers and alignment (an upper bound of the compiled
    figure; tests compare)."""
    loop = (block_m + 2 * stages * block_n) * head_dim * elt
    return max(loop, block_m * head_dim * 4) + 1024


def registers_per_thread(block_m: int, block_n: int, head_dim: int, warps: int,
                         p_bytes: int = 2, accumulators: int = 1) -> int:
    """fp32 accumulator(s) [BLOCK_M, D] + fp32 scores + p [BLOCK_M, BLOCK_N] spread over the
    threads, plus the overhead."""
    words = (accumulators * block_m * head_dim + block_m * block_n
             + block_m * block_n * p_bytes // 4)
    return words // (32 * warps) + REGISTER_OVERHEAD


def config_fits(cfg: triton.Config, head_dim: int, shared_limit: int = SHARED_MEMORY_LIMIT[90],
                elt: int = 2, p_bytes: int = 2, accumulators: int = 1) -> bool:
    """The prune predicate: the tiles fit the SM's shared memory and a thread's registers (a
    config over either would not launch, or would spill to local memory)."""
    bm, bn = cfg.kwargs["BLOCK_M"], cfg.kwargs["BLOCK_N"]
    return (shared_bytes(bm, bn, head_dim, cfg.num_stages, elt) <= shared_limit
            and registers_per_thread(bm, bn, head_dim, cfg.num_warps, p_bytes, accumulators)
            <= REGISTERS_PER_THREAD)


def all_configs() -> list:
    """BLOCK_M 64/128 x BLOCK_N 64/128 x 4/8 warps x 2-4 stages (before pruning)."""
    return [triton.Config({"BLOCK_M": bm, "BLOCK_N": bn}, num_warps=w, num_stages=s)
            for bm in (64, 128) for bn in (64, 128) for w in (4, 8) for s in (2, 3, 4)]


def configs_for(head_dim: int, shared_limit: int = SHARED_MEMORY_LIMIT[90]) -> list:
    return [c for c in all_configs() if config_fits(c, head_dim, shared_limit)]


def shared_limit_of(t: torch.Tensor) -> int:
    """Opt-in shared memory per block of t's device (sm_90's figure off a GPU)."""
    if t.device.type != "cuda":
        return SHARED_MEMORY_LIMIT[90]
    return torch.cuda.get_device_properties(t.device).shared_memory_per_block_optin


def autotuned(kernel, fits, device_arg: str):
    """`kernel` under @triton.autotune over all_configs(), pruned to those `fits(config,
    head_dim, shared_limit)` accepts on the GPU of the tensor argument `device_arg`; the timings
    go to Triton's disk cache (cache_results), so a shape is tuned once, not per process."""
    def prune(configs, named_args, **kwargs):
        limit = shared_limit_of(named_args[device_arg])
        return [c for c in configs if fits(c, kwargs["HEAD_DIM"], limit)]
    return triton.autotune(configs=all_configs(), key=["Lq", "CHUNK", "HEAD_DIM", "SPLIT"],
                           prune_configs_by={"early_config_prune": prune},
                           cache_results=True)(kernel)


def launch(kernel, tuned, args: tuple, meta: dict, lq: int, heads: int, bsz: int,
           log_splits: int) -> None:
    """One launch over (query blocks x 2^log_splits key splits, heads, batch): the autotuned
    kernel on a GPU, the plain one with the interpreter's tiles under TRITON_INTERPRET
    (@triton.autotune with several configs needs a GPU)."""
    if INTERPRET:
        grid = (triton.cdiv(lq, INTERPRET_BLOCK_M) << log_splits, heads, bsz)
        kernel[grid](*args, BLOCK_M=INTERPRET_BLOCK_M, BLOCK_N=INTERPRET_BLOCK_N, **meta)
    else:
        grid = lambda c: (triton.cdiv(lq, c["BLOCK_M"]) << log_splits, heads, bsz)  # noqa: E731
        tuned[grid](*args, **meta)


_attention_tuned = autotuned(_attention_kernel, config_fits, "Q")


# ---------------------------------------------------------------------------------------------
# 4. Launcher and custom op
# ---------------------------------------------------------------------------------------------
@functools.lru_cache(maxsize=None)
def _sm_count(device: torch.device) -> int:
    """Streaming multiprocessors of the device (queried once, not per call)."""
    if device.type != "cuda":
        return 132
    return torch.cuda.get_device_properties(device).multi_processor_count


def split_count(batch_heads: int, lq: int, lk: int, sm_count: int = 132) -> int:
    """Key splits (a power of two) when the query blocks alone leave SMs idle: about two
    programs per SM, at least 1024 keys per split."""
    programs = batch_heads * triton.cdiv(lq, 128)
    if programs >= sm_count or lk < 2048:
        return 1
    want = triton.next_power_of_2(triton.cdiv(2 * sm_count, programs))
    cap = 1 << ((lk // 1024).bit_length() - 1)           # largest power of two <= lk / 1024
    return min(want, cap)


def split_chunk(lk: int, splits: int) -> tuple:
    """(splits, keys per split): chunks are multiples of MAX_BLOCK_N, and splits are halved
    until none is empty."""
    while True:
        chunk = triton.cdiv(triton.cdiv(lk, splits), MAX_BLOCK_N) * MAX_BLOCK_N
        if splits == 1 or (splits - 1) * chunk < lk:
            return splits, chunk
        splits //= 2


@functools.lru_cache(maxsize=None)
def tma_scratch(device: torch.device):
    """triton.set_allocator's function for `device`: global memory for the TMA descriptors the
    kernels build on the device (128 B per descriptor and program)."""
    def alloc(size: int, alignment: int, stream):
        return torch.empty(size, dtype=torch.int8, device=device)
    return alloc


def tma_ready(t: torch.Tensor) -> torch.Tensor:
    """t itself when TMA can address it (16-byte aligned base and strides, last dim contiguous),
    else a fresh contiguous copy (clone: `.contiguous()` would hand back a contiguous tensor
    whose base is misaligned)."""
    elt = t.element_size()
    ok = (t.stride(-1) == 1 and t.data_ptr() % 16 == 0
          and all((s * elt) % 16 == 0 for s in t.stride()[:-1]))
    return t if ok else t.clone(memory_format=torch.contiguous_format)


def check_qkv(name: str, q, k, v, dtype=torch.bfloat16) -> None:
    if q.dim() != 4 or k.dim() != 4 or v.shape != k.shape:
        raise ValueError(f"{name}: q {tuple(q.shape)}, k {tuple(k.shape)}, v {tuple(v.shape)}: "
                         "expected [B, Lq, H, D] and two [B, Lk, H, D]")
    bsz, lq, heads, d = q.shape
    if k.shape[0] != bsz or k.shape[2] != heads or k.shape[3] != d:
        raise ValueError(f"{name}: q {tuple(q.shape)} and k {tuple(k.shape)} disagree")
    if d not in HEAD_DIMS:
        raise ValueError(f"{name}: head dim {d} is not supported ({HEAD_DIMS})")
    if not (q.dtype == k.dtype == v.dtype == dtype):
        raise ValueError(f"{name}: q, k, v must be {dtype}, got {q.dtype}, {k.dtype}, {v.dtype}")
    if lq == 0 or k.shape[1] == 0:
        raise ValueError(f"{name}: empty sequence (Lq={lq}, Lk={k.shape[1]})")


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
              splits: int | None = None) -> torch.Tensor:
    """softmax(q k^T / sqrt(D)) v (module docstring). q [B, Lq, H, D], k/v [B, Lk, H, D] bf16,
    any strides with a contiguous last dim; D in HEAD_DIMS (32, 64, 128). splits: key splits
    (rounded down to a power of two; None: chosen to fill the GPU). Returns [B, Lq, H, D]
    contiguous bf16."""
    check_qkv("attention", q, k, v)
    if splits is None:
        splits = split_count(q.shape[0] * q.shape[2], q.shape[1], k.shape[1],
                             _sm_count(q.device))
    return torch.ops.mova_rt.attention(q, k, v, 1 << (max(int(splits), 1).bit_length() - 1))


def launch_split(kernel_launch, lq: int, lk: int, heads: int, bsz: int, d: int, splits: int,
                 out: torch.Tensor) -> None:
    """Shared by the bf16 and fp8 launchers: kernel_launch(op, lse, chunk, log_splits) runs the
    attention kernel; with more than one split the partials are merged into out."""
    dev = out.device
    splits, chunk = split_chunk(lk, splits)
    if splits == 1:
        kernel_launch(out, out, max(lk, 1), 0)
        return
    op = torch.empty(splits, bsz, heads, lq, d, device=dev, dtype=torch.float32)
    lse = torch.empty(splits, bsz, heads, lq, device=dev, dtype=torch.float32)
    kernel_launch(op, lse, chunk, splits.bit_length() - 1)
    _combine_kernel[(triton.cdiv(lq, COMBINE_BLOCK_M), heads, bsz)](
        op, lse, out, lq, splits, out.stride(0), out.stride(1), out.stride(2),
        HEAD_DIM=d, BLOCK_M=COMBINE_BLOCK_M, INTERPRET=INTERPRET, num_warps=4)


@torch.library.custom_op("mova_rt::attention", mutates_args=())
def _attention_op(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, splits: int) -> torch.Tensor:
    q, k, v = tma_ready(q), tma_ready(k), tma_ready(v)
    bsz, lq, heads, d = q.shape
    lk = k.shape[1]
    out = torch.empty(bsz, lq, heads, d, device=q.device, dtype=q.dtype)
    if not INTERPRET:
        triton.set_allocator(tma_scratch(q.device))
    scale = LOG2E / math.sqrt(d)

    def run(op, lse, chunk, log_splits):
        args = (q, k, v, out, op, lse, lq, lk, chunk, log_splits,
                q.stride(0), q.stride(1), q.stride(2), k.stride(0), k.stride(1), k.stride(2),
                v.stride(0), v.stride(1), v.stride(2), out.stride(0), out.stride(1),
                out.stride(2), scale)
        meta = dict(HEAD_DIM=d, SPLIT=log_splits > 0, INTERPRET=INTERPRET)
        launch(_attention_kernel, _attention_tuned, args, meta, lq, heads, bsz, log_splits)

    launch_split(run, lq, lk, heads, bsz, d, splits, out)
    return out


@_attention_op.register_fake
def _(q, k, v, splits):
    return q.new_empty(q.shape[:3] + (v.shape[3],))


# ---------------------------------------------------------------------------------------------
# 5. The fused entry point the kernel sets call (q/k RMSNorm + RoPE in PyTorch, then the kernel)
# ---------------------------------------------------------------------------------------------
def fused_attention(q, k, v, wq=None, wk=None, eps: float = 1e-6, q_rope=None, k_rope=None):
    """q/k RMSNorm over all heads (weights wq/wk, or None: none) and RoPE (InterleavedRope on both
    sides, in float32 as the `sdpa` set; RotateHalfRope or None per side), as the eager path does
    them, then attention(). q [B, Lq, H, D], k/v [B, Lk, H, D] bf16 -> bf16."""
    from ..ops import rms_norm_heads, rope_interleaved_f32
    from ..rope import InterleavedRope, apply_rope_rotate_half

    if wq is not None:
        q = rms_norm_heads(q, wq, eps)
    if wk is not None:
        k = rms_norm_heads(k, wk, eps)
    if isinstance(q_rope, InterleavedRope) or isinstance(k_rope, InterleavedRope):
        if not (isinstance(q_rope, InterleavedRope) and isinstance(k_rope, InterleavedRope)):
            raise ValueError("interleaved RoPE must be given for both q and k")
        q = rope_interleaved_f32(q, *q_rope.tables())
        k = rope_interleaved_f32(k, *k_rope.tables())
    else:
        if q_rope is not None:
            q = apply_rope_rotate_half(q, *q_rope.tables())
        if k_rope is not None:
            k = apply_rope_rotate_half(k, *k_rope.tables())
    return attention(q, k, v)


# ---------------------------------------------------------------------------------------------
# 6. Compile cases: every variant a GPU would build (kernels/_triton.compile_report)
# ---------------------------------------------------------------------------------------------
def _signature(kernel, ptr_types: dict, constexprs) -> dict:
    """Every argument of `kernel`: pointers typed from ptr_types, constexprs as such, the other
    scalars i32 except fp32 `*scale*` arguments."""
    sig = {}
    for name in kernel.arg_names:
        if name in constexprs:
            sig[name] = "constexpr"
        elif name in ptr_types:
            sig[name] = ptr_types[name]
        else:
            sig[name] = "fp32" if "scale" in name else "i32"
    return sig


def small_and_large(head_dim: int, configs: list) -> list:
    """The configs compile-checked at a head dim: all at D = 128; the first and the last (the
    largest tiles and stages) at D = 64; the first at D = 32."""
    if head_dim == 128:
        return configs
    return configs[:1] if head_dim == 32 else [configs[0], configs[-1]]


_PTRS = {"Q": "*bf16", "K": "*bf16", "V": "*bf16", "O": "*bf16", "OP": "*fp32", "LSE": "*fp32"}


def _cases() -> list:
    """Every config x {unsplit, split} at D = 128 (every MOVA attention); at D = 64 the smallest
    and the largest tiles x {unsplit, split}, at D = 32 (the tiny test model) the smallest
    unsplit (MOVA runs neither; a compile check costs ~1 s); the combine kernel."""
    cases = []
    for d in HEAD_DIMS:
        for cfg in small_and_large(d, configs_for(d)):
            for split in (False, True) if d > 32 else (False,):
                consts = dict(HEAD_DIM=d, SPLIT=split, INTERPRET=False, **cfg.kwargs)
                cases.append({
                    "name": f"attention d={d} split={int(split)} {cfg.kwargs['BLOCK_M']}x"
                            f"{cfg.kwargs['BLOCK_N']} w{cfg.num_warps} s{cfg.num_stages}",
                    "kernel": _attention_kernel, "signature": _signature(
                        _attention_kernel, _PTRS, consts),
                    "constexprs": consts, "num_warps": cfg.num_warps,
                    "num_stages": cfg.num_stages, "archs": (90,)})
        consts = dict(HEAD_DIM=d, BLOCK_M=COMBINE_BLOCK_M, INTERPRET=False)
        cases.append({"name": f"combine d={d}", "kernel": _combine_kernel,
                      "signature": _signature(_combine_kernel, _PTRS, consts),
                      "constexprs": consts, "num_warps": 4, "num_stages": 1, "archs": (90,)})
    return cases


COMPILE_CASES = _cases()
