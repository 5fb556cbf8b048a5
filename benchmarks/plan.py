"""The full-size path without a GPU: the real architecture on the meta device.

`mova-rt bench --device meta` builds the towers at the preset's real sizes on the meta device (no
memory), runs one dual-tower forward of the real code on meta tensors, and reports:
- parameters per tower against the spec's counts (2.1) and the bf16 weight bytes;
- output shapes of the forward (the full-size shape path runs end to end);
- FLOPs counted by torch's FlopCounterMode on that forward, per tower, against the formulas of
  flops.py (spec 4.2);
- an estimate of the peak activation memory: the largest sum of live tensor bytes during the
  forward, tracked op by op. Attention is counted as a fused kernel would need it (its output
  only): on meta the SDPA call decomposes into the math path, whose L x L score matrix no real
  backend at these sizes materialises.
"""

from __future__ import annotations

import weakref

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten
from torch.utils.flop_counter import FlopCounterMode

from mova_rt.config import MovaConfig
from mova_rt.models.audio_dit import AudioDiT
from mova_rt.models.bridge import Bridge
from mova_rt.models.dual_tower import Prepared, dual_tower_forward
from mova_rt.models.video_dit import VideoDiT
from mova_rt.ops import resolve

from .flops import SPEC_PARAMS, Shapes, forward_flops, param_counts
from .measure import GIB


class LiveBytes(TorchDispatchMode):
    """Tracks the bytes of tensors created by ops while they are alive, and their peak.

    A tensor's bytes are released when the last Python reference to it (or to a view of it) dies.
    Views and in-place results (outputs whose schema aliases an input) allocate nothing.
    Inside `opaque()` intermediate tensors are not counted; the caller registers the result.
    """

    def __init__(self):
        super().__init__()
        self.live = self.peak = 0
        self.opaque_depth = 0

    def track(self, t: torch.Tensor):
        n = t.untyped_storage().nbytes()
        self.live += n
        self.peak = max(self.peak, self.live)
        weakref.finalize(t, self._release, n)

    def _release(self, n: int):
        self.live -= n

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if self.opaque_depth:
            return out
        aliasing = any(r.alias_info is not None for r in func._schema.returns)
        if aliasing:
            # A view keeps its base alive: hold a reference from every view to its inputs.
            inputs = [a for a in tree_flatten((args, kwargs))[0] if isinstance(a, torch.Tensor)]
            for t in tree_flatten(out)[0]:
                # An in-place result is its own input: a reference to itself would be a cycle.
                if isinstance(t, torch.Tensor) and not any(t is a for a in inputs):
                    t._mova_bases = inputs
            return out
        for t in tree_flatten(out)[0]:
            if isinstance(t, torch.Tensor):
                self.track(t)
        return out


def _opaque_attention(tracker: LiveBytes):
    """Wraps an attention backend so that it counts as one fused kernel (output bytes only)."""
    def wrap(attention):
        def fused(q, k, v):
            tracker.opaque_depth += 1
            try:
                out = attention(q, k, v)
            finally:
                tracker.opaque_depth -= 1
            tracker.track(out)
            return out
        return fused
    return wrap


def _count_per_tower(counter: FlopCounterMode, towers: dict) -> tuple[dict, list]:
    """FLOPs counted inside each tower's modules: hooks read the counter's running total before
    and after every call (blocks are called directly by dual_tower_forward, so the counter's own
    module names cannot tell the video blocks from the audio ones)."""
    counted = {name: 0 for name in towers}
    handles = []
    for name, modules in towers.items():
        start = []

        def pre(module, args, start=start):
            start.append(counter.get_total_flops())

        def post(module, args, out, name=name, start=start):
            counted[name] += counter.get_total_flops() - start.pop()

        for m in modules:
            handles += [m.register_forward_pre_hook(pre), m.register_forward_hook(post)]
    return counted, handles


# (id of the config, shapes, kernels) -> (the config, its plan): a command that checks a clip's
# memory before it starts (mova_rt/validate/memory.py) and then reports the same plan (bench) or
# estimates offload from it (generate) traces the full-size forward once, not twice (seconds at
# 720p); the config is held so its id cannot be reused.
_PLANS: dict = {}


