"""Context parallelism over torch.distributed (NCCL on GPUs, gloo on CPUs): the layout of the
ranks, sequence-parallel attention, and the transform that makes a built pipeline use them.

Layout: world = cfg_groups x cp_size, rank = c * cp_size + p. The cp_size ranks of a group share
one guidance pass (all of them, without --cfg_parallel); p = g * ulysses + j places a rank in
Ulysses group g at position j, and the ring runs across the ring_degree Ulysses groups.

- Shards: a sequence of L tokens over n ranks, the first L % n ranks one token longer
  (`shard_sizes`), split right after patchify. No padding anywhere: uneven shards travel with exact
  split sizes, so no padded key is ever attended (the reference pads with zeros that act as extra
  keys).
- Ulysses: an all-to-all turns [B, L_local, H, D] into [B, L, H/u, D] (whole sequence, a slice of
  the heads), attention runs locally, a second all-to-all returns [B, L_local, H, D].
- Ring: each rank keeps its queries; key/value shards travel around the ring (one send and one
  receive per step, posted before the local compute so they overlap it), and the partial results
  merge exactly through their log-sum-exp.
- Both: Ulysses inside groups of u ranks, ring across the r = n / u groups.
- The model (`apply`): tokens are sharded after patchify, RoPE tables and the bridge's aligned
  positions are those of the shard's global token indices, self-attention of both towers and the
  bridge both ways are sequence-parallel, text cross-attention is local (queries sharded, the 512
  text keys whole on every rank), and the heads' outputs are all-gathered before unpatchify, so
  every rank holds the whole velocity and takes the same scheduler step.
- CFG parallel: each group computes one guidance pass; the velocities are all-gathered across the
  groups and combined by the same function as on one process.
"""

from __future__ import annotations

import dataclasses
import datetime
import math
from dataclasses import dataclass

import torch
import torch.distributed as dist

from .errors import MovaInputError


def shard_sizes(total: int, n: int) -> list:
    """Token counts of n shards of `total` tokens: as equal as possible, longer shards first."""
    base, extra = divmod(total, n)
    return [base + (1 if r < extra else 0) for r in range(n)]


def shard(x: torch.Tensor, n: int, rank: int, dim: int = 1) -> torch.Tensor:
    """This rank's shard of x along `dim`."""
    sizes = shard_sizes(x.shape[dim], n)
    start = sum(sizes[:rank])
    return x.narrow(dim, start, sizes[rank])


def _all_to_all(chunks: list, out_shapes: list, group) -> list:
    """Send chunks[j] to rank j of `group`; returns the tensors received from every rank."""
    flat_in = torch.cat([c.reshape(-1) for c in chunks])
    out_numels = [math.prod(s) for s in out_shapes]
    flat_out = flat_in.new_empty(sum(out_numels))
    dist.all_to_all_single(flat_out, flat_in, output_split_sizes=out_numels,
                           input_split_sizes=[c.numel() for c in chunks], group=group)
    return [t.view(s) for t, s in zip(flat_out.split(out_numels), out_shapes)]


def ulysses_scatter_heads(x: torch.Tensor, sizes: list, group) -> torch.Tensor:
    """[B, L_local, H, D] -> [B, L, H/n, D]: every rank's tokens for this rank's heads."""
    n = len(sizes)
    b, _, h, d = x.shape
    if h % n:
        raise ValueError(f"{h} heads do not split over a Ulysses degree of {n}")
    hn = h // n
    chunks = [x[:, :, j * hn:(j + 1) * hn].contiguous() for j in range(n)]
    got = _all_to_all(chunks, [(b, s, hn, d) for s in sizes], group)
    return torch.cat(got, dim=1)


def ulysses_gather_heads(x: torch.Tensor, sizes: list, rank: int, group) -> torch.Tensor:
    """[B, L, H/n, D] -> [B, L_local, H, D]: the inverse of ulysses_scatter_heads."""
    b, _, hn, d = x.shape
    chunks = list(x.split(sizes, dim=1))
    got = _all_to_all([c.contiguous() for c in chunks],
                      [(b, sizes[rank], hn, d)] * len(sizes), group)
    return torch.cat(got, dim=2)


