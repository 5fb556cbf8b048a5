"""Nothing of a forward pass is recorded by autograd (issue 16, item 1): no weight requires grad
and no cached tensor (time embeddings of every step, text K/V, RoPE tables, step-cache residuals)
carries a grad_fn, after building and after a step, in the pipeline and in the benchmark, even
when the caller is not under no_grad. The first GPU run lost ~37 GiB to the fp32 copies that
autograd kept alive behind the benchmark's precomputed time embeddings."""
import pytest
import torch

from helpers import autograd_leaks
from mova_rt.benchmarks import bench_step, configs as bench_configs
from mova_rt.benchmarks.flops import clip_shapes
from mova_rt.config import PRESET_SIZES, preset_config
from mova_rt.sampler import GuidedStep, Guidance
from mova_rt.scheduler import FlowMatchScheduler


@pytest.fixture(scope="module")
def bench_world():
    cfg = preset_config("tiny")
    shapes = clip_shapes(cfg, *PRESET_SIZES["tiny"])
    cpu = torch.device("cpu")
    shared = bench_step.build_shared_weights(cfg, cpu, None, seed=0)
    inputs = bench_step.make_inputs(cfg, shapes, cpu, 0)
    return cfg, shapes, shared, inputs


def test_benchmark_random_weights_do_not_require_grad(bench_world):
    _, _, shared, _ = bench_world
    assert autograd_leaks(shared) == []


@pytest.mark.parametrize("name", ["reference", "cfg-batch", "cache", "fp8-cublas",
                                  "offload-group"])
def test_benchmark_runner_records_nothing(bench_world, name):
    cfg, shapes, shared, inputs = bench_world
    sched = FlowMatchScheduler(cfg.scheduler, 50)
    assert torch.is_grad_enabled()          # as the benchmark calls a step: no no_grad around it
    runner = bench_configs.CONFIGS[name].prepare(shared, cfg, sched, 5.0, shapes.fps)
    assert autograd_leaks(runner) == [], "after building"
    lat, aud = runner.step(runner.video_dit, 0, inputs["latents"], inputs["audio"],
                           inputs["condition"], inputs["pos"], inputs["neg"])
    runner.step(runner.video_dit, 1, lat, aud, inputs["condition"], inputs["pos"], inputs["neg"])
    assert lat.grad_fn is None and not lat.requires_grad
    leaks = autograd_leaks(runner)
    assert leaks == [], f"after two steps: {leaks[:5]}"
    # the caches were filled, so the walk above did look at them
    assert len(runner.step._times) == len(sched.timesteps) and runner.step._texts


def test_pipeline_step_records_nothing(tiny_ckpt):
    from mova_rt.pipeline import MovaPipeline
    pipe = MovaPipeline.from_pretrained(tiny_ckpt, device="cpu", dtype="bf16")
    towers = (pipe.video_dit, pipe.video_dit_2, pipe.audio_dit, pipe.bridge, pipe.video_vae,
              pipe.audio_vae, pipe.text_encoder.model)
    assert autograd_leaks(list(towers)) == [], "after loading"
    sched = FlowMatchScheduler(pipe.cfg.scheduler, 4)
    step = GuidedStep(pipe._forward, sched, Guidance(5.0), 24.0, pipe.audio_dit, pipe.bridge)
    g = torch.Generator().manual_seed(0)
    lat = torch.randn(1, 16, 5, 8, 12, generator=g)
    cond = torch.randn(1, 20, 5, 8, 12, generator=g)
    aud = torch.randn(1, pipe.audio_vae.latent_dim, 36, generator=g)
    text = torch.randn(1, 512, pipe.cfg.video_dit.text_dim, generator=g).to(torch.bfloat16)
    step(pipe.video_dit, 0, lat, aud, cond, text, text)
    leaks = autograd_leaks(step) + autograd_leaks(list(towers))
    assert leaks == [] and step._times, leaks[:5]