def meta_plan(cfg: MovaConfig, s: Shapes, kernels: str = "reference") -> dict:
    """The plan of one forward at the clip's shapes, traced on the meta device (module
    docstring); computed once per (config, shapes, kernels) in a process."""
    key = (id(cfg), s, kernels)
    if key not in _PLANS:
        _PLANS[key] = (cfg, _meta_plan(cfg, s, kernels))
    return _PLANS[key][1]


def _meta_plan(cfg: MovaConfig, s: Shapes, kernels: str) -> dict:
    tracker = LiveBytes()
    ops = resolve(kernels, wrap_attention=_opaque_attention(tracker))
    with torch.device("meta"):
        modules = {"video_dit": VideoDiT(cfg.video_dit, ops).to(torch.bfloat16),
                   "audio_dit": AudioDiT(cfg.audio_dit, ops).to(torch.bfloat16),
                   "dual_tower_bridge": Bridge(cfg.bridge, ops).to(torch.bfloat16)}
    params = param_counts(modules)
    meta = torch.device("meta")
    t, h, w = s.latent_grid
    video_in = torch.empty(1, s.z_dim + cfg.video_vae.scale_factor_temporal + s.z_dim, t, h, w,
                           device=meta)
    audio_in = torch.empty(1, s.audio_channels, s.L_a, device=meta)
    text = torch.empty(1, s.L_t, s.text_dim, device=meta, dtype=torch.bfloat16)
    timestep = torch.empty(1, device=meta)
    counter = FlopCounterMode(display=False)
    counted_towers, handles = _count_per_tower(counter, {
        "video_blocks": list(modules["video_dit"].blocks),
        "audio_blocks": list(modules["audio_dit"].blocks),
        "bridge": [modules["dual_tower_bridge"]]})
    try:
        with counter, tracker:
            # The text K/V (computed once per request by the sampler) belong to the blocks.
            kv = {}
            for name in ("video_dit", "audio_dit"):
                dit = modules[name]
                ctx = dit.text_embedding(text)
                before = counter.get_total_flops()
                kv[name] = [block.cross_attn.kv(ctx) for block in dit.blocks]
                counted_towers[name.split("_")[0] + "_blocks"] += counter.get_total_flops() - before
            video_v, audio_v = dual_tower_forward(
                modules["video_dit"], modules["audio_dit"], modules["dual_tower_bridge"], video_in,
                audio_in, text, timestep, s.fps,
                prepared=Prepared(video_text=kv["video_dit"], audio_text=kv["audio_dit"]))
            out_shapes = [list(video_v.shape), list(audio_v.shape)]
    finally:
        for handle in handles:
            handle.remove()
    formula = forward_flops(cfg, s)
    formula_towers = {
        "video_blocks": formula["video_linear"] + formula["video_self_attention"]
        + formula["video_text_attention"],
        "audio_blocks": formula["audio_linear"] + formula["audio_attention"],
        "bridge": formula["bridge_linear"] + formula["bridge_attention"]}
    weights = sum(params.values()) * 2   # bf16
    latent_bytes = 4 * (2 * s.z_dim * t * h * w + (s.z_dim + 4) * t * h * w
                        + 2 * s.audio_channels * s.L_a)
    return {
        "params": params,
        "spec_params": {k: v for k, v in SPEC_PARAMS.items()},
        "weights_gib": weights / GIB,
        "forward_output_shapes": out_shapes,
        "flops_counted_total": counter.get_total_flops(),
        "flops_counted_towers": counted_towers,
        "flops_formula_total": sum(formula.values()),
        "flops_formula_towers": formula_towers,
        "flops_formula": formula,
        "activation_peak_gib": tracker.peak / GIB,
        "latents_gib": latent_bytes / GIB,
        "vram_estimate_gib": (weights + tracker.peak + latent_bytes) / GIB,
        "vram_estimate_note": "bf16 weights of one expert + audio DiT + bridge, the peak of live "
                              "activation tensors in one forward (fused attention), the fp32 "
                              "latents; excludes the CUDA context and allocator fragmentation",
    }
