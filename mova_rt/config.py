"""Typed configuration of a MOVA checkpoint, built from its own files.

Every architecture number comes from the checkpoint: `model_index.json` for the pipeline and each
component's `config.json` (or `scheduler_config.json`). The constructor defaults of the reference
code are legacy values (spec, top), so a field the reference treats as required must be present in
the file; optional fields default to the reference constructor's default, which is what a diffusers
`save_config` writes anyway.

Presets (`tiny`, `mova-360p`, `mova-720p`) are the dicts such files contain: `make-checkpoint`
writes them and the benchmark builds from them. They are never used to fill in a real checkpoint.
"""

from __future__ import annotations

import dataclasses
import os
import warnings
from dataclasses import dataclass, field
from typing import Any

from .errors import MovaInputError

COMPONENTS = (
    "video_dit", "video_dit_2", "audio_dit", "dual_tower_bridge",
    "video_vae", "audio_vae", "text_encoder", "tokenizer", "scheduler",
)

# model_index.json class entries of the official checkpoint (spec 2.2).
COMPONENT_CLASSES = {
    "audio_dit": ["mova.diffusion.models.wan_audio_dit", "WanAudioModel"],
    "audio_vae": ["mova.diffusion.models.dac_vae", "DAC"],
    "dual_tower_bridge": ["mova.diffusion.models.interactionv2", "DualTowerConditionalBridge"],
    "scheduler": ["mova.diffusion.schedulers.flow_match_pair", "FlowMatchPairScheduler"],
    "text_encoder": ["transformers", "UMT5EncoderModel"],
    "tokenizer": ["transformers", "T5TokenizerFast"],
    "video_dit": ["mova.diffusion.models.wan_video_dit", "WanModel"],
    "video_dit_2": ["mova.diffusion.models.wan_video_dit", "WanModel"],
    "video_vae": ["diffusers", "AutoencoderKLWan"],
}

_REQUIRED = object()  # marker default: the field must be in the file


def _req():
    return field(default=_REQUIRED)  # type: ignore[arg-type]


def _from_dict(cls, raw: dict, where: str, passthrough: bool = False):
    """Builds the frozen dataclass `cls` from a parsed json dict; `where` names the file.
    passthrough: other fields belong to a library class (diffusers) and are not ours to judge."""
    known = {f.name: f for f in dataclasses.fields(cls) if f.init}
    values = {}
    for name, f in known.items():
        if name in raw:
            values[name] = raw[name]
        elif f.default is _REQUIRED:
            raise MovaInputError(
                f"{where} has no field '{name}': the file is incomplete or not a MOVA "
                f"{cls.__name__[:-6]} config; restore it from the checkpoint")
    extra = sorted(k for k in raw if k not in known and not k.startswith("_"))
    if extra and not passthrough:
        warnings.warn(f"{where}: ignoring unknown fields {extra}")
    from .validate.configs import check_fields
    check_fields(cls.__name__, raw, where)
    try:
        cfg = cls(**values)
    except (TypeError, ValueError) as e:
        raise MovaInputError(f"{where}: {e}") from None
    return cfg


def _to_dict(cfg) -> dict:
    out = {}
    for f in dataclasses.fields(cfg):
        if not f.init:
            continue
        v = getattr(cfg, f.name)
        out[f.name] = list(v) if isinstance(v, tuple) else v
    return out


def read_json(path: str, what: str) -> dict:
    from .validate.schema import read_json as read_checked
    data = read_checked(
        path, "checkpoint file", "the file is corrupt; restore it from the checkpoint",
        missing=f"missing {what} file {path}: the checkpoint folder is incomplete; download it "
                "again or point --ckpt_path at a complete MOVA checkpoint")
    if not isinstance(data, dict):
        raise MovaInputError(f"{path} is not a JSON object: restore it from the checkpoint")
    return data