def partial_attention_ref(q, k, v):
    """softmax attention of q over one key block: (out fp32 [B, Lq, H, D], lse fp32 [B, Lq, H])
    with lse the natural log-sum-exp of the scaled scores (for exact merging). The reference the
    fused paths are tested against; its [B, Lq, H, Lk] scores bound it to small shapes."""
    scale = 1.0 / math.sqrt(q.shape[-1])
    s = torch.einsum("bqhd,bkhd->bqhk", q.float(), k.float()) * scale
    lse = torch.logsumexp(s, dim=-1)
    out = torch.einsum("bqhk,bkhd->bqhd", torch.exp(s - lse[..., None]), v.float())
    return out, lse


def partial_attention(q, k, v):
    """partial_attention_ref through PyTorch's fused kernels, which return the log-sum-exp:
    flash attention on CUDA (bf16/fp16), its CPU twin on the CPU; other cases take the reference.
    out in q.dtype (merged in fp32), lse fp32 [B, Lq, H]."""
    if q.shape[1] == 0:                      # an empty shard (fewer tokens than ranks)
        return q.new_zeros(q.shape), q.new_zeros(q.shape[:3], dtype=torch.float32)
    qt, kt, vt = (t.transpose(1, 2) for t in (q, k, v))                    # [B, H, L, D]
    if q.is_cuda and q.dtype in (torch.bfloat16, torch.float16) and q.shape[-1] <= 256:
        out, lse = torch.ops.aten._scaled_dot_product_flash_attention(qt, kt, vt)[:2]
    elif q.device.type == "cpu":
        out, lse = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(qt, kt, vt)
    else:
        return partial_attention_ref(q, k, v)
    return out.transpose(1, 2), lse.transpose(1, 2)


def merge(out_a, lse_a, out_b, lse_b):
    """Two softmax-attention partials over disjoint key sets -> the one over their union (fp32)."""
    lse = torch.logaddexp(lse_a, lse_b)
    return (out_a.float() * torch.exp(lse_a - lse)[..., None]
            + out_b.float() * torch.exp(lse_b - lse)[..., None]), lse


def ring_attention(q, k, v, k_sizes: list, rank: int, group) -> torch.Tensor:
    """q [B, Lq_local, H, D] over the keys of all ranks of `group` (k/v [B, k_sizes[rank], H, D]
    here): K/V shards pass around the ring; returns [B, Lq_local, H, D] in q's dtype."""
    n = len(k_sizes)
    ranks = dist.get_process_group_ranks(group) if group is not None else list(range(n))
    nxt, prv = ranks[(rank + 1) % n], ranks[(rank - 1) % n]
    kv = torch.stack([k, v])                                  # [2, B, Lk_r, H, D]
    out = lse = None
    for step in range(n):
        src = (rank - step) % n                               # whose keys we hold now
        reqs, recv = [], None
        if step < n - 1:                                      # post the exchange, then compute
            nxt_src = (rank - step - 1) % n
            recv = kv.new_empty((2, kv.shape[1], k_sizes[nxt_src], *kv.shape[3:]))
            reqs = dist.batch_isend_irecv([dist.P2POp(dist.isend, kv, nxt, group),
                                           dist.P2POp(dist.irecv, recv, prv, group)])
        if k_sizes[src] > 0:
            o, l = partial_attention(q, kv[0], kv[1])
            out, lse = (o, l) if out is None else merge(out, lse, o, l)
        for r in reqs:
            r.wait()
        if recv is not None:
            kv = recv
    return out.to(q.dtype)


def ulysses_ring_attention(q, k, v, q_sizes: list, k_sizes: list, ulysses: int, rank: int,
                           ulysses_group, ring_group, attention_fn=None) -> torch.Tensor:
    """Attention over sequences sharded on u x r ranks (Ulysses degree u within a group of
    consecutive ranks, ring across the r groups). q_sizes / k_sizes: the token count of every
    rank's shard, in rank order. Exact: no padding, no approximation. attention_fn(q, k, v), when
    given, computes the whole-sequence attention of the Ulysses-only case (the kernel set's
    backend, so that case equals one process head by head)."""
    u = ulysses
    r = len(q_sizes) // u
    g, j = divmod(rank, u)                                    # ring position, Ulysses position
    qs = [q_sizes[g * u + i] for i in range(u)]
    ks = [k_sizes[g * u + i] for i in range(u)]
    if u > 1:
        q = ulysses_scatter_heads(q, qs, ulysses_group)
        k = ulysses_scatter_heads(k, ks, ulysses_group)
        v = ulysses_scatter_heads(v, ks, ulysses_group)
    ring_k = [sum(k_sizes[x * u:(x + 1) * u]) for x in range(r)]
    if r > 1:
        out = ring_attention(q, k, v, ring_k, g, ring_group)
    elif attention_fn is not None:
        out = attention_fn(q, k, v)
    else:
        out = partial_attention(q, k, v)[0].to(q.dtype)
    if u > 1:
        out = ulysses_gather_heads(out, qs, j, ulysses_group)
    return out


