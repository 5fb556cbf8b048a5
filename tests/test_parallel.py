"""Sequence-parallel attention (Ulysses, ring, both) on 2 and 4 CPU processes over gloo, against
one process: uneven shards (MOVA's 403 audio tokens), cross-attention with other key lengths."""
import os

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from mova_rt.parallel import shard, shard_sizes, ulysses_ring_attention


def test_shard_sizes():
    assert shard_sizes(403, 4) == [101, 101, 101, 100]
    assert shard_sizes(403, 2) == [202, 201]
    assert shard_sizes(3, 4) == [1, 1, 1, 0]
    x = torch.arange(10)[None]
    assert torch.cat([shard(x, 3, r) for r in range(3)], dim=1).tolist() == [list(range(10))]


def _worker(rank, world, ulysses, store, lq, lk, dtype_name):
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=world)
    try:
        u, r = ulysses, world // ulysses
        ulysses_groups = [dist.new_group([g * u + i for i in range(u)]) for g in range(r)]
        ring_groups = [dist.new_group([g * u + j for g in range(r)]) for j in range(u)]
        g, j = divmod(rank, u)
        dtype = getattr(torch, dtype_name)
        gen = torch.Generator().manual_seed(0)
        q = torch.randn(2, lq, 4, 16, generator=gen).to(dtype)
        k = torch.randn(2, lk, 4, 16, generator=gen).to(dtype)
        v = torch.randn(2, lk, 4, 16, generator=gen).to(dtype)
        want = torch.nn.functional.scaled_dot_product_attention(
            *(t.transpose(1, 2).float() for t in (q, k, v))).transpose(1, 2)
        out = ulysses_ring_attention(shard(q, world, rank), shard(k, world, rank),
                                     shard(v, world, rank), shard_sizes(lq, world),
                                     shard_sizes(lk, world), u, rank, ulysses_groups[g],
                                     ring_groups[j])
        tol = 1e-5 if dtype == torch.float32 else 2e-2
        err = (out.float() - shard(want, world, rank)).abs().max().item()
        assert out.shape == shard(q, world, rank).shape and err <= tol, (rank, err)
    finally:
        dist.destroy_process_group()


@pytest.mark.parametrize("world, ulysses", [(2, 2), (2, 1), (4, 4), (4, 1), (4, 2)])
@pytest.mark.parametrize("lq, lk", [(403, 403), (43, 37)])
def test_sequence_parallel_attention_equals_one_process(tmp_path, world, ulysses, lq, lk):
    store = os.path.join(tmp_path, "store")
    mp.spawn(_worker, args=(world, ulysses, store, lq, lk, "float32"), nprocs=world, join=True)


def test_bf16_ulysses_and_ring(tmp_path):
    mp.spawn(_worker, args=(4, 2, os.path.join(tmp_path, "store"), 403, 403, "bfloat16"),
             nprocs=4, join=True)


def test_scaling_model():
    from mova_rt.benchmarks.scaling import predict, ulysses_degree
    assert [ulysses_degree(n) for n in (1, 2, 4, 8, 16)] == [1, 2, 4, 4, 4]
    one = predict("mova-360p", 1)
    assert one["pflop_per_step"] == pytest.approx(5.53, abs=0.01) and one["comm_s"] == 0
    assert one["step_s"] == pytest.approx(5.533e15 / 615e12, rel=1e-3)
    two = predict("mova-360p", 2)
    # Ulysses-2, video self-attention alone: q, k, v, out shards of [21,560, 5120] bf16, half of
    # each sent, 40 layers, 2 forwards.
    video = 2 * 40 * 4 * 21560 * 5120 * 2 * 0.5 / 1e9
    assert video < two["all_to_all_gb"] < video * 1.6
    eff = [predict("mova-720p", n)["efficiency"] for n in (2, 4, 8, 16)]
    assert all(0 < e <= 1 for e in eff)
    assert predict("mova-720p", 8)["efficiency"] >= 0.85        # issue 7's target, by model
    # Anchor: SGLang's 4 x H100 Ulysses-4 720p step is 25.8 s; the model (615 TFLOP/s) says 25.0.
    assert predict("mova-720p", 4)["step_s"] == pytest.approx(25.8, rel=0.05)
