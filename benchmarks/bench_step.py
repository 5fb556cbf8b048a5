"""Denoising-step benchmark: several runtime configurations, side by side on the same weights.

The weights of one video expert (high noise: the first 18 of 50 steps run on it, and both experts
have the same shape), the audio DiT and the bridge are built once in bf16, with random values made
directly on the device or loaded from `--ckpt_path`. Each configuration gets a runner sharing those
tensors and its own copy of the same initial latents. Steps alternate between configurations
(warm-up rounds, then timed rounds) so that drift of the machine hits every configuration alike.

A step is the reference README's: all guidance forwards + the latent updates (text encoding and VAE
excluded; `--time-stages` times them apart). Each timed step is synchronised before and after.
The last warm-up step of each configuration (or one extra step, without warm-up) runs with timing
hooks on the towers; the timed steps run without them.
"""

from __future__ import annotations

import gc
import time

import torch

from mova_rt.checkpoint import randomize_
from mova_rt.config import MovaConfig
from mova_rt.errors import MovaInputError
from mova_rt.loader import load_state
from mova_rt.models.audio_dit import AudioDiT
from mova_rt.models.bridge import Bridge
from mova_rt.models.video_dit import VideoDiT
from mova_rt.ops import resolve
from mova_rt.scheduler import FlowMatchScheduler

from .configs import RuntimeConfig
from .flops import Shapes
from .measure import GIB, PeakSampler, spread, sync, tower_timer

WEIGHT_DTYPE = torch.bfloat16
TOWERS = (("video_dit", VideoDiT), ("audio_dit", AudioDiT), ("dual_tower_bridge", Bridge))


def tower_config(cfg: MovaConfig, name: str):
    return {"video_dit": cfg.video_dit, "audio_dit": cfg.audio_dit,
            "dual_tower_bridge": cfg.bridge}[name]


def build_shared_weights(cfg: MovaConfig, device: torch.device, ckpt_path: str | None,
                         seed: int) -> dict:
    """bf16 weights of the modules one forward uses, on `device`."""
    ops = resolve("reference")
    gen = torch.Generator(device=device).manual_seed(seed)
    shared = {}
    for name, cls in TOWERS:
        with torch.device("meta"):
            module = cls(tower_config(cfg, name), ops).to(WEIGHT_DTYPE)
        if ckpt_path:
            module = load_state(module, ckpt_path, name, WEIGHT_DTYPE, device)
        else:
            module = randomize_(module, gen, device)
        shared[name] = module.eval()
    sync(device)
    return shared


def make_inputs(cfg: MovaConfig, s: Shapes, device: torch.device, seed: int) -> dict:
    """Noise, the conditioning tensor and two text embeddings at the clip's shapes."""
    gen = torch.Generator(device=device).manual_seed(seed + 1)
    t, h, w = s.latent_grid

    def randn(*shape, dtype=torch.float32):
        return torch.randn(shape, generator=gen, device=device, dtype=dtype)

    mask = torch.zeros(1, cfg.video_vae.scale_factor_temporal, t, h, w, device=device)
    mask[:, :, 0] = 1.0
    return {"latents": randn(1, s.z_dim, t, h, w),
            "audio": randn(1, s.audio_channels, s.L_a),
            "condition": torch.cat([mask, randn(1, s.z_dim, t, h, w)], dim=1),
            "pos": randn(1, s.L_t, s.text_dim, dtype=WEIGHT_DTYPE),
            "neg": randn(1, s.L_t, s.text_dim, dtype=WEIGHT_DTYPE)}


def _oom_message(e: Exception, device: torch.device, where: str) -> str:
    first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
    peak = torch.cuda.max_memory_allocated(device) / GIB if device.type == "cuda" else 0.0
    return f"out of memory during {where} (peak allocated {peak:.2f} GiB): {first[:200]}"


def free_device_memory(device: torch.device):
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


