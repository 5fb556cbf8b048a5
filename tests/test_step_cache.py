"""Step caching (--cache): the decision logic, exactness when nothing is reused, and the error of
the cached run against the exact run on the tiny model (printed with -s)."""
import pytest
import torch

from mova_rt.cache import StepCache
from mova_rt.pipeline import MovaPipeline


def _simulate(cache: StepCache, steps: int, switch: int | None = None, passes: int = 2,
              change: float = 0.0):
    """Drive the cache as the sampler does; returns the step indices whose passes were reused."""
    import mova_rt.cache as mc
    real = mc._change
    mc._change = lambda *a: change
    try:
        reused = []
        x = torch.ones(1, 4, 8)
        for i in range(steps):
            cache.begin_step(i, "expert-2" if switch is not None and i >= switch else "expert-1")
            got = []
            for p in range(passes):                 # each pass: first layer, then the rest
                got.append(cache.after_first_layer(p, x, x, x, x))
                if got[-1] is None:
                    cache.store(x, x)
            assert len({g is None for g in got}) == 1          # one decision for every pass
            if got[0] is not None:
                reused.append(i)
            cache.end_step()
        return reused
    finally:
        mc._change = real


def test_schedule_every_other_step_never_first_last_or_at_the_switch():
    cache = StepCache.every_other(50)
    reused = _simulate(cache, 50, switch=18)
    assert 0 not in reused and 49 not in reused and 18 not in reused
    assert all(i % 2 == 0 for i in reused)
    assert len(reused) == 23 and cache.reused == 46 and cache.computed == 54
    assert (cache.computed + cache.reused) / cache.computed >= 1.8


def test_auto_reuses_below_threshold_with_a_cap_on_consecutive_reuses():
    cache = StepCache("auto", threshold=0.1, max_reuse=2, num_steps=12)
    assert _simulate(cache, 12, change=0.05) == [1, 2, 4, 5, 7, 8, 10]
    cache = StepCache("auto", threshold=0.1, max_reuse=2, num_steps=12)
    assert _simulate(cache, 12, change=0.5) == []
    with pytest.raises(ValueError):
        StepCache("sometimes")


@pytest.fixture(scope="module")
def pipe(tiny_ckpt):
    return MovaPipeline.from_pretrained(tiny_ckpt, device="cpu", dtype="bf16")


KW = dict(height=64, width=96, num_frames=17, progress=False, seed=2, num_inference_steps=12)


def test_cache_without_reuse_is_exact(pipe):
    """Threshold 0: every layer is computed through the split (first layer, then the rest): the
    result is the exact run, bit for bit."""
    exact = pipe("a dog barks", cfg_batch=False, **KW)
    split = pipe("a dog barks", cfg_batch=False, cache="auto", cache_threshold=0.0, **KW)
    assert split.reused == 0 and split.forwards == exact.forwards == 24
    assert torch.equal(split.video_latents, exact.video_latents)
    assert torch.equal(split.audio_latents, exact.audio_latents)


@pytest.mark.parametrize("batch", [False, True])
def test_schedule_error_against_the_exact_run(pipe, batch):
    exact = pipe("a dog barks", cfg_batch=batch, **KW)
    cached = pipe("a dog barks", cfg_batch=batch, cache="schedule", **KW)
    errs = [((c - e).norm() / e.norm()).item() for c, e in
            ((cached.video_latents, exact.video_latents),
             (cached.audio_latents, exact.audio_latents))]
    print(f"\nstep cache (schedule, 12 steps, batch={batch}): {cached.forwards} computed + "
          f"{cached.reused} reused forwards; relative error video {errs[0]:.4f}, "
          f"audio {errs[1]:.4f}")
    assert cached.forwards + cached.reused == 24 and cached.reused == 10   # steps 2, 4, .., 10
    assert all(0 < e < 0.2 for e in errs)       # approximate, but not broken
