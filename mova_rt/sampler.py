"""One denoising step of the joint sampler (spec 3.3 - 3.5).

A step is what the reference README times: every guidance forward of the dual-tower network at one
timestep, the guidance combination, and the Euler flow-matching update of both latents. The
pipeline and the benchmark suite run the same object, so a benchmarked step is a generated step.

    model_in = [latents | condition]                       # [B, 36, T, h, w]
    v_pos, a_pos = forward(expert, model_in, audio, text_pos, t)
    v_neg, a_neg = forward(expert, model_in, audio, text_neg, t)   (only when cfg_scale != 1)
    v = v_neg + s * (v_pos - v_neg)   (fp32, the same for audio)
    latents, audio = Euler(latents, v), Euler(audio, a)
"""

from __future__ import annotations

from typing import Callable

import torch

from .scheduler import FlowMatchScheduler


class GuidedStep:
    """forward(dit, video_in, audio_in, text, timestep[1], fps) -> (video_v, audio_v)."""

    def __init__(self, forward: Callable, scheduler: FlowMatchScheduler, cfg_scale: float,
                 fps: float):
        self.forward = forward
        self.scheduler = scheduler
        self.cfg_scale = cfg_scale
        self.fps = fps
        self.timesteps = scheduler.timesteps.tolist()   # host floats: no device sync per step

    @property
    def forwards_per_step(self) -> int:
        return 1 if self.cfg_scale == 1.0 else 2

    def __call__(self, dit, i: int, latents: torch.Tensor, audio: torch.Tensor,
                 condition: torch.Tensor, pos: torch.Tensor, neg: torch.Tensor | None):
        """Step i of the schedule: returns the updated (latents, audio), both fp32."""
        steps = self.timesteps
        t = torch.tensor([steps[i]], dtype=torch.float32, device=latents.device)
        model_in = torch.cat([latents, condition], dim=1)
        v_pos, a_pos = self.forward(dit, model_in, audio, pos, t, self.fps)
        v_vel, a_vel = v_pos.float(), a_pos.float()
        if self.cfg_scale != 1.0:
            v_neg, a_neg = self.forward(dit, model_in, audio, neg, t, self.fps)
            v_vel = v_neg.float() + self.cfg_scale * (v_vel - v_neg.float())
            a_vel = a_neg.float() + self.cfg_scale * (a_vel - a_neg.float())
        t_next = steps[i + 1] if i + 1 < len(steps) else None
        return (self.scheduler.step(v_vel, steps[i], t_next, latents),
                self.scheduler.step(a_vel, steps[i], t_next, audio))