class ConfigRun:
    """One configuration's runner, latent state and measurements."""

    def __init__(self, rc: RuntimeConfig):
        self.rc = rc
        self.runner = None
        self.state = None
        self.index = 0
        self.status, self.message = "ok", ""
        self.prepare_s = 0.0
        self.warmup_s: list[float] = []
        self.step_s: list[float] = []
        self.towers_s: dict[str, float] = {}
        self.peak_alloc = self.peak_device = self.peak_rss = 0
        self.forwards_per_step = 0

    @property
    def alive(self) -> bool:
        return self.status == "ok"

    def fail(self, status: str, message: str):
        self.status, self.message = status, message
        self.runner = self.state = None


def run_steps(cfg: MovaConfig, shapes: Shapes, device: torch.device, configs: list,
              warmup: int, steps: int, shared: dict, inputs: dict, cfg_scale: float,
              num_inference_steps: int, log, progress=None,
              release: bool = False, forward_out=None) -> list[ConfigRun]:
    """progress(runs), when given, is called after every step (a child process rewrites its
    results file with it). release: empty `shared` once every configuration is prepared, so
    weights no runner uses (the bf16 originals of fp8 layers) are freed before the steps (a
    configuration alone in its process). forward_out(name) -> a path: after its steps, each
    configuration runs one forward on the initial inputs (the first timestep, the prompt pass)
    and saves its velocities there (forward_error compares them)."""
    sched = FlowMatchScheduler(cfg.scheduler, num_inference_steps)
    # Stay on the high-noise expert's steps (indices before the switch), as the first steps of a
    # real run do.
    high_noise = max(1, sched.expert_switch_index(cfg.pipeline.boundary_ratio))
    runs = [ConfigRun(rc) for rc in configs]
    for r in runs:
        t0 = time.perf_counter()
        try:
            r.runner = r.rc.prepare(shared, cfg, sched, cfg_scale, shapes.fps)
            r.state = {k: inputs[k].clone() for k in ("latents", "audio")}
            r.forwards_per_step = r.runner.step.forwards_per_step
        except torch.OutOfMemoryError as e:
            r.fail("oom", _oom_message(e, device, "preparation"))
            free_device_memory(device)
        except MovaInputError as e:      # e.g. a kernel set whose package is not installed
            r.fail("unavailable", str(e))
        sync(device)
        r.prepare_s = time.perf_counter() - t0
    if release:
        shared.clear()
        free_device_memory(device)

    def one_step(r: ConfigRun, towers: bool = False) -> float:
        runner, st = r.runner, r.state
        i = r.index % high_noise
        r.index += 1
        with PeakSampler(device) as peaks:
            sync(device)
            t0 = time.perf_counter()
            if towers:
                with tower_timer(device, runner.towers()) as tower_s:
                    lat, aud = runner.step(runner.video_dit, i, st["latents"], st["audio"],
                                           inputs["condition"], inputs["pos"], inputs["neg"])
            else:
                lat, aud = runner.step(runner.video_dit, i, st["latents"], st["audio"],
                                       inputs["condition"], inputs["pos"], inputs["neg"])
            sync(device)
            dt = time.perf_counter() - t0
        st["latents"], st["audio"] = lat, aud
        r.peak_alloc = max(r.peak_alloc, peaks.peak_alloc)
        r.peak_device = max(r.peak_device, peaks.peak_device)
        r.peak_rss = max(r.peak_rss, peaks.peak_rss)
        if towers:
            per_forward = runner.step.forwards_per_step
            r.towers_s = {k: v / per_forward for k, v in tower_s.items()}
            r.towers_s["rest"] = max(0.0, dt / per_forward - sum(r.towers_s.values()))
        return dt

    def guarded(r: ConfigRun, what: str, towers: bool = False):
        try:
            return one_step(r, towers)
        except torch.OutOfMemoryError as e:
            r.fail("oom", _oom_message(e, device, what))
            free_device_memory(device)
            log(f"{r.rc.name}: {r.message}")
            return None

    rounds = [("warm-up", k) for k in range(warmup)] + [("timed", k) for k in range(steps)]
    for phase, k in rounds:
        for r in runs:
            if not r.alive:
                continue
            towers = phase == "warm-up" and k == warmup - 1 and r.rc.tower_timing
            dt = guarded(r, f"{phase} step {k + 1}", towers)
            if dt is None:
                continue
            (r.warmup_s if phase == "warm-up" else r.step_s).append(dt)
            if progress is not None:
                progress(runs)
            log(f"{r.rc.name}: {phase} step {k + 1}/{warmup if phase == 'warm-up' else steps} "
                f"{dt:.3f} s")
    for r in runs:
        if r.alive and warmup == 0 and r.rc.tower_timing:   # tower breakdown: an extra step
            guarded(r, "tower-timing step", towers=True)
        if r.alive and forward_out is not None:
            save_forward(r.runner, inputs, forward_out(r.rc.name))
        if r.alive:
            finite = all(bool(torch.isfinite(x).all()) for x in r.state.values())
            if not finite:
                r.message = "latents became non-finite (random weights); timings are unaffected"
        r.runner = r.state = None
    free_device_memory(device)
    return runs