# ---------------------------------------------------------------------------------------------
# The layout: how many ranks do what, checked before any weight is loaded
# ---------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class ParallelConfig:
    ulysses: int = 1           # Ulysses degree (all-to-all over heads)
    ring: int = 1              # ring degree (K/V blocks around a ring)
    cfg_groups: int = 1        # 1, or one rank group per guidance pass (--cfg_parallel)

    @property
    def cp_size(self) -> int:
        return self.ulysses * self.ring

    @property
    def world_size(self) -> int:
        return self.cp_size * self.cfg_groups


def head_counts(cfg) -> dict:
    """Heads of every sequence-parallel attention of a MovaConfig (a Ulysses degree must divide
    each): the self-attention of both experts and the audio DiT, and the bridge both ways."""
    b = cfg.bridge
    return {"video self-attention": cfg.video_dit.num_heads,
            "video expert 2 self-attention": cfg.video_dit_2.num_heads,
            "audio self-attention": cfg.audio_dit.num_heads,
            "bridge audio-to-video": b.visual_hidden_dim // b.head_dim,
            "bridge video-to-audio": b.audio_hidden_dim // b.head_dim}


def plan(cp_size: int, ulysses: int | None, ring: int | None, cfg_parallel: bool, passes: int,
         heads: dict, world_size: int) -> ParallelConfig:
    """The layout for the flags (--cp_size, --ulysses_degree, --ring_degree, --cfg_parallel), a
    step of `passes` guidance passes, the model's head counts and the launched world size.
    Unset degrees: the largest Ulysses degree that divides cp_size and every head count (4 for
    MOVA: 40 video and 12 audio heads), the ring for the rest. Raises MovaInputError."""
    for name, n in (("--cp_size", cp_size), ("--ulysses_degree", ulysses),
                    ("--ring_degree", ring)):
        if n is not None and n < 1:
            raise MovaInputError(f"{name} {n} must be at least 1")
    if ulysses is not None and ring is not None:
        if cp_size not in (1, ulysses * ring):
            raise MovaInputError(f"--cp_size {cp_size} is not --ulysses_degree {ulysses} x "
                                 f"--ring_degree {ring}: make cp_size = ulysses x ring")
        cp_size = ulysses * ring
    elif ulysses is not None or ring is not None:
        given = ulysses or ring
        if cp_size == 1:
            cp_size = given
        if cp_size % given:
            flag = "--ulysses_degree" if ulysses else "--ring_degree"
            raise MovaInputError(f"{flag} {given} does not divide --cp_size {cp_size}: choose a "
                                 "divisor, so that cp_size = ulysses x ring")
        ulysses, ring = (given, cp_size // given) if ulysses else (cp_size // given, given)
    else:
        ulysses = max(d for d in range(1, cp_size + 1)
                      if cp_size % d == 0 and all(h % d == 0 for h in heads.values()))
        ring = cp_size // ulysses
    bad = {name: h for name, h in heads.items() if h % ulysses}
    if bad:
        name, h = next(iter(bad.items()))
        common = [d for d in range(1, min(heads.values()) + 1)
                  if all(x % d == 0 for x in heads.values())]
        raise MovaInputError(f"--ulysses_degree {ulysses} does not divide the {h} heads of the "
                             f"{name}: use a Ulysses degree in {common} and the ring for the rest")
    if cfg_parallel and passes < 2:
        raise MovaInputError("--cfg_parallel splits the guidance passes over rank groups, but this "
                             "step has one pass (--cfg_scale 1): drop --cfg_parallel")
    pc = ParallelConfig(ulysses, ring, passes if cfg_parallel else 1)
    if pc.world_size != world_size and world_size == 1:
        raise MovaInputError(
            f"--cp_size {pc.cp_size}" + (" --cfg_parallel" if cfg_parallel else "") + " needs "
            f"{pc.world_size} processes: launch with torchrun --nproc_per_node={pc.world_size} "
            "-m mova_rt generate ...")
    if pc.world_size != world_size:
        groups = f" x {pc.cfg_groups} guidance passes (--cfg_parallel)" if cfg_parallel else ""
        raise MovaInputError(
            f"{world_size} processes launched, but --cp_size {pc.cp_size}{groups} needs "
            f"{pc.world_size}: launch with torchrun --nproc_per_node={pc.world_size} (per node) "
            "or change the flags")
    return pc


# ---------------------------------------------------------------------------------------------
# The mesh: this rank's groups and the collectives the model needs
# ---------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class SeqShard:
    """A sequence of sum(sizes) tokens split over the context-parallel ranks; `rank` holds
    tokens [start, start + length)."""
    sizes: tuple
    rank: int

    @property
    def start(self) -> int:
        return sum(self.sizes[:self.rank])

    @property
    def length(self) -> int:
        return self.sizes[self.rank]

    def local(self, x: torch.Tensor, dim: int = 1) -> torch.Tensor:
        return x.narrow(dim, self.start, self.length)


class Mesh:
    """This rank's place in a ParallelConfig, with its process groups. Every rank constructs the
    same groups in the same order (torch.distributed requires it). timeout: how long a collective
    waits for a peer (a group does not inherit the launch's; None: torch's default, 30 min)."""

    def __init__(self, pc: ParallelConfig, rank: int, timeout: datetime.timedelta | None = None):
        self.config = pc
        self.rank = rank
        self.cfg_index, self.cp_rank = divmod(rank, pc.cp_size)
        u, r, n = pc.ulysses, pc.ring, pc.cp_size
        self.cp_group = self.ulysses_group = self.ring_group = self.cfg_group = None
        if pc.world_size == 1:
            return
        base = self.cfg_index * n

        def new_group(ranks):
            return dist.new_group(ranks, timeout=timeout)

        for c in range(pc.cfg_groups):
            group = new_group([c * n + p for p in range(n)])
            if c == self.cfg_index:
                self.cp_group = group
            for g in range(r):
                group = new_group([c * n + g * u + j for j in range(u)])
                if c == self.cfg_index and g == self.cp_rank // u:
                    self.ulysses_group = group
            for j in range(u):
                group = new_group([c * n + g * u + j for g in range(r)])
                if c == self.cfg_index and j == self.cp_rank % u:
                    self.ring_group = group
        for p in range(n):
            group = new_group([c * n + p for c in range(pc.cfg_groups)])
            if p == rank - base:
                self.cfg_group = group

    @property
    def is_writer(self) -> bool:
        return self.rank == 0

    def seq(self, total: int) -> SeqShard:
        return SeqShard(tuple(shard_sizes(total, self.config.cp_size)), self.cp_rank)

    def attention(self, q, k, v, q_seq: SeqShard, k_seq: SeqShard, attention_fn=None):
        """Attention of this rank's query shard [B, Lq_local, H, D] over every rank's keys."""
        pc = self.config
        return ulysses_ring_attention(q, k, v, list(q_seq.sizes), list(k_seq.sizes), pc.ulysses,
                                      self.cp_rank, self.ulysses_group, self.ring_group,
                                      attention_fn)

    def gather(self, x: torch.Tensor, seq: SeqShard) -> torch.Tensor:
        """[B, L_local, C] on every rank -> [B, L, C] on every rank (uneven shards travel padded to
        the longest; the padding is cut off, never computed with)."""
        if self.config.cp_size == 1:
            return x
        longest = max(seq.sizes)
        buf = x.new_zeros((x.shape[0], longest, *x.shape[2:]))
        buf[:, :x.shape[1]] = x
        parts = [torch.empty_like(buf) for _ in seq.sizes]
        dist.all_gather(parts, buf, group=self.cp_group)
        return torch.cat([p[:, :n] for p, n in zip(parts, seq.sizes)], dim=1)

    def gather_passes(self, x: torch.Tensor) -> list:
        """CFG parallel: this group's velocity -> every group's, in guidance-pass order."""
        parts = [torch.empty_like(x) for _ in range(self.config.cfg_groups)]
        dist.all_gather(parts, x.contiguous(), group=self.cfg_group)
        return parts


# ---------------------------------------------------------------------------------------------
# The model transform
# ---------------------------------------------------------------------------------------------
class Seq:
    """What the sequence-parallel ops receive where the plain ones receive a RoPE description:
    the RoPE of the whole sequence (or None) and this rank's shard of it."""

    def __init__(self, rope, shard: SeqShard):
        self.rope, self.shard = rope, shard

    def tables(self) -> tuple:
        """The RoPE tables of this shard's global token indices."""
        return tuple(self.shard.local(t, dim=0) for t in self.rope.tables())


def sequence_parallel_ops(ops, mesh: Mesh):
    """ops with self-attention and the bridge's cross-attention sequence-parallel: per token q/k
    RMSNorm and RoPE on the shard (the kernel set's RoPE), then Mesh.attention with the set's
    attention backend. Text cross-attention (no Seq given) stays the set's own, local."""
    from .ops import rms_norm_heads
    from .rope import apply_rope_rotate_half

    def self_attention(q, k, v, w_q, w_k, eps, seq: Seq):
        cos, sin = seq.tables()
        q = ops.rope_interleaved(rms_norm_heads(q, w_q, eps), cos, sin)
        k = ops.rope_interleaved(rms_norm_heads(k, w_k, eps), cos, sin)
        return mesh.attention(q, k, v, seq.shard, seq.shard, ops.attention)

    def cross_attention(q, k, v, w_q, w_k, eps, q_seq=None, k_seq=None):
        if q_seq is None:                                   # text: keys whole on every rank
            return ops.cross_attention(q, k, v, w_q, w_k, eps)
        q = rms_norm_heads(q, w_q, eps)
        k = rms_norm_heads(k, w_k, eps)
        if q_seq.rope is not None:
            q = apply_rope_rotate_half(q, *q_seq.tables())
        if k_seq.rope is not None:
            k = apply_rope_rotate_half(k, *k_seq.tables())
        return mesh.attention(q, k, v, q_seq.shard, k_seq.shard, ops.attention)

    return dataclasses.replace(ops, name=f"{ops.name}+cp", self_attention=self_attention,
                               cross_attention=cross_attention)


def _tower(dit, mesh: Mesh):
    """Shards a DiT's tokens after patchify, describes its RoPE per shard, gathers the head's
    output before unpatchify (the head is per token, so it runs on the shard: 64 output channels
    travel instead of 5120)."""
    patchify, rope, unpatchify = dit.patchify, dit.rope, dit.unpatchify

    def sharded_patchify(x):
        tokens, grid = patchify(x)                                   # [B, L, D]
        return mesh.seq(math.prod(grid)).local(tokens), grid         # [B, L_local, D]

    def sharded_rope(grid, device):
        return Seq(rope(grid, device), mesh.seq(math.prod(grid)))

    def gathered_unpatchify(x, grid):
        return unpatchify(mesh.gather(x, mesh.seq(math.prod(grid))), grid)

    dit.patchify, dit.rope, dit.unpatchify = sharded_patchify, sharded_rope, gathered_unpatchify


def apply(pipe, mesh: Mesh) -> None:
    """Makes a built pipeline's joint network context-parallel over `mesh` (in place): every
    attention-holding module gets the sequence-parallel ops of its kernel set, the DiTs shard and
    gather their tokens, the bridge describes its aligned positions per shard."""
    if mesh.config.cp_size == 1:
        return
    wrapped = {}
    towers = [pipe.video_dit, pipe.video_dit_2, pipe.audio_dit, pipe.bridge]
    for tower in (t for t in towers if t is not None):
        for module in tower.modules():
            if hasattr(module, "ops"):
                key = id(module.ops)
                if key not in wrapped:
                    wrapped[key] = sequence_parallel_ops(module.ops, mesh)
                module.ops = wrapped[key]
    for dit in (pipe.video_dit, pipe.video_dit_2, pipe.audio_dit):
        if dit is not None:
            _tower(dit, mesh)
    bridge_rope = pipe.bridge.rope

    def sharded_bridge_rope(grid, audio_len, video_fps, dtype, device):
        v, a = bridge_rope(grid, audio_len, video_fps, dtype, device)
        return Seq(v, mesh.seq(math.prod(grid))), Seq(a, mesh.seq(audio_len))

    pipe.bridge.rope = sharded_bridge_rope
