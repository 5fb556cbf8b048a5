"""Whether a clip fits the device: refused before any weight is read, with the figure and the
limit, instead of dying in an allocation minutes later (or taking the machine's memory).

Two figures, both in GiB:
- the floor: buffers a run holds whatever the offload, from the clip size alone (Python
  integers: no overflow, no allocation): the latents, one bf16 hidden state per token, and when
  the clip is decoded the conditioning clip, the decoded frames (the VAE's float32 output and the
  two float32 temporaries of the post-processing, then the uint8 frames) and the waveform. It is
  computed first, so an absurd request (16384x16384, `--fps 1e-6`) never reaches the plan;
- the plan: what `mova-rt bench --device meta` computes (benchmarks/plan.py: the real forward on
  the meta device, its peak of live activations) turned into per-offload estimates by
  mova_rt.offload.plan_estimates (weights + activations x guidance batch + CUDA context).
On a GPU the least-offload estimate must fit its memory (offload moves weights to the host, not
activations); on the CPU everything lives in host memory. Estimates leave out allocator
fragmentation, so a run that passes can still run out of memory: that is reported with advice
(mova_rt.cli). `--device meta` has no memory; the floor is held to PLAN_LIMIT_GIB there, beyond
which the plan's own tensor sizes overflow.
"""

from __future__ import annotations

import os

from ..errors import MovaInputError

GIB = 1024 ** 3
PLAN_LIMIT_GIB = 4096.0         # more than any single device; keeps the meta plan's sizes sane
DECODE_COPIES = 3               # float32 frame tensors alive at once while decoding (see above)


def host_memory_gib() -> float:
    """This machine's memory (MemTotal), or the cgroup's limit when lower (containers)."""
    total = None
    try:
        with open("/proc/meminfo") as fh:
            for line in fh:
                if line.startswith("MemTotal:"):
                    total = int(line.split()[1]) * 1024
                    break
    except (OSError, ValueError, IndexError):
        pass
    if total is None:
        total = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    for limit_file in ("/sys/fs/cgroup/memory.max", "/sys/fs/cgroup/memory/memory.limit_in_bytes"):
        try:
            with open(limit_file) as fh:
                text = fh.read().strip()
            if text.isdigit():
                total = min(total, int(text))
        except OSError:
            pass
    return total / GIB


def device_limit(device) -> tuple[float, str]:
    """(GiB, how to name them in a message) of the memory a run on `device` may use."""
    import torch

    device = torch.device(device)
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        gib = props.total_memory / GIB
        return gib, f"the {gib:.1f} GiB of this GPU ({props.name})"
    if device.type == "meta":
        return PLAN_LIMIT_GIB, f"the {PLAN_LIMIT_GIB:.0f} GiB that any single device could hold"
    gib = host_memory_gib()
    return gib, f"the {gib:.1f} GiB of memory of this machine"


def floor_parts(cfg, shapes, decode: bool) -> dict:
    """Bytes of the buffers every run of this clip holds, by part (see the module docstring)."""
    from ..config import audio_latent_length

    t, h, w = shapes.latent_grid
    z, ca = shapes.z_dim, shapes.audio_channels
    parts = {
        # noise, condition (z + 4 mask channels) and the step's velocity, video and audio
        "latents": 4 * ((3 * z + 4) * t * h * w + 2 * ca * shapes.L_a),
        "hidden states": 2 * (shapes.L_v * cfg.video_dit.dim + shapes.L_a * cfg.audio_dit.dim),
    }
    if decode:
        pixels = shapes.num_frames * 3 * shapes.height * shapes.width
        samples = (audio_latent_length(cfg.audio_vae.sample_rate, cfg.audio_vae.hop_length,
                                       shapes.num_frames, shapes.fps)
                   * cfg.audio_vae.hop_length)
        parts["decoded frames"] = 4 * pixels * DECODE_COPIES + pixels
        parts["conditioning clip"] = 4 * pixels
        parts["waveform"] = 6 * samples          # float32 samples, then int16 for the mp4
    return parts