@torch.no_grad()
def save_forward(runner, inputs: dict, path: str) -> None:
    """One dual-tower forward of `runner` on the initial inputs (first timestep, prompt pass,
    bridge on), its video and audio velocities saved in fp32 to `path` (safetensors)."""
    from safetensors.torch import save_file
    step = runner.step
    t = torch.tensor(step.timesteps[:1], dtype=torch.float32, device=inputs["latents"].device)
    model_in = torch.cat([inputs["latents"], inputs["condition"]], dim=1)
    video, audio = step.forward(runner.video_dit, model_in, inputs["audio"], inputs["pos"], t,
                                step.fps)
    save_file({"video": video.float().cpu().contiguous(), "audio": audio.float().cpu().contiguous()},
              path)


def forward_errors(paths: dict) -> dict:
    """{name: {"video": rel, "audio": rel}}: each saved forward's relative L2 distance to the
    first one's (paths: name -> file, in order; names without a file are left out)."""
    from safetensors.torch import load_file
    import os
    found = [(n, p) for n, p in paths.items() if p and os.path.exists(p)]
    if not found:
        return {}
    base = load_file(found[0][1])
    out = {}
    for name, path in found:
        got = load_file(path)
        out[name] = {k: ((got[k] - base[k]).norm() / base[k].norm().clamp_min(1e-30)).item()
                     for k in ("video", "audio")}
    return out


def summarise(runs: list[ConfigRun], flops_per_forward: float, ceilings: dict) -> list[dict]:
    """Per-configuration figures for the report and the JSON. Ratios are step-time ratios to the
    first configuration named (None when it has no time, e.g. out of memory)."""
    out = []
    first = spread(runs[0].step_s)["median"] if runs and runs[0].step_s else None
    matmul = ceilings.get("matmul", {}).get("value")
    for r in runs:
        d = {"name": r.rc.name, "description": r.rc.description, "status": r.status,
             "message": r.message, "prepare_s": r.prepare_s, "warmup_s": r.warmup_s,
             "peak_vram_allocated_gib": r.peak_alloc / GIB,
             "peak_vram_device_gib": r.peak_device / GIB, "peak_rss_gib": r.peak_rss / GIB,
             "towers_s_per_forward": r.towers_s}
        if r.step_s:
            s = spread(r.step_s)
            fwd = r.forwards_per_step
            d.update(step_s=s, forwards_per_step=fwd,
                     tflops=fwd * flops_per_forward / s["median"] / 1e12)
            d["fraction_of_matmul_ceiling"] = d["tflops"] / matmul if matmul else None
            d["ratio_to_first"] = s["median"] / first if first else None
        out.append(d)
    return out
