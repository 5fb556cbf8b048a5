"""MovaPipeline: prompt + first frame -> video frames, waveform and latents (spec 1.0, 3).

The exact ("reference") path of mova-rt. Order of work and every rounding follow the reference
pipeline: seeded noise (video, then audio, fp32, one generator on the target device), conditioning
clip through the video VAE, two prompt encodings, the Euler loop with the expert switch at the
first t < boundary_ratio * 1000 and text CFG with one scale (a single pass when the scale is 1),
latents fp32 between steps, video VAE decode, DAC decode in fp32.
"""

from __future__ import annotations

import dataclasses
import gc
import hashlib
import os
import warnings
import time
from collections import OrderedDict
from dataclasses import dataclass, field

import numpy as np
import torch
from tqdm import tqdm

from .config import (DEFAULT_NEGATIVE_PROMPT, MovaConfig, audio_latent_length,  # noqa: F401
                     check_sizes, load_config)
from .errors import MovaInputError
from .loader import load_state
from .lora import merge_lora
from .models.audio_dit import AudioDiT
from .models.audio_vae import DacVAE, fold_weight_norm
from .models.bridge import Bridge
from .models.dual_tower import dual_tower_forward
from .models.text_encoder import (TextEncoder, build_umt5_encoder, load_tokenizer,
                                  tie_umt5_embeddings, umt5_expected_keys)
from .models.video_dit import VideoDiT
from .models.video_vae import build_video_vae, decode_frames, encode_condition
from . import fp8, fuse, parallel, regional
from .ops import resolve
from .cache import MODES as CACHE_MODES
from .cache import StepCache
from .offload import MODES as OFFLOAD_MODES
from .offload import apply_component, apply_group, disk_sources, is_block_key
from .sampler import Guidance, GuidedStep
from .scheduler import FlowMatchScheduler

CONDITION_CACHE_SIZE = 4   # conditioning latents kept per pipeline (a 360p one is 1.4 MB)
DTYPES = {"bf16": torch.bfloat16, "fp32": torch.float32}
PRECISIONS = ("bf16", "fp8")     # of the DiT and bridge GEMMs (bf16: the checkpoint's --dtype)


@dataclass
class MovaOutput:
    frames: np.ndarray | None     # uint8 [F, H, W, 3] (None when not decoded)
    waveform: np.ndarray | None   # float32 [S], the full DAC output (L_a * hop samples)
    sample_rate: int
    fps: float
    video_latents: torch.Tensor   # fp32 [1, z, T, h, w] (normalised, as the sampler ends)
    audio_latents: torch.Tensor   # fp32 [1, C_a, L_a]
    timings: dict = field(default_factory=dict)
    forwards: int = 0             # dual-tower forwards computed (per guidance pass)
    reused: int = 0               # forwards replaced by a cached residual (--cache)