def plan(cfg, shapes, kernels: str = "reference") -> dict:
    """The meta-device plan (benchmarks/plan.py) of one forward at this clip size."""
    from ..benchmarks.plan import meta_plan

    try:
        return meta_plan(cfg, shapes, kernels=kernels)
    except MovaInputError:
        raise
    except Exception:   # a kernel set that cannot trace on meta: the reference path's estimate
        return meta_plan(cfg, shapes)


def estimates(cfg, shapes, batch: int, kernels: str = "reference", cp_size: int = 1) -> dict:
    """The memory plan's GiB: `modes` (what each offload plan needs per rank, by
    mova_rt.offload.plan_estimates), `weights` (every component), `towers` (what a benchmark
    or a build holds: one expert, the audio DiT and the bridge, with one forward). Context
    parallelism splits the tokens (so the activations) over cp_size ranks, not the weights."""
    from ..offload import component_weights, plan_estimates

    p = plan(cfg, shapes, kernels)
    act = p["activation_peak_gib"] / max(1, cp_size)
    weights = component_weights(cfg)
    every = sum(weights[k] for k in ("video_dit", "video_dit_2", "audio_dit", "dual_tower_bridge",
                                     "text_encoder", "video_vae", "audio_vae"))
    return {"modes": plan_estimates(weights, act, batch), "weights": every / GIB,
            "towers": p["weights_gib"] + act * batch + p["latents_gib"]}


def _clip(shapes) -> str:
    return (f"{shapes.width}x{shapes.height}, {shapes.num_frames} frames at {shapes.fps:g} fps: "
            f"{shapes.L_v} video and {shapes.L_a} audio tokens")


def _refuse(shapes, need: float, how: str, limit_text: str):
    raise MovaInputError(
        f"this clip ({_clip(shapes)}) needs about {need:.1f} GiB ({how}), more than "
        f"{limit_text}: make it smaller (--height, --width, --num_frames; a very low --fps "
        "makes the audio long) or run on a device with more memory")


def check_fits(cfg, shapes, device, batch: int = 2, kernels: str | None = None,
               decode: bool = True, cp_size: int = 1, towers_only: bool = False) -> dict | None:
    """Refuses a clip that cannot fit `device`; returns the estimates per offload mode (None on
    meta). towers_only: the run holds the towers alone (a benchmark, a build), not the text
    encoder and the VAEs."""
    limit, limit_text = device_limit(device)
    parts = floor_parts(cfg, shapes, decode)
    floor = sum(parts.values()) / GIB
    if floor > limit:
        big = sorted(parts.items(), key=lambda kv: -kv[1])[:2]
        _refuse(shapes, floor, "at least, whatever the offload: " + ", ".join(
            f"{name} {n / GIB:.1f} GiB" for name, n in big), limit_text)
    if str(device).startswith("meta"):
        # the plan runs attention's math path on meta tensors: its [B, H, L, L] scores must
        # have a size that int64 can count, whatever memory a real backend would need
        heads = max(cfg.video_dit.num_heads, cfg.audio_dit.num_heads)
        tokens = max(shapes.L_v, shapes.L_a)
        if batch * heads * tokens * tokens >= 1 << 62:
            raise MovaInputError(
                f"this clip ({_clip(shapes)}) is too large to plan: one attention over "
                f"{tokens} tokens has more scores than a tensor can count; make it smaller "
                "(--height, --width, --num_frames, or a higher --fps)")
        return None
    est = estimates(cfg, shapes, batch, kernels or "reference", cp_size)
    modes = est["modes"]
    plan_text = "the memory plan of `mova-rt bench --device meta`"
    if str(device).startswith("cuda"):
        mode = min(modes, key=modes.get)
        if modes[mode] > limit:
            _refuse(shapes, modes[mode], f"with --offload {mode}, the least of {plan_text}",
                    limit_text)
    elif towers_only:
        if max(est["towers"], floor) > limit:
            _refuse(shapes, max(est["towers"], floor), f"the towers' weights and one forward, "
                    f"by {plan_text}", limit_text)
    else:
        # on the CPU every weight stays in host memory: one forward, then the decode beside them
        need = max(modes["none"], est["weights"] + floor)
        if need > limit:
            _refuse(shapes, need, "every weight in host memory with one forward or the decoded "
                    f"clip, by {plan_text}", limit_text)
    return modes