# --------------------------------------------------------------------------------------------
# DiTs (WanModel / WanAudioModel config.json)
# --------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class DiTConfig:
    """Fields shared by WanModel (video) and WanAudioModel (audio) config.json."""
    dim: int = _req()
    in_dim: int = _req()
    ffn_dim: int = _req()
    out_dim: int = _req()
    text_dim: int = _req()
    freq_dim: int = _req()
    eps: float = _req()
    patch_size: tuple = _req()
    num_heads: int = _req()
    num_layers: int = _req()
    has_image_input: bool = _req()
    has_image_pos_emb: bool = False
    has_ref_conv: bool = False
    add_control_adapter: bool = False
    in_dim_control_adapter: int = 24
    seperated_timestep: bool = False
    require_vae_embedding: bool = True
    require_clip_embedding: bool = True
    fuse_vae_embedding_in_latents: bool = False

    @property
    def head_dim(self) -> int:
        return self.dim // self.num_heads


@dataclass(frozen=True)
class VideoDiTConfig(DiTConfig):
    def __post_init__(self):
        object.__setattr__(self, "patch_size", tuple(int(p) for p in self.patch_size))
        _check_dit(self, "video DiT", n_patch=3)


@dataclass(frozen=True)
class AudioDiTConfig(DiTConfig):
    vae_type: str = "oobleck"

    def __post_init__(self):
        object.__setattr__(self, "patch_size", tuple(int(p) for p in self.patch_size))
        _check_dit(self, "audio DiT", n_patch=1)
        if self.vae_type != "dac":
            raise ValueError(f"vae_type '{self.vae_type}' is not supported (MOVA uses 'dac'; "
                             "'oobleck' is the legacy audio tower)")