class MovaPipeline:
    def __init__(self, cfg: MovaConfig, modules: dict, device: torch.device, dtype: torch.dtype):
        self.cfg = cfg
        self.device = device
        self.dtype = dtype
        self.video_dit = modules["video_dit"]
        self.video_dit_2 = modules["video_dit_2"]
        self.audio_dit = modules["audio_dit"]
        self.bridge = modules["dual_tower_bridge"]
        self.video_vae = modules["video_vae"]
        self.audio_vae = modules["audio_vae"]
        self.text_encoder: TextEncoder = modules["text_encoder"]
        self.load_seconds = 0.0
        self._conditions: OrderedDict = OrderedDict()   # (image digest, frames) -> VAE latent
        self.streamer = None       # --offload group: the BlockStreamer
        self.residency = None      # --offload cpu: the ComponentResidency
        self.mesh = None           # context / CFG parallel: this rank's mova_rt.parallel.Mesh
        self.precision = "bf16"    # of the DiT and bridge GEMMs (fp8: mova_rt/fp8/)
        self.fp8_weights = None    # fp8: {component: {layer: (w_q, w_scale, input_scale)}}
        self.engine = None         # an ahead-of-time engine (mova_rt/engine.py) run by the towers
        self.ops = None            # the resolved kernel set (mova_rt/ops.py Ops; .choices per op)

    # ----------------------------------------------------------------------------------------
    @classmethod
    def from_pretrained(cls, path: str, device="cpu", dtype=torch.bfloat16,
                        kernels: str | None = None, lora_path: str | None = None,
                        lora_alpha: float | None = None, lora_scale: float = 1.0,
                        offload: str = "none", offload_depth: int = 1,
                        stream_from_disk: bool = False, mesh=None, precision: str | None = None,
                        fp8_weights: str | None = None, engine=None, towers_only: bool = False,
                        compile: bool = False, fp8_gemm: str = "auto"):
        """offload: none (every weight on `device`), cpu (components take turns on the GPU) or
        group (blocks stream through GPU slots, prefetching offload_depth blocks ahead); see
        mova_rt/offload.py. With offload the weights are first loaded into host memory, except,
        with stream_from_disk (group only), the streamed blocks: read from the checkpoint files
        at each use, so host RAM stays small. mesh: a mova_rt.parallel.Mesh (this rank's place
        in a torchrun launch) to run context- and CFG-parallel. precision fp8: the DiTs' and the
        bridge's Linear layers in fp8 (mova_rt/fp8/), from the folder fp8_weights written by
        `mova-rt quantize`, or quantized here on load. kernels: a kernel set (default auto: per
        op the fastest measured on this GPU that keeps the reference's fidelity, mova_rt/ops.py).
        compile: torch.compile every block and bridge layer (mova_rt/regional.py). fp8_gemm: the
        fp8 GEMM choice, "auto" (per layer from the measured dispatch table, some layers kept in
        bf16) or "scaled_mm" (every quantizable layer in e4m3, as engines have them).

        engine: a folder written by `mova-rt build` (or an opened mova_rt.engine.Engine): the
        blocks and the bridge run its compiled units. It must match the checkpoint, this machine
        and the libraries (MovaInputError with the build command otherwise); precision and kernels
        default to the engine's, and naming others is refused. towers_only: the DiTs and the
        bridge alone (no VAEs, no text encoder): what `mova-rt build` needs."""
        t0 = time.perf_counter()
        if engine is not None:
            from .engine import Engine, open_engine
            engine = engine if isinstance(engine, Engine) else open_engine(engine)
            if mesh is not None:
                raise MovaInputError("--engine runs one process's compiled layers; context and CFG "
                                     "parallelism split them across ranks: drop --engine or run "
                                     "on one GPU")
            if fp8_weights:
                raise MovaInputError("--engine brings its own fp8 weights: drop --fp8_weights")
            if engine.bound and offload != "none":
                raise MovaInputError(f"engine {engine.path} holds its layers' weights in its "
                                     "TensorRT plans, which stay on the GPU: drop --offload")
            engine.check_machine(device)
            engine.check_model(path, precision, kernels, lora=bool(lora_path))
            precision, kernels = engine.precision, engine.kernels
            fp8_weights = engine.fp8_weights
        if compile:
            if engine is not None or mesh is not None or offload != "none":
                raise MovaInputError("--compile compiles resident eager blocks: drop --engine, "
                                     "--offload and context/CFG parallelism, or --compile")
            kernels = regional.kernels_for(kernels)
        kernels = kernels or "auto"
        precision = precision or "bf16"
        if isinstance(dtype, str):
            if dtype not in DTYPES:
                raise MovaInputError(f"--dtype {dtype} is not supported: use bf16 or fp32")
            dtype = DTYPES[dtype]
        device = torch.device(device)
        if offload not in OFFLOAD_MODES:
            raise MovaInputError(f"--offload {offload} is not a mode: use {', '.join(OFFLOAD_MODES)}")
        compute_device, device = device, (torch.device("cpu") if offload != "none" else device)
        if stream_from_disk and offload != "group":
            raise MovaInputError("--stream_from_disk streams blocks: it needs --offload group")
        if precision not in PRECISIONS:
            raise MovaInputError(f"--precision {precision} is not supported: use "
                                 f"{' or '.join(PRECISIONS)}")
        if fp8_weights and precision != "fp8":
            raise MovaInputError("--fp8_weights holds fp8 weights: pass --precision fp8 with it")
        if precision == "fp8" and dtype != torch.bfloat16:
            raise MovaInputError("--precision fp8 computes around bf16 activations: use --dtype bf16")
        if precision == "fp8" and stream_from_disk:
            raise MovaInputError("--stream_from_disk reads the checkpoint's bf16 blocks; with "
                                 "--precision fp8 use --offload group without it")
        if fp8_weights and lora_path:
            raise MovaInputError("--fp8_weights were quantized without the LoRA: drop "
                                 "--fp8_weights (the LoRA is merged, then quantized on load)")
        if stream_from_disk and lora_path:
            raise MovaInputError("--stream_from_disk reads the weights as stored, so a LoRA cannot "
                                 "be merged into them: drop one of the two")
        cfg = load_config(path)
        ops = resolve(kernels, device=compute_device)
        with torch.device("meta"):
            towers = {"video_dit": VideoDiT(cfg.video_dit, ops),
                      "video_dit_2": VideoDiT(cfg.video_dit_2, ops),
                      "audio_dit": AudioDiT(cfg.audio_dit, ops),
                      "dual_tower_bridge": Bridge(cfg.bridge, ops),
                      "audio_vae": DacVAE(cfg.audio_vae)}
        # fp8 resident: the quantized layers reach the GPU one at a time, already in e4m3 (their
        # bf16 weights are read into host memory, or not at all with --fp8_weights), so the bf16
        # towers never sit on the GPU; without a LoRA to merge first, component by component.
        fp8_direct = precision == "fp8" and offload == "none"
        gemm = "scaled_mm" if engine is not None or towers_only else fp8_gemm
        producers = (ops.choices.get("norm_modulate") == "triton" and engine is None
                     and not towers_only)
        weights = fp8.load(fp8_weights, path) if fp8_weights else None
        modules, used = {}, {}
        for name, module in towers.items():
            fold = fold_weight_norm if (name == "audio_vae" and cfg.audio_vae.use_weight_norm) else None
            defer = (lambda k, n=name: is_block_key(n, k)) if stream_from_disk else None
            where = device
            if fp8_direct and name in fp8.COMPONENTS:
                if weights is not None:
                    defer = fp8.deferred_weights(name, module, gemm, compute_device)
                else:
                    where = torch.device("cpu")
            modules[name] = load_state(module, path, name, dtype, where, transform=fold,
                                       defer=defer)
            if fp8_direct and name in fp8.COMPONENTS and not lora_path:
                used.update(fp8.apply({name: modules[name]},
                                      None if weights is None else {name: weights[name]},
                                      gemm=gemm, device=compute_device, producers=producers))
                modules[name].to(compute_device)
        # The reference runs the DAC in fp32 (autocast) on weights rounded to the pipeline dtype.
        modules["audio_vae"] = modules["audio_vae"].float()
        if towers_only:
            modules["video_vae"] = modules["text_encoder"] = None
        else:
            modules["video_vae"] = load_state(build_video_vae(cfg.video_vae), path, "video_vae",
                                              dtype, device)
            umt5 = build_umt5_encoder(cfg.text_encoder)
            umt5 = load_state(umt5, path, "text_encoder", dtype, device,
                              expected=umt5_expected_keys(umt5), finalize=tie_umt5_embeddings,
                              defer=(lambda k: is_block_key("text_encoder", k))
                              if stream_from_disk else None)
            modules["text_encoder"] = TextEncoder(load_tokenizer(os.path.join(path, "tokenizer")),
                                                  umt5)
        if lora_path:
            merge_lora({k: modules[k] for k in ("video_dit", "video_dit_2", "audio_dit",
                                                 "dual_tower_bridge")},
                       lora_path, alpha=lora_alpha, scale=lora_scale)
        if precision == "fp8" and not used:
            # cuBLASLt e4m3 or bf16 per layer, from the committed measurements
            # (mova_rt/fp8/dispatch.py); every layer in e4m3 for an engine
            towers = {name: modules[name] for name in fp8.COMPONENTS}
            used = fp8.apply(towers, weights, gemm=gemm, producers=producers,
                             device=compute_device if fp8_direct else None)
            if fp8_direct:
                for m in towers.values():
                    m.to(compute_device)
        pipe = cls(cfg, modules, compute_device, dtype)
        pipe.precision = precision
        if precision == "fp8":
            pipe.fp8_weights = used
        pipe.ops = ops
        if ops.choices.get("qkv") == "fused" and fuse.applicable(offload, engine, precision):
            fuse.fuse_projections(pipe.video_dit, pipe.video_dit_2, pipe.audio_dit, pipe.bridge)
        if engine is not None:      # before offload, which may empty the streamed parameters
            engine.install(pipe)
            pipe.engine = engine
        if offload == "group":
            disk = disk_sources(pipe, path, dtype) if stream_from_disk else None
            pipe.streamer = apply_group(pipe, compute_device, offload_depth, disk)
        elif offload == "cpu":
            pipe.residency = apply_component(pipe, compute_device)
        if mesh is not None:
            parallel.apply(pipe, mesh)
            pipe.mesh = mesh
        if compile:
            regional.compile_layers(pipe.video_dit, pipe.audio_dit, pipe.bridge, compute_device,
                                    video_2=pipe.video_dit_2)
        pipe.load_seconds = time.perf_counter() - t0
        return pipe

    # ----------------------------------------------------------------------------------------
    @staticmethod
    def _first_frame(image, ref_path, height, width) -> torch.Tensor:
        from PIL import Image

        from .media import crop_and_resize, image_to_tensor, load_reference_image, white_image
        if isinstance(image, torch.Tensor):
            if image.dim() != 4 or image.shape[:2] != (1, 3):
                raise MovaInputError(f"image tensor must be [1, 3, H, W], got {tuple(image.shape)}")
            return image
        if height is None or width is None:
            raise MovaInputError("height and width are required unless image is a tensor")
        if isinstance(image, Image.Image):
            return image_to_tensor(crop_and_resize(image.convert("RGB"), height, width))
        if ref_path is not None:
            return load_reference_image(ref_path, height, width)
        return image_to_tensor(white_image(height, width))

    def _condition_latent(self, image: torch.Tensor, num_frames: int) -> torch.Tensor:
        """The VAE latent of the conditioning clip, cached per (image, size, frames) within the
        process: the same first frame is encoded once (an exact cache: same input, same output)."""
        pixels = image.detach().to("cpu", torch.float32).contiguous()
        key = (hashlib.sha256(pixels.numpy().tobytes()).hexdigest(), tuple(pixels.shape),
               num_frames)
        if key in self._conditions:
            self._conditions.move_to_end(key)
            return self._conditions[key]
        cond = encode_condition(self.video_vae, self.cfg.video_vae,
                                image.to(self.device, torch.float32), num_frames)
        self._conditions[key] = cond
        while len(self._conditions) > CONDITION_CACHE_SIZE:
            self._conditions.popitem(last=False)
        return cond

    def _forward(self, dit, video_in, audio_in, text, t, fps, **kw):
        """kw: prepared, bridge_from, step_cache, cache_key (see dual_tower_forward)."""
        return dual_tower_forward(dit, self.audio_dit, self.bridge, video_in, audio_in, text, t, fps,
                                  **kw)

    @torch.no_grad()
    def __call__(self, prompt: str, image=None, negative_prompt: str = DEFAULT_NEGATIVE_PROMPT,
                 num_frames: int = 193, fps: float = 24.0, seed: int = 42,
                 num_inference_steps: int = 50, cfg_scale: float = 5.0,
                 remove_video_dit: bool = False, progress: bool = True,
                 ref_path: str | None = None, height: int | None = None,
                 width: int | None = None, bridge_cfg_scale: float = 1.0,
                 cfg_batch: bool | None = None, cache: str = "off",
                 cache_threshold: float = 0.1, decode: bool = True,
                 step_callback=None) -> MovaOutput:
        """The CLI's arguments. The first frame is `image` (a [1, 3, H, W] tensor in [-1, 1], or a
        PIL image that is centre-cropped and resized to height x width), or the file `ref_path`,
        or, when neither is given, a white frame (text-to-video-audio).

        bridge_cfg_scale: Dual CFG's s_B (1 = the released text CFG). cfg_batch: run the guidance
        passes of a step as one batch (None: batched, and sequential after an out-of-memory;
        False: one after the other, bit-identical to the reference). cache: step caching
        (mova_rt.cache): off (exact), auto (reuse when the first layer's residual changed by less
        than cache_threshold), schedule (every other step). decode: False skips the VAE and DAC
        decode (frames and waveform are then None): the ranks of a parallel run but one.
        step_callback(i): called before step i and once more after the last (i = the number of
        steps), the device synchronised (the cold-start benchmark times steps with it)."""
        image = self._first_frame(image, ref_path, height, width)
        _, _, height, width = image.shape
        vae = self.cfg.video_vae
        check_sizes(height, width, num_frames, vae.scale_factor_spatial, vae.scale_factor_temporal)
        if fps <= 0:
            raise MovaInputError(f"--fps {fps} must be positive")
        if num_inference_steps < 1:
            raise MovaInputError("--num_inference_steps must be at least 1")
        for name, s in (("--cfg_scale", cfg_scale), ("--bridge_cfg_scale", bridge_cfg_scale)):
            if not np.isfinite(s):
                raise MovaInputError(f"{name} {s} must be a finite number")
        if self.engine is not None:
            passes = len(Guidance(cfg_scale, bridge_cfg_scale).passes())
            self.engine.check_request(height, width, num_frames, fps,
                                      passes if cfg_batch is not False else 1)
        dev, timings = self.device, {}
        sync = torch.cuda.synchronize if dev.type == "cuda" else (lambda: None)

        # Noise first, video then audio, from one generator seeded with `seed` (spec 10.8, 10.14).
        gen = torch.Generator(device=dev).manual_seed(seed)
        t_lat = (num_frames - 1) // vae.scale_factor_temporal + 1
        h_lat, w_lat = height // vae.scale_factor_spatial, width // vae.scale_factor_spatial
        latents = torch.randn((1, vae.z_dim, t_lat, h_lat, w_lat), generator=gen, device=dev,
                              dtype=torch.float32)
        l_a = audio_latent_length(self.audio_vae.sample_rate, self.audio_vae.hop_length,
                                  num_frames, fps)
        audio = torch.randn((1, self.audio_vae.latent_dim, l_a), generator=gen, device=dev,
                            dtype=torch.float32)

        t0 = time.perf_counter()
        cond = self._condition_latent(image, num_frames)
        mask = torch.zeros((1, vae.scale_factor_temporal, t_lat, h_lat, w_lat), device=dev)
        mask[:, :, 0] = 1.0                         # latent frame 0 is the given first frame
        condition = torch.cat([mask, cond], dim=1)  # [1, 4 + z, T, h, w]
        sync()
        timings["vae_encode"] = time.perf_counter() - t0

        t0 = time.perf_counter()
        res = self.residency
        if res:
            res.load(self.text_encoder.model)
        pos = self.text_encoder.encode([prompt], dev, self.dtype)
        cfg_parallel = self.mesh is not None and self.mesh.config.cfg_groups > 1
        guidance = Guidance(cfg_scale, bridge_cfg_scale,
                            batch=cfg_batch is not False and not cfg_parallel)
        uses_neg = any(name == "neg" for name, _ in guidance.passes())
        neg = self.text_encoder.encode([negative_prompt], dev, self.dtype) if uses_neg else None
        if res:
            res.evict(self.text_encoder.model)
        sync()
        timings["text"] = time.perf_counter() - t0

        sched = FlowMatchScheduler(self.cfg.scheduler, num_inference_steps)
        switch_at = sched.expert_switch_index(self.cfg.pipeline.boundary_ratio)
        if cache not in CACHE_MODES:
            raise MovaInputError(f"--cache {cache} is not a mode: use {', '.join(CACHE_MODES)}")
        if cache == "auto" and self.mesh is not None and self.mesh.config.world_size > 1:
            raise MovaInputError("--cache auto decides from each rank's own tokens, so parallel "
                                 "ranks could disagree: use --cache schedule with --cp_size or "
                                 "--cfg_parallel")
        n_steps = len(sched.timesteps)
        step_cache = (StepCache.every_other(n_steps) if cache == "schedule" else
                      StepCache(cache, threshold=cache_threshold, num_steps=n_steps))
        step = GuidedStep(self._forward, sched, guidance, fps, self.audio_dit, self.bridge,
                          step_cache, mesh=self.mesh)
        dit = self.video_dit
        if res:
            res.load(dit)
        t0 = time.perf_counter()
        for i in tqdm(range(len(step.timesteps)), desc="denoise", unit="step", disable=not progress):
            if step_callback is not None:
                sync()
                step_callback(i)
            if res and i == max(0, switch_at - res.prefetch_steps):
                res.prefetch(self.video_dit_2)      # overlaps the last high-noise steps
            if i == switch_at:
                if res:
                    res.evict(dit, forget=remove_video_dit)
                    res.load(self.video_dit_2)
                dit = self.video_dit_2
                if remove_video_dit:
                    self.video_dit = None
                    gc.collect()
            try:
                latents, audio = step(dit, i, latents, audio, condition, pos, neg)
            except torch.OutOfMemoryError:
                if cfg_batch is not None or not step.guidance.batch:
                    raise
                # Batched guidance did not fit: free the batch and go on one pass at a time.
                warnings.warn("batched guidance ran out of GPU memory: running the guidance passes "
                              "one after the other (--no-cfg-batch skips the attempt)")
                step.guidance = dataclasses.replace(step.guidance, batch=False)
                gc.collect()
                torch.cuda.empty_cache()
                latents, audio = step(dit, i, latents, audio, condition, pos, neg)
        if step_callback is not None:
            sync()
            step_callback(len(step.timesteps))
        if res:
            res.evict(dit)
        forwards = step.forwards_per_step * len(step.timesteps)
        reused = 0
        if step_cache.enabled:
            passes = 1 if step.guidance.batch or step.mesh else step.forwards_per_step
            forwards = step_cache.computed * step.forwards_per_step // passes
            reused = step_cache.reused * step.forwards_per_step // passes
        sync()
        timings["denoise"] = time.perf_counter() - t0

        bad = [n for n, x in (("video", latents), ("audio", audio)) if not torch.isfinite(x).all()]
        if bad:
            raise MovaInputError(f"the {' and '.join(bad)} latents hold NaN/Inf after denoising, "
                                 "so nothing was decoded: the weights or inputs overflow; try "
                                 "--dtype fp32 or check the checkpoint")

        t0 = time.perf_counter()
        frames = wave = None
        if decode:
            frames = decode_frames(self.video_vae, vae, latents).numpy()
            wave = self.audio_vae.decode(audio.float())[0, 0].float().cpu().numpy()
        sync()
        timings["decode"] = time.perf_counter() - t0
        return MovaOutput(frames=frames, waveform=wave, sample_rate=self.audio_vae.sample_rate,
                          fps=fps, video_latents=latents.cpu(), audio_latents=audio.cpu(),
                          timings=timings, forwards=forwards, reused=reused)
