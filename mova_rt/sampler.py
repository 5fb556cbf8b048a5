"""One denoising step of the joint sampler (spec 3.3 - 3.5), with its guidance and exact caches.

A step is what the reference README times: every guidance forward of the dual-tower network at one
timestep, the guidance combination (fp32), and the Euler flow-matching update of both latents. The
pipeline and the benchmark suite run the same object, so a benchmarked step is a generated step.

Guidance (velocities v(text, bridge)):
- text CFG, the released pipeline (s_B = 1): v = v(neg) + s_T (v(pos) - v(neg)); one pass when
  s_T = 1.
- Dual CFG (paper 5.1, spec 3.3), s_B != 1:
      v = v(neg, off) + s_B [v(neg, on) - v(neg, off)] + s_T [v(pos, on) - v(neg, on)]
  three passes; when s_B = s_T = s it is v(neg, off) + s [v(pos, on) - v(neg, off)], two passes.
  "off" skips the bridge: the towers run independently in that pass.
The passes run one after the other (the reference's order: prompt first), or, batched, as one
forward over a batch of 2 or 3 (bridge-off rows first, so the bridge runs on the others only), or,
with CFG parallel (a mova_rt.parallel.Mesh with cfg_groups > 1), one pass on each rank group, the
velocities all-gathered and combined as on one process.

Exact caches (no approximation): the time embeddings of every step of an expert are computed when
the expert first runs, the text K/V of every cross-attention layer once per (expert, text), the RoPE
descriptions once per shape. They hold the very values the forward would compute.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch

from .cache import StepCache
from .models.dual_tower import Prepared, ropes, text_kv
from .models.video_dit import time_embeddings
from .scheduler import FlowMatchScheduler


@dataclass(frozen=True)
class Guidance:
    cfg_scale: float = 5.0          # s_T
    bridge_cfg_scale: float = 1.0   # s_B; 1 = the released text CFG
    batch: bool = False             # all passes of a step as one batch

    def passes(self) -> list:
        """(text, bridge_on) of each forward, in the order they run (and batch rows)."""
        s_t, s_b = self.cfg_scale, self.bridge_cfg_scale
        if s_b == 1.0:
            return [("pos", True)] if s_t == 1.0 else [("pos", True), ("neg", True)]
        if s_b == s_t:
            return [("neg", False), ("pos", True)]
        return [("neg", False), ("neg", True), ("pos", True)]

    def combine(self, v: list) -> torch.Tensor:
        """Velocities of passes() (fp32) -> the guided velocity."""
        s_t, s_b = self.cfg_scale, self.bridge_cfg_scale
        if s_b == 1.0:
            if s_t == 1.0:
                return v[0]
            pos, neg = v
            return neg + s_t * (pos - neg)
        if s_b == s_t:
            off, on = v
            return off + s_t * (on - off)
        off, neg_on, pos_on = v
        return off + s_b * (neg_on - off) + s_t * (pos_on - neg_on)


class GuidedStep:
    """forward(dit, video_in, audio_in, text, timestep[1], fps, prepared=, bridge_from=) ->
    (video_v, audio_v); audio_dit and bridge are the shared towers (for the caches)."""

    def __init__(self, forward: Callable, scheduler: FlowMatchScheduler, guidance, fps: float,
                 audio_dit=None, bridge=None, step_cache: StepCache | None = None, mesh=None):
        self.forward = forward
        self.mesh = mesh if mesh is not None and mesh.config.cfg_groups > 1 else None
        self.scheduler = scheduler
        self.guidance = guidance if isinstance(guidance, Guidance) else Guidance(float(guidance))
        self.fps = fps
        self.audio_dit, self.bridge = audio_dit, bridge
        self.step_cache = step_cache if step_cache is not None and step_cache.enabled else None
        self.timesteps = scheduler.timesteps.tolist()   # host floats: no device sync per step
        self._dit = None
        self._times: dict = {}
        self._texts: dict = {}          # per expert (dropped at the switch)
        self._audio_texts: dict = {}    # the audio DiT is shared by both experts
        self._ropes: dict = {}

    @property
    def cfg_scale(self) -> float:
        return self.guidance.cfg_scale

    @property
    def forwards_per_step(self) -> int:
        return len(self.guidance.passes())

    # -- exact caches -------------------------------------------------------------------------
    def _use(self, dit):
        """A new expert: drop the previous one's caches (it may be freed), embed every step."""
        if dit is self._dit:
            return
        self._dit, self._texts = dit, {}
        dev = dit.patch_embedding.weight.device
        dtype = dit.patch_embedding.weight.dtype
        t_all = torch.tensor(self.timesteps, dtype=torch.float32, device=dev)
        self._times = {}
        for i in range(len(self.timesteps)):
            t = t_all[i:i + 1]
            self._times[i] = (time_embeddings(dit, t, dtype),
                              time_embeddings(self.audio_dit, t, dtype))

    def _prepared(self, dit, i: int, names: tuple, text: torch.Tensor, video_in, audio_in):
        if self.audio_dit is None:      # no towers given: the forward computes everything
            return None
        self._use(dit)
        if names not in self._texts:
            self._texts[names] = text_kv(dit, text)
        if names not in self._audio_texts:
            self._audio_texts[names] = text_kv(self.audio_dit, text)
        pf, ph, pw = dit.patch_size
        _, _, t, h, w = video_in.shape
        grid, agrid = (t // pf, h // ph, w // pw), (audio_in.shape[-1] // self.audio_dit.patch_size[0],)
        dtype = dit.patch_embedding.weight.dtype
        if (grid, agrid) not in self._ropes:
            self._ropes[(grid, agrid)] = ropes(dit, self.audio_dit, self.bridge, grid, agrid,
                                               self.fps, dtype, video_in.device)
        (vt, at), kv_v, kv_a = self._times[i], self._texts[names], self._audio_texts[names]
        return Prepared(video_time=vt, audio_time=at, video_text=kv_v, audio_text=kv_a,
                        ropes=self._ropes[(grid, agrid)])

    # -- one step -----------------------------------------------------------------------------
    @torch.no_grad()    # the caches made here outlive the step: autograd must record none of it
    def __call__(self, dit, i: int, latents: torch.Tensor, audio: torch.Tensor,
                 condition: torch.Tensor, pos: torch.Tensor, neg: torch.Tensor | None):
        """Step i of the schedule: returns the updated (latents, audio), both fp32."""
        steps = self.timesteps
        t = torch.tensor([steps[i]], dtype=torch.float32, device=latents.device)
        model_in = torch.cat([latents, condition], dim=1)
        passes = self.guidance.passes()
        texts = {"pos": pos, "neg": neg}
        cache = self.step_cache
        extra = {}
        if cache is not None:
            cache.begin_step(i, dit)
            extra["step_cache"] = cache
        if self.mesh is not None:                    # CFG parallel: this group's pass
            name, on = passes[self.mesh.cfg_index]
            prep = self._prepared(dit, i, (name,), texts[name], model_in, audio)
            if cache is not None:
                extra["cache_key"] = (name, on)
            vv, av = self.forward(dit, model_in, audio, texts[name], t, self.fps,
                                  prepared=prep, bridge_from=0 if on else 1, **extra)
            outs = list(zip(self.mesh.gather_passes(vv.float()),
                            self.mesh.gather_passes(av.float())))
        elif self.guidance.batch and len(passes) > 1:
            n, off = len(passes), sum(1 for _, on in passes if not on)
            names = tuple(name for name, _ in passes)
            text = torch.cat([texts[name] for name in names])
            v_in = model_in.expand(n, *model_in.shape[1:]).contiguous()
            a_in = audio.expand(n, *audio.shape[1:]).contiguous()
            prep = self._prepared(dit, i, names, text, v_in, a_in)
            if cache is not None:
                extra["cache_key"] = names
            vv, av = self.forward(dit, v_in, a_in, text, t, self.fps, prepared=prep,
                                  bridge_from=off, **extra)
            outs = [(vv[j:j + 1].float(), av[j:j + 1].float()) for j in range(n)]
        else:
            outs = []
            for name, on in passes:
                prep = self._prepared(dit, i, (name,), texts[name], model_in, audio)
                if cache is not None:
                    extra["cache_key"] = (name, on)
                vv, av = self.forward(dit, model_in, audio, texts[name], t, self.fps,
                                      prepared=prep, bridge_from=0 if on else 1, **extra)
                outs.append((vv.float(), av.float()))
        if cache is not None:
            cache.end_step()
        v_vel = self.guidance.combine([o[0] for o in outs])
        a_vel = self.guidance.combine([o[1] for o in outs])
        t_next = steps[i + 1] if i + 1 < len(steps) else None
        return (self.scheduler.step(v_vel, steps[i], t_next, latents),
                self.scheduler.step(a_vel, steps[i], t_next, audio))
