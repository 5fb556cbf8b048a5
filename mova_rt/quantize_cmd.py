"""`mova-rt quantize`: a checkpoint's fp8 weights written to a folder (mova_rt/fp8/weights.py),
optionally with static activation scales calibrated over short generations. Lives outside the fp8
package because calibration runs the pipeline, which uses the package."""

from __future__ import annotations

import torch

from .fp8.calibrate import calibrate, modelopt_quantization
from .fp8.quantize import COMPONENTS, quantize_component
from .fp8.weights import save


def quantize_checkpoint(ckpt: str, out: str) -> None:
    """`mova-rt quantize`: the fp8 weights of a checkpoint, one component in host memory at a
    time (the largest, an expert, is 28.6 GB in bf16)."""
    from .config import load_config
    from .loader import load_state
    from .models.audio_dit import AudioDiT
    from .models.bridge import Bridge
    from .models.video_dit import VideoDiT
    from .ops import resolve

    cfg = load_config(ckpt)
    ops = resolve("reference")
    builders = {"video_dit": lambda: VideoDiT(cfg.video_dit, ops),
                "video_dit_2": lambda: VideoDiT(cfg.video_dit_2, ops),
                "audio_dit": lambda: AudioDiT(cfg.audio_dit, ops),
                "dual_tower_bridge": lambda: Bridge(cfg.bridge, ops)}

    def components():
        for name in COMPONENTS:
            with torch.device("meta"):
                module = builders[name]()
            module = load_state(module, ckpt, name, torch.bfloat16, "cpu")
            yield name, quantize_component(name, module)
            del module

    save(components(), ckpt, out)


def calibrate_checkpoint(ckpt: str, out: str, prompts: list, ref_path: str | None,
                         height: int, width: int, num_frames: int, steps: int = 8,
                         seed: int = 42, device="cpu", log=print) -> dict:
    """`mova-rt quantize --calibrate`: fp8 weights with static input scales, calibrated by
    nvidia-modelopt over `steps`-step generations of each prompt at the given clip size (both
    experts run when the schedule crosses their boundary; the bf16 reference kernels, so every
    quantizable Linear sees its input), written to `out` like `save`. The weights are quantized
    from the same bf16 tensors (modelopt wraps the Linear layers, it keeps their weights).
    Returns the scales."""
    from .pipeline import MovaPipeline
    modelopt_quantization()               # before the weights are read
    pipe = MovaPipeline.from_pretrained(ckpt, device=device, dtype="bf16", kernels="reference")
    towers = {"video_dit": pipe.video_dit, "video_dit_2": pipe.video_dit_2,
              "audio_dit": pipe.audio_dit, "dual_tower_bridge": pipe.bridge}

    def loop():
        for i, prompt in enumerate(prompts):
            log(f"calibrating on prompt {i + 1}/{len(prompts)} ({steps} steps)")
            pipe(prompt, ref_path=ref_path, height=height, width=width, num_frames=num_frames,
                 num_inference_steps=steps, seed=seed + i, decode=False, progress=False)
    scales = calibrate(towers, loop)

    def components():
        for component, module in towers.items():
            weights = quantize_component(component, module)
            yield component, {name: (*wq, scales[component][name]) for name, wq in weights.items()}
    save(components(), ckpt, out)
    return scales


