"""Sequence-parallel attention over torch.distributed (NCCL on GPUs, gloo on CPUs).

The building blocks of context parallelism (issue 7); the model transform comes later.

- Shards: a sequence of L tokens over n ranks, the first L % n ranks one token longer
  (`shard_sizes`). No padding anywhere: uneven shards travel with exact split sizes, so no padded
  key is ever attended (the reference pads with zeros that act as extra keys).
- Ulysses: an all-to-all turns [B, L_local, H, D] into [B, L, H/n, D] (whole sequence, a slice of
  the heads), attention runs locally, a second all-to-all returns [B, L_local, H, D].
- Ring: each rank keeps its queries; key/value shards travel around the ring (one send and one
  receive per step, posted before the local compute so they overlap it), and the partial results
  merge exactly through their log-sum-exp.
- Both: Ulysses inside groups of u ranks, ring across the r = n / u groups.
"""

from __future__ import annotations

import math

import torch
import torch.distributed as dist


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


def partial_attention(q, k, v):
    """softmax attention of q over one key block: (out fp32 [B, Lq, H, D], lse fp32 [B, Lq, H])
    with lse the natural log-sum-exp of the scaled scores (for exact merging)."""
    scale = 1.0 / math.sqrt(q.shape[-1])
    s = torch.einsum("bqhd,bkhd->bqhk", q.float(), k.float()) * scale
    lse = torch.logsumexp(s, dim=-1)
    out = torch.einsum("bqhk,bkhd->bqhd", torch.exp(s - lse[..., None]), v.float())
    return out, lse


def merge(out_a, lse_a, out_b, lse_b):
    """Two softmax-attention partials over disjoint key sets -> the one over their union."""
    lse = torch.logaddexp(lse_a, lse_b)
    return (out_a * torch.exp(lse_a - lse)[..., None]
            + out_b * torch.exp(lse_b - lse)[..., None]), lse


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
                           ulysses_group, ring_group) -> torch.Tensor:
    """Attention over sequences sharded on u x r ranks (Ulysses degree u within a group of
    consecutive ranks, ring across the r groups). q_sizes / k_sizes: the token count of every
    rank's shard, in rank order. Exact: no padding, no approximation."""
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
    else:
        o, _ = partial_attention(q, k, v)
        out = o.to(q.dtype)
    if u > 1:
        out = ulysses_gather_heads(out, qs, j, ulysses_group)
    return out
