"""What each JSON file of a checkpoint may hold: the type and range of every field mova-rt (or
the library it hands the file to) reads.

mova_rt.config applies these rules to each file before it builds its typed configuration, so a
value out of range is refused naming the file and the field instead of crashing later (a zero
`num_heads` divides by zero, a zero `num_train_timesteps` empties the schedule, a NaN `shift`
turns every latent into NaN after the whole denoise). The bounds are far outside any released
model; they only keep arithmetic and allocations sane. Relations between fields (dim divisible
by num_heads, the components agreeing with each other) stay in mova_rt.config.
"""

from __future__ import annotations

import math

from ..errors import MovaInputError
from .schema import Bool, Either, Int, List, Nullable, Obj, Real, Str, check

FIX = ("the file is damaged or not from a MOVA checkpoint; restore it from the checkpoint "
       "(download it again)")

DIM = Int(1, 65536)              # model widths (MOVA: 5120 video, 1536 audio, 4096 text)
LAYERS = Int(1, 1024)
HEADS = Int(1, 1024)
EPS = Real(0.0, 0.1, lo_open=True)
NAME = Str(pattern=r"[A-Za-z0-9_.\-]{1,64}", want="a name of letters, digits, '_', '.', '-'")

DIT = {
    "dim": DIM, "in_dim": DIM, "ffn_dim": Int(1, 262144), "out_dim": DIM, "text_dim": DIM,
    # the sinusoidal time embedding has freq_dim / 2 frequencies of sin and cos each
    "freq_dim": Int(2, 65536), "eps": EPS,
    "patch_size": List(Int(1, 64), 1, 3), "num_heads": HEADS, "num_layers": LAYERS,
    "has_image_input": Bool(), "has_image_pos_emb": Bool(), "has_ref_conv": Bool(),
    "add_control_adapter": Bool(), "in_dim_control_adapter": Int(1, 65536),
    "seperated_timestep": Bool(), "require_vae_embedding": Bool(),
    "require_clip_embedding": Bool(), "fuse_vae_embedding_in_latents": Bool(),
}

RULES = {
    "VideoDiTConfig": Obj(DIT),
    "AudioDiTConfig": Obj({**DIT, "vae_type": NAME}),
    "BridgeConfig": Obj({
        "visual_layers": LAYERS, "audio_layers": LAYERS, "visual_hidden_dim": DIM,
        "audio_hidden_dim": DIM, "audio_fps": Real(0.0, 1000.0, lo_open=True),
        "head_dim": Int(2, 1024),
        "interaction_strategy": Str(("shallow_focus", "distributed", "progressive", "custom",
                                     "full")),
        "apply_cross_rope": Bool(), "apply_first_frame_bias_in_rope": Bool(),
        "trainable_condition_scale": Bool(), "pooled_adaln": Bool(),
    }),
    # the fields diffusers' AutoencoderKLWan reads besides ours
    "VideoVAEConfig": Obj({
        "z_dim": Int(1, 1024), "latents_mean": List(Real(-1e4, 1e4), 1, 1024),
        "latents_std": List(Real(0.0, 1e4, lo_open=True), 1, 1024),
        "scale_factor_temporal": Int(1, 64), "scale_factor_spatial": Int(1, 64),
        "base_dim": Int(1, 4096), "dim_mult": List(Int(1, 64), 1, 16),
        "num_res_blocks": Int(0, 64), "attn_scales": List(Real(0.0, 1e4), 0, 16),
        "temperal_downsample": List(Bool(), 0, 16), "dropout": Real(0.0, 1.0, hi_open=True),
        "is_residual": Bool(), "in_channels": Int(1, 64), "out_channels": Int(1, 64),
        "patch_size": Nullable(Int(1, 64)),
    }),
    "AudioVAEConfig": Obj({
        "encoder_dim": Int(1, 4096), "encoder_rates": List(Int(1, 64), 1, 16),
        "latent_dim": Nullable(Int(1, 4096)), "decoder_dim": Int(1, 65536),
        "decoder_rates": List(Int(1, 64), 1, 16), "n_codebooks": Int(0, 1024),
        "codebook_size": Int(1, 1 << 20), "codebook_dim": Int(1, 4096),
        "quantizer_dropout": Either(Bool(), Real(0.0, 1.0)),
        "sample_rate": Int(1000, 384000), "continuous": Bool(), "use_weight_norm": Bool(),
    }),
    "SchedulerConfig": Obj({
        "num_inference_steps": Int(1, 1000), "num_train_timesteps": Int(1, 100000),
        "shift": Real(0.0, 1000.0, lo_open=True), "sigma_max": Real(0.0, 1.0, lo_open=True),
        "sigma_min": Real(0.0, 1.0, hi_open=True), "inverse_timesteps": Bool(),
        "extra_one_step": Bool(), "reverse_sigmas": Bool(), "exponential_shift": Bool(),
        "exponential_shift_mu": Nullable(Real(-100.0, 100.0)),
        "shift_terminal": Nullable(Real(0.0, 1.0, lo_open=True, hi_open=True)),
    }),
}