def _check_dit(cfg, what: str, n_patch: int):
    if len(cfg.patch_size) != n_patch:
        raise ValueError(f"{what} patch_size must have {n_patch} entries, got {cfg.patch_size}")
    if cfg.dim % cfg.num_heads:
        raise ValueError(f"{what} dim {cfg.dim} is not divisible by num_heads {cfg.num_heads}")
    if cfg.head_dim % 2:
        raise ValueError(f"{what} head_dim {cfg.head_dim} must be even for RoPE")
    if n_patch == 3 and (cfg.head_dim // 3) % 2:
        # The 3D RoPE gives d - 2*(d//3) channels to frames and d//3 each to rows and columns,
        # as complex pairs: d//3 must be even for the three parts to tile the head.
        raise ValueError(f"{what} head_dim {cfg.head_dim} cannot be split for the 3D RoPE "
                         "(head_dim // 3 must be even)")
    for flag in ("has_image_input", "has_ref_conv", "add_control_adapter", "seperated_timestep",
                 "fuse_vae_embedding_in_latents"):
        if getattr(cfg, flag):
            raise ValueError(f"{what} option {flag}=true is not used by MOVA and not supported")


# --------------------------------------------------------------------------------------------
# Bridge (DualTowerConditionalBridge config.json)
# --------------------------------------------------------------------------------------------
INTERACTION_STRATEGIES = ("shallow_focus", "distributed", "progressive", "custom", "full")


@dataclass(frozen=True)
class BridgeConfig:
    visual_layers: int = _req()
    audio_layers: int = _req()
    visual_hidden_dim: int = _req()
    audio_hidden_dim: int = _req()
    audio_fps: float = _req()
    head_dim: int = _req()
    interaction_strategy: str = _req()
    apply_cross_rope: bool = _req()
    apply_first_frame_bias_in_rope: bool = False
    trainable_condition_scale: bool = False
    pooled_adaln: bool = False

    def __post_init__(self):
        if self.interaction_strategy not in INTERACTION_STRATEGIES:
            raise ValueError(f"unknown interaction_strategy '{self.interaction_strategy}'")
        if self.pooled_adaln:
            raise ValueError("pooled_adaln=true is not used by the released MOVA and not supported")
        for d in (self.visual_hidden_dim, self.audio_hidden_dim):
            if d % self.head_dim:
                raise ValueError(f"hidden dim {d} is not divisible by head_dim {self.head_dim}")

    def interaction_layers(self) -> list[int]:
        """Layer indices that carry a conditioner pair (both directions), as the reference's
        CrossModalInteractionController computes them."""
        n = min(self.visual_layers, self.audio_layers)
        s = self.interaction_strategy
        if s == "shallow_focus":
            return list(range(min(10, n // 3)))
        if s == "distributed":
            return list(range(0, n, 3))
        if s == "progressive":
            return list(range(min(8, n))) + (list(range(8, n, 3)) if n > 8 else [])
        if s == "custom":
            return [i for i in (0, 2, 4, 6, 8, 12, 16, 20) if i < n]
        return list(range(n))  # "full"


# --------------------------------------------------------------------------------------------
# VAEs
# --------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class VideoVAEConfig:
    """The fields mova-rt reads; the whole dict goes to diffusers' AutoencoderKLWan."""
    z_dim: int = _req()
    latents_mean: tuple = _req()
    latents_std: tuple = _req()
    scale_factor_temporal: int = 4
    scale_factor_spatial: int = 8
    raw: dict = field(default_factory=dict, compare=False, repr=False)

    def __post_init__(self):
        object.__setattr__(self, "latents_mean", tuple(float(v) for v in self.latents_mean))
        object.__setattr__(self, "latents_std", tuple(float(v) for v in self.latents_std))
        if len(self.latents_mean) != self.z_dim or len(self.latents_std) != self.z_dim:
            raise ValueError(f"latents_mean/latents_std must have z_dim={self.z_dim} entries")


@dataclass(frozen=True)
class AudioVAEConfig:
    """DAC (continuous) audio VAE, config.json of `audio_vae/`."""
    encoder_dim: int = 64
    encoder_rates: tuple = (2, 4, 8, 8)
    latent_dim: int | None = None
    decoder_dim: int = 1536
    decoder_rates: tuple = (8, 8, 4, 2)
    n_codebooks: int = 9
    codebook_size: int = 1024
    codebook_dim: int = 8
    quantizer_dropout: bool = False
    sample_rate: int = 44100
    continuous: bool = False
    use_weight_norm: bool = True

    def __post_init__(self):
        object.__setattr__(self, "encoder_rates", tuple(int(r) for r in self.encoder_rates))
        object.__setattr__(self, "decoder_rates", tuple(int(r) for r in self.decoder_rates))
        if self.latent_dim is None:
            object.__setattr__(self, "latent_dim", self.encoder_dim * 2 ** len(self.encoder_rates))
        if not self.continuous:
            raise ValueError("only the continuous DAC (continuous=true) is used by MOVA")
        if self.decoder_dim % 2 ** len(self.decoder_rates):
            raise ValueError("decoder_dim must be divisible by 2**len(decoder_rates)")

    @property
    def hop_length(self) -> int:
        hop = 1
        for r in self.encoder_rates:
            hop *= r
        return hop


# --------------------------------------------------------------------------------------------
# Scheduler (FlowMatchPairScheduler scheduler_config.json)
# --------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class SchedulerConfig:
    num_inference_steps: int = 100
    num_train_timesteps: int = 1000
    shift: float = 3.0
    sigma_max: float = 1.0
    sigma_min: float = 0.003 / 1.002
    inverse_timesteps: bool = False
    extra_one_step: bool = False
    reverse_sigmas: bool = False
    exponential_shift: bool = False
    exponential_shift_mu: float | None = None
    shift_terminal: float | None = None

    def __post_init__(self):
        if self.exponential_shift and self.exponential_shift_mu is None:
            raise ValueError("exponential_shift=true needs exponential_shift_mu")
        if self.inverse_timesteps or self.reverse_sigmas:
            raise ValueError("inverse_timesteps / reverse_sigmas describe a training schedule, "
                             "not MOVA's sampler")


# --------------------------------------------------------------------------------------------
# Pipeline (model_index.json)
# --------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class PipelineConfig:
    boundary_ratio: float = 0.9
    audio_vae_type: str = "dac"

    def __post_init__(self):
        if self.audio_vae_type != "dac":
            raise ValueError(f"audio_vae_type '{self.audio_vae_type}' is not supported")
        if not 0.0 <= self.boundary_ratio <= 1.0:
            raise ValueError(f"boundary_ratio {self.boundary_ratio} is not in [0, 1]")


@dataclass(frozen=True)
class MovaConfig:
    """Everything a MOVA checkpoint says about itself."""
    pipeline: PipelineConfig
    video_dit: VideoDiTConfig
    video_dit_2: VideoDiTConfig
    audio_dit: AudioDiTConfig
    bridge: BridgeConfig
    video_vae: VideoVAEConfig
    audio_vae: AudioVAEConfig
    scheduler: SchedulerConfig
    text_encoder: dict  # transformers UMT5Config dict

    def check_consistency(self):
        """Cross-component agreement; a mismatch means a mixed-up checkpoint folder."""
        v, v2, a, b = self.video_dit, self.video_dit_2, self.audio_dit, self.bridge
        problems = []
        if v != v2:
            problems.append("video_dit and video_dit_2 configs differ")
        if b.visual_hidden_dim != v.dim or b.audio_hidden_dim != a.dim:
            problems.append(f"bridge hidden dims ({b.visual_hidden_dim}, {b.audio_hidden_dim}) "
                            f"!= DiT dims ({v.dim}, {a.dim})")
        if b.visual_layers != v.num_layers or b.audio_layers != a.num_layers:
            problems.append(f"bridge layers ({b.visual_layers}, {b.audio_layers}) != DiT layers "
                            f"({v.num_layers}, {a.num_layers})")
        if b.head_dim != v.head_dim or b.head_dim != a.head_dim:
            problems.append("bridge head_dim differs from the DiTs' head_dim")
        z = self.video_vae.z_dim
        if v.in_dim != 2 * z + 4 or v.out_dim != z:
            problems.append(f"video DiT in_dim/out_dim ({v.in_dim}/{v.out_dim}) do not match "
                            f"the video VAE z_dim {z} (expected {2 * z + 4}/{z})")
        if a.in_dim != self.audio_vae.latent_dim or a.out_dim != self.audio_vae.latent_dim:
            problems.append(f"audio DiT in_dim/out_dim ({a.in_dim}/{a.out_dim}) != audio VAE "
                            f"latent_dim {self.audio_vae.latent_dim}")
        d_model = self.text_encoder.get("d_model")
        if d_model != v.text_dim or d_model != a.text_dim:
            problems.append(f"text encoder d_model {d_model} != DiT text_dim {v.text_dim}")
        if problems:
            raise MovaInputError("checkpoint components disagree: " + "; ".join(problems)
                                 + "; every folder must come from the same MOVA checkpoint")

    def to_files(self) -> dict[str, dict]:
        """The json documents of a checkpoint with this configuration, keyed by relative path."""
        comp = {name: list(COMPONENT_CLASSES[name]) for name in sorted(COMPONENT_CLASSES)}
        index = {"_class_name": "MOVA", "_diffusers_version": "0.36.0", **comp,
                 "audio_vae_type": self.pipeline.audio_vae_type,
                 "boundary_ratio": self.pipeline.boundary_ratio}
        vae = dict(self.video_vae.raw)
        vae.update({"z_dim": self.video_vae.z_dim, "latents_mean": list(self.video_vae.latents_mean),
                    "latents_std": list(self.video_vae.latents_std),
                    "scale_factor_temporal": self.video_vae.scale_factor_temporal,
                    "scale_factor_spatial": self.video_vae.scale_factor_spatial})

        def diffusers_doc(cls_name, body):
            return {"_class_name": cls_name, "_diffusers_version": "0.36.0", **body}

        return {
            "model_index.json": index,
            "video_dit/config.json": diffusers_doc("WanModel", _to_dict(self.video_dit)),
            "video_dit_2/config.json": diffusers_doc("WanModel", _to_dict(self.video_dit_2)),
            "audio_dit/config.json": diffusers_doc("WanAudioModel", _to_dict(self.audio_dit)),
            "dual_tower_bridge/config.json": diffusers_doc("DualTowerConditionalBridge",
                                                           _to_dict(self.bridge)),
            "video_vae/config.json": diffusers_doc("AutoencoderKLWan", vae),
            "audio_vae/config.json": diffusers_doc("DAC", _to_dict(self.audio_vae)),
            "scheduler/scheduler_config.json": diffusers_doc("FlowMatchPairScheduler",
                                                             _to_dict(self.scheduler)),
            "text_encoder/config.json": dict(self.text_encoder),
        }


def load_config(ckpt: str) -> MovaConfig:
    """Reads and validates every configuration file of the checkpoint folder `ckpt`."""
    if not os.path.isdir(ckpt):
        raise MovaInputError(f"checkpoint folder {ckpt} does not exist: pass --ckpt_path with the "
                             "folder that holds model_index.json")
    index = read_json(os.path.join(ckpt, "model_index.json"), "model_index.json")
    for name in COMPONENTS:
        entry = index.get(name)
        if not (isinstance(entry, list) and len(entry) == 2):
            raise MovaInputError(f"model_index.json has no component '{name}': this is not a "
                                 "MOVA checkpoint; use a MOVA-360p or MOVA-720p folder")
    from .validate.configs import check_model_index, check_text_encoder
    check_model_index(index)
    p = os.path.join
    try:
        pipeline = PipelineConfig(boundary_ratio=float(index.get("boundary_ratio", 0.9)),
                                  audio_vae_type=index.get("audio_vae_type", "dac"))
    except ValueError as e:
        raise MovaInputError(f"model_index.json: {e}") from None

    def comp(cls, rel):
        return _from_dict(cls, read_json(p(ckpt, rel), rel), rel)

    vae_raw = read_json(p(ckpt, "video_vae/config.json"), "video_vae/config.json")
    video_vae = _from_dict(VideoVAEConfig, vae_raw, "video_vae/config.json", passthrough=True)
    video_vae = dataclasses.replace(
        video_vae, raw={k: v for k, v in vae_raw.items() if not k.startswith("_")})
    text = read_json(p(ckpt, "text_encoder/config.json"), "text_encoder/config.json")
    check_text_encoder(text)
    cfg = MovaConfig(
        pipeline=pipeline,
        video_dit=comp(VideoDiTConfig, "video_dit/config.json"),
        video_dit_2=comp(VideoDiTConfig, "video_dit_2/config.json"),
        audio_dit=comp(AudioDiTConfig, "audio_dit/config.json"),
        bridge=comp(BridgeConfig, "dual_tower_bridge/config.json"),
        video_vae=video_vae,
        audio_vae=comp(AudioVAEConfig, "audio_vae/config.json"),
        scheduler=comp(SchedulerConfig, "scheduler/scheduler_config.json"),
        text_encoder=text,
    )
    cfg.check_consistency()
    return cfg


# --------------------------------------------------------------------------------------------
# Presets
# --------------------------------------------------------------------------------------------
def _video_dit_preset(dim, ffn, heads, layers, text_dim):
    return dict(dim=dim, in_dim=36, ffn_dim=ffn, out_dim=16, text_dim=text_dim, freq_dim=256,
                eps=1e-6, patch_size=[1, 2, 2], num_heads=heads, num_layers=layers,
                has_image_input=False, require_vae_embedding=True, require_clip_embedding=False)


def _audio_dit_preset(dim, ffn, heads, layers, text_dim, latent):
    return dict(dim=dim, in_dim=latent, ffn_dim=ffn, out_dim=latent, text_dim=text_dim,
                freq_dim=256, eps=1e-6, patch_size=[1], num_heads=heads, num_layers=layers,
                has_image_input=False, vae_type="dac")


_WAN21_VAE = dict(base_dim=96, z_dim=16, dim_mult=[1, 2, 4, 4], num_res_blocks=2, attn_scales=[],
                  temperal_downsample=[False, True, True], dropout=0.0,
                  latents_mean=[-0.7571, -0.7089, -0.9113, 0.1075, -0.1745, 0.9653, -0.1517,
                                1.5508, 0.4134, -0.0715, 0.5517, -0.3632, -0.1922, -0.9497,
                                0.2503, -0.2921],
                  latents_std=[2.8184, 1.4541, 2.3275, 2.6558, 1.2196, 1.7708, 2.6052, 2.0743,
                               3.2687, 2.1526, 2.8652, 1.5579, 1.6382, 1.1253, 2.8251, 1.916],
                  is_residual=False, in_channels=3, out_channels=3, patch_size=None,
                  scale_factor_temporal=4, scale_factor_spatial=8)

_UMT5_XXL = dict(architectures=["UMT5EncoderModel"], model_type="umt5", d_model=4096, d_ff=10240,
                 d_kv=64, num_heads=64, num_layers=24, num_decoder_layers=24, vocab_size=256384,
                 relative_attention_num_buckets=32, relative_attention_max_distance=128,
                 feed_forward_proj="gated-gelu", dense_act_fn="gelu_new", is_gated_act=True,
                 layer_norm_epsilon=1e-6, dropout_rate=0.1, initializer_factor=1.0,
                 is_encoder_decoder=True, tie_word_embeddings=False, pad_token_id=0,
                 eos_token_id=1, decoder_start_token_id=0, torch_dtype="bfloat16")

# DAC "vae_128d_48k" (spec 1.7); weight norm already removed in the released files.
_DAC_48K = dict(encoder_dim=128, encoder_rates=[2, 3, 4, 5, 8], latent_dim=128, decoder_dim=2048,
                decoder_rates=[8, 5, 4, 3, 2], n_codebooks=9, codebook_size=1024, codebook_dim=8,
                quantizer_dropout=False, sample_rate=48000, continuous=True,
                use_weight_norm=False)

_SCHEDULER = dict(num_inference_steps=50, num_train_timesteps=1000, shift=5.0, sigma_max=1.0,
                  sigma_min=0.0, inverse_timesteps=False, extra_one_step=True,
                  reverse_sigmas=False, exponential_shift=False, exponential_shift_mu=None,
                  shift_terminal=None)


def _full_preset():
    return {
        "video_dit": _video_dit_preset(5120, 13824, 40, 40, 4096),
        "audio_dit": _audio_dit_preset(1536, 8960, 12, 30, 4096, 128),
        "bridge": dict(visual_layers=40, audio_layers=30, visual_hidden_dim=5120,
                       audio_hidden_dim=1536, audio_fps=50.0, head_dim=128,
                       interaction_strategy="full", apply_cross_rope=True,
                       apply_first_frame_bias_in_rope=False, trainable_condition_scale=False,
                       pooled_adaln=False),
        "video_vae": dict(_WAN21_VAE),
        "audio_vae": dict(_DAC_48K),
        "scheduler": dict(_SCHEDULER),
        "text_encoder": dict(_UMT5_XXL),
        "boundary_ratio": 0.9,
    }


def _tiny_preset():
    """Small enough for a 2-core CPU, but keeps every structural feature: two heads per tower
    with head_dim 32, more video layers than audio layers (so video-only blocks run), a full
    interaction bridge, a 5-stage DAC with hop 960 (50 latents/s), the real latent sizes."""
    return {
        "video_dit": _video_dit_preset(64, 128, 2, 3, 32),
        "audio_dit": _audio_dit_preset(64, 96, 2, 2, 32, 16),
        "bridge": dict(visual_layers=3, audio_layers=2, visual_hidden_dim=64,
                       audio_hidden_dim=64, audio_fps=50.0, head_dim=32,
                       interaction_strategy="full", apply_cross_rope=True,
                       apply_first_frame_bias_in_rope=False, trainable_condition_scale=False,
                       pooled_adaln=False),
        "video_vae": dict(_WAN21_VAE, base_dim=8, dim_mult=[1, 2, 2, 2], num_res_blocks=1),
        "audio_vae": dict(_DAC_48K, encoder_dim=2, latent_dim=16, decoder_dim=64),
        "scheduler": dict(_SCHEDULER),
        "text_encoder": dict(_UMT5_XXL, d_model=32, d_ff=64, d_kv=8, num_heads=4, num_layers=2,
                             num_decoder_layers=2, vocab_size=512, torch_dtype="float32"),
        "boundary_ratio": 0.9,
    }


PRESETS = {"tiny": _tiny_preset, "mova-360p": _full_preset, "mova-720p": _full_preset}

# Default generation sizes per preset (height, width, frames): the reference README's 360p/720p
# clips, and a clip small enough for a CPU demo for `tiny`.
PRESET_SIZES = {"tiny": (64, 96, 17), "mova-360p": (352, 640, 193), "mova-720p": (720, 1280, 193)}


def preset_config(name: str) -> MovaConfig:
    if name not in PRESETS:
        raise MovaInputError(f"unknown preset '{name}': choose one of {', '.join(PRESETS)}")
    d = PRESETS[name]()
    vd = VideoDiTConfig(**d["video_dit"])
    cfg = MovaConfig(
        pipeline=PipelineConfig(boundary_ratio=d["boundary_ratio"]),
        video_dit=vd, video_dit_2=vd,
        audio_dit=AudioDiTConfig(**d["audio_dit"]),
        bridge=BridgeConfig(**d["bridge"]),
        video_vae=VideoVAEConfig(z_dim=d["video_vae"]["z_dim"],
                                 latents_mean=d["video_vae"]["latents_mean"],
                                 latents_std=d["video_vae"]["latents_std"], raw=d["video_vae"]),
        audio_vae=AudioVAEConfig(**d["audio_vae"]),
        scheduler=SchedulerConfig(**d["scheduler"]),
        text_encoder=d["text_encoder"],
    )
    cfg.check_consistency()
    return cfg


def asdict_public(cfg: Any) -> dict:
    """A json-friendly view of any of the dataclasses above."""
    return _to_dict(cfg)


# --------------------------------------------------------------------------------------------
# Sampling defaults and clip sizes
# --------------------------------------------------------------------------------------------
# The reference script's default negative prompt: the first 16 phrases of Wan's (spec 1.1).
DEFAULT_NEGATIVE_PROMPT = (
    "色调艳丽，过曝，静态，细节模糊不清，字幕，风格，作品，画作，画面，静止，"
    "整体发灰，最差质量，低质量，JPEG压缩残留，丑陋的，残缺的，多余的手指"
)


def check_sizes(height: int, width: int, num_frames: int, spatial: int = 8, temporal: int = 4):
    factor = spatial * 2  # VAE stride x patch size
    if height <= 0 or width <= 0 or height % factor or width % factor:
        raise MovaInputError(f"--height {height} / --width {width} must be positive multiples of "
                             f"{factor} (e.g. 352x640 or 720x1280)")
    if num_frames < 1 or (num_frames - 1) % temporal:
        raise MovaInputError(f"--num_frames {num_frames} must be 1 more than a multiple of "
                             f"{temporal} (e.g. 193 or 121)")


def audio_latent_length(sample_rate: int, hop: int, num_frames: int, fps: float) -> int:
    """Audio latents for a clip of num_frames at fps (spec 1.7): int(sr * F / fps) samples."""
    samples = int(sample_rate * num_frames / fps)
    return (samples - 1) // hop + 1
