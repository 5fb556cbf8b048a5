"""The flow-matching sampler against the spec's numbers and an independent float64 formula."""
import math

import numpy as np
import pytest
import torch

from mova_rt.config import SchedulerConfig
from mova_rt.scheduler import FlowMatchScheduler

EXTRA_STEP = dict(shift=5.0, sigma_min=0.0, extra_one_step=True, num_train_timesteps=1000)
CLASSIC = dict(shift=5.0, sigma_min=0.003 / 1.002, extra_one_step=False, num_train_timesteps=1000)


def shifted(n, sigma_min, extra, shift):
    base = np.linspace(1.0, sigma_min, n + 1)[:-1] if extra else np.linspace(1.0, sigma_min, n)
    return shift * base / (1 + (shift - 1) * base)


@pytest.mark.parametrize("cfg", [EXTRA_STEP, CLASSIC])
def test_fifty_steps_shift5_switch_after_18(cfg):
    s = FlowMatchScheduler(SchedulerConfig(**cfg), 50)
    assert s.timesteps.dtype == torch.float32 and len(s.timesteps) == 50
    assert s.timesteps[0].item() == pytest.approx(1000.0)
    assert (s.timesteps >= 900).sum().item() == 18
    assert s.expert_switch_index(0.9) == 18
    ref = 1000 * shifted(50, cfg["sigma_min"], cfg["extra_one_step"], 5.0)
    np.testing.assert_allclose(s.timesteps.numpy(), ref, rtol=1e-5)


def test_switch_values_and_25_steps():
    s = FlowMatchScheduler(SchedulerConfig(**EXTRA_STEP), 50)
    assert s.timesteps[17].item() == pytest.approx(906.6, abs=0.1)
    assert s.timesteps[18].item() == pytest.approx(898.9, abs=0.1)
    assert s.sigmas[-1].item() == pytest.approx(0.0926, abs=1e-4)
    s = FlowMatchScheduler(SchedulerConfig(**CLASSIC), 50)
    assert s.timesteps[17].item() == pytest.approx(904.4, abs=0.1)
    assert s.timesteps[18].item() == pytest.approx(896.4, abs=0.1)
    assert s.sigmas[-1].item() == pytest.approx(0.0148, abs=1e-4)
    assert FlowMatchScheduler(SchedulerConfig(**EXTRA_STEP), 25).expert_switch_index(0.9) == 9


def test_sigma_snaps_to_training_grid():
    """sigma(t) comes from the 1000-point training grid, not from the inference grid."""
    s = FlowMatchScheduler(SchedulerConfig(**CLASSIC), 50)
    train = 1000 * shifted(1000, CLASSIC["sigma_min"], False, 5.0)
    for t in s.timesteps.tolist():
        nearest = train[np.argmin(np.abs(train - t))] / 1000
        assert s.sigma_of(t).item() == pytest.approx(nearest, abs=1e-6)
    # With sigma_min 0.003/1.002 the snapping moves sigma by up to ~1.6e-3 (spec 3.1).
    gaps = [abs(s.sigma_of(t).item() - t / 1000) for t in s.timesteps.tolist()]
    assert 1e-4 < max(gaps) < 2e-3
    # With sigma_min 0 + extra step the inference grid is an exact subset of the training grid.
    e = FlowMatchScheduler(SchedulerConfig(**EXTRA_STEP), 50)
    assert max(abs(e.sigma_of(t).item() - sg) for t, sg in zip(e.timesteps.tolist(),
                                                                  e.sigmas.tolist())) < 1e-6


def test_euler_update_and_final_step_to_zero():
    s = FlowMatchScheduler(SchedulerConfig(**EXTRA_STEP), 4)
    x = torch.randn(2, 3)
    v = torch.randn(2, 3)
    t = s.timesteps.tolist()
    out = s.step(v, t[1], t[2], x)
    expect = x + v * (s.sigma_of(t[2]) - s.sigma_of(t[1]))
    assert torch.equal(out, expect)
    last = s.step(v, t[-1], None, x)
    assert torch.allclose(last, x - v * s.sigma_of(t[-1]), atol=0, rtol=0)
    # Integrating a constant velocity from sigma 1 to 0 moves x by exactly -v.
    y = x.clone()
    for i in range(4):
        y = s.step(v, t[i], t[i + 1] if i + 1 < 4 else None, y)
    assert torch.allclose(y, x - v * s.sigma_of(t[0]), atol=1e-6)


def test_exponential_shift_and_shift_terminal():
    cfg = SchedulerConfig(exponential_shift=True, exponential_shift_mu=0.7, sigma_min=0.0,
                          extra_one_step=True)
    s = FlowMatchScheduler(cfg, 10)
    base = np.linspace(1.0, 0.0, 11)[:-1]
    mu = math.exp(0.7)
    np.testing.assert_allclose(s.sigmas.numpy(), mu / (mu + (1 / base - 1)), rtol=1e-5)
    s = FlowMatchScheduler(SchedulerConfig(shift=5.0, shift_terminal=0.1, sigma_min=0.0,
                                           extra_one_step=True), 10)
    assert s.sigmas[-1].item() == pytest.approx(0.1, abs=1e-6)
