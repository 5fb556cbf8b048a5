"""Flow-matching Euler sampler with sigma shift, as MOVA's FlowMatchPairScheduler runs it (spec 3.1).

    sigmas   = linspace(sigma_start, sigma_min, N)   (or N+1 points without the last one when
               extra_one_step), then shifted: s * sigma / (1 + (s - 1) * sigma)
    t        = 1000 * sigma                           (what the DiT sees)
    x_next   = x + v * (sigma(t_next) - sigma(t))     (sigma(t_last -> end) = 0)

Quirk reproduced on purpose: sigma(t) is not read from the inference grid but from a 1000-point
"training" grid built once from the same config; t is snapped to its nearest entry (first on ties).
All schedule tensors are fp32 on the CPU, like the reference's.
"""

from __future__ import annotations

import math

import torch

from .config import SchedulerConfig


def _sigmas(cfg: SchedulerConfig, n: int) -> torch.Tensor:
    sigma_start = cfg.sigma_min + (cfg.sigma_max - cfg.sigma_min) * 1.0  # denoising strength 1
    if cfg.extra_one_step:
        sigmas = torch.linspace(sigma_start, cfg.sigma_min, n + 1)[:-1]
    else:
        sigmas = torch.linspace(sigma_start, cfg.sigma_min, n)
    if cfg.exponential_shift:
        mu = math.exp(cfg.exponential_shift_mu)
        sigmas = mu / (mu + (1 / sigmas - 1))
    else:
        sigmas = cfg.shift * sigmas / (1 + (cfg.shift - 1) * sigmas)
    if cfg.shift_terminal is not None:
        one_minus = 1 - sigmas
        sigmas = 1 - one_minus / (one_minus[-1] / (1 - cfg.shift_terminal))
    return sigmas


class FlowMatchScheduler:
    def __init__(self, cfg: SchedulerConfig, num_inference_steps: int):
        if num_inference_steps < 1:
            raise ValueError("num_inference_steps must be >= 1")
        self.cfg = cfg
        self.train_sigmas = _sigmas(cfg, cfg.num_train_timesteps)
        self.train_timesteps = self.train_sigmas * cfg.num_train_timesteps
        self.sigmas = _sigmas(cfg, num_inference_steps)
        self.timesteps = self.sigmas * cfg.num_train_timesteps      # [N] fp32, CPU

    def sigma_of(self, t: float) -> torch.Tensor:
        """sigma of timestep t, snapped to the training grid (0-dim fp32 tensor)."""
        idx = torch.argmin((self.train_timesteps - torch.tensor(float(t))).abs())
        return self.train_sigmas[idx]

    def step(self, velocity: torch.Tensor, t: float, t_next: float | None,
             sample: torch.Tensor) -> torch.Tensor:
        """One Euler step from t to t_next (None = the final step, to sigma 0), in fp32."""
        sigma = self.sigma_of(t)
        sigma_next = torch.zeros((), dtype=sigma.dtype) if t_next is None else self.sigma_of(t_next)
        return sample + velocity * (sigma_next - sigma).to(velocity.device)

    def expert_switch_index(self, boundary_ratio: float) -> int:
        """Index of the first step whose timestep is below boundary_ratio * num_train_timesteps
        (the low-noise expert runs from there on); N if none is."""
        boundary = boundary_ratio * self.cfg.num_train_timesteps
        for i, t in enumerate(self.timesteps.tolist()):
            if t < boundary:
                return i
        return len(self.timesteps)