# model_index.json: the pipeline's own fields (each component entry is checked by load_config)
MODEL_INDEX = Obj({"boundary_ratio": Real(0.0, 1.0), "audio_vae_type": NAME})

_ACTS = ("relu", "gelu", "gelu_new", "gelu_fast", "gelu_pytorch_tanh", "quick_gelu", "silu",
         "swish", "tanh", "sigmoid")

# text_encoder/config.json: the UMT5 fields transformers' UMT5Config builds the encoder from
TEXT_ENCODER = Obj({
    "d_model": DIM, "d_ff": Int(1, 262144), "d_kv": Int(1, 4096), "num_heads": HEADS,
    "num_layers": LAYERS, "num_decoder_layers": Int(0, 1024), "vocab_size": Int(1, 1 << 24),
    "relative_attention_num_buckets": Int(1, 4096),
    "relative_attention_max_distance": Int(1, 1 << 20),
    "feed_forward_proj": Str(_ACTS + tuple(f"gated-{a}" for a in _ACTS)),
    "dense_act_fn": Str(_ACTS), "is_gated_act": Bool(), "layer_norm_epsilon": EPS,
    "dropout_rate": Real(0.0, 1.0, hi_open=True), "initializer_factor": Real(0.0, 1e4),
    "is_encoder_decoder": Bool(), "tie_word_embeddings": Bool(),
    "pad_token_id": Nullable(Int(0, 1 << 24)), "eos_token_id": Nullable(Int(0, 1 << 24)),
    "decoder_start_token_id": Nullable(Int(0, 1 << 24)),
    "model_type": Str(("umt5", "t5", "mt5")), "architectures": List(NAME, 0, 16),
    "torch_dtype": Nullable(Str(("float32", "bfloat16", "float16"))),
})


def check_fields(cls_name: str, raw: dict, where: str) -> None:
    """Type and range of every known field of the config file `where` (parsed into `raw`),
    for the dataclass `cls_name` of mova_rt.config."""
    rule = RULES.get(cls_name)
    if rule is not None:
        check(raw, rule, where, FIX)
    if cls_name == "SchedulerConfig" and _num(raw.get("sigma_min")) >= _num(raw.get("sigma_max"),
                                                                           math.inf):
        raise MovaInputError(f"{where}: field 'sigma_min' {raw['sigma_min']} is not below "
                             f"'sigma_max' {raw['sigma_max']}: {FIX}")


def _num(v, default=-math.inf) -> float:
    return float(v) if isinstance(v, (int, float)) and not isinstance(v, bool) else default


def check_model_index(index: dict, where: str = "model_index.json") -> None:
    check(index, MODEL_INDEX, where, FIX)


def check_text_encoder(raw: dict, where: str = "text_encoder/config.json") -> None:
    check(raw, TEXT_ENCODER, where, FIX)
