"""The work of one MOVA forward, written out (spec 4.1 - 4.2), and the shapes it runs at.

Multiply-add = 2 FLOPs. With d the video width, f the video FFN width, d_a / f_a the audio ones,
L_v / L_a / L_t the video / audio / text token counts and n the bridge's interaction layers:

    video block   linear    12 L_v d^2 (self QKVO + cross Q,O) + 4 L_t d^2 (cross K,V) + 4 L_v d f
                  attention 4 L_v^2 d (self) + 4 L_v L_t d (text cross)
    audio block   the same with (L_a, d_a, f_a)
    bridge layer  a2v linear 4 L_v d^2 + 4 L_a d_a d,    a2v attention 4 L_v L_a d
                  v2a linear 4 L_a d_a^2 + 4 L_v d d_a,  v2a attention 4 L_a L_v d_a
    embeddings    patch embedding, head, text embedding (two linears per tower), time MLPs

One denoising step = forwards_per_step forwards (2 with text CFG, 3 with Dual CFG).
The spec's numbers at 352x640x193: 2.77 PFLOP per forward, 5.53 per step, 55% self-attention.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

from mova_rt.config import MovaConfig, audio_latent_length, check_sizes


@dataclass(frozen=True)
class Shapes:
    """Every size a benchmark needs, derived once from the configuration and the clip size."""
    height: int
    width: int
    num_frames: int
    fps: float
    latent_grid: tuple          # (T, h, w) of the video latents
    video_grid: tuple           # (T, h, w) after patchify
    L_v: int                    # video tokens
    L_a: int                    # audio tokens (= audio latent frames, patch 1)
    L_t: int                    # text tokens (the encoder's fixed 512)
    z_dim: int                  # video latent channels
    audio_channels: int         # audio latent channels
    text_dim: int

    def as_dict(self) -> dict:
        return {k: list(v) if isinstance(v, tuple) else v for k, v in asdict(self).items()}


TEXT_TOKENS = 512  # the reference pads / truncates every prompt to 512 tokens (spec 1.1)


def clip_shapes(cfg: MovaConfig, height: int, width: int, num_frames: int,
                fps: float = 24.0) -> Shapes:
    vae = cfg.video_vae
    check_sizes(height, width, num_frames, vae.scale_factor_spatial, vae.scale_factor_temporal)
    t = (num_frames - 1) // vae.scale_factor_temporal + 1
    h, w = height // vae.scale_factor_spatial, width // vae.scale_factor_spatial
    pf, ph, pw = cfg.video_dit.patch_size
    grid = (t // pf, h // ph, w // pw)
    l_a = audio_latent_length(cfg.audio_vae.sample_rate, cfg.audio_vae.hop_length, num_frames, fps)
    return Shapes(height=height, width=width, num_frames=num_frames, fps=fps,
                  latent_grid=(t, h, w), video_grid=grid, L_v=math.prod(grid),
                  L_a=l_a // cfg.audio_dit.patch_size[0], L_t=TEXT_TOKENS, z_dim=vae.z_dim,
                  audio_channels=cfg.audio_dit.in_dim, text_dim=cfg.video_dit.text_dim)


def forward_flops(cfg: MovaConfig, s: Shapes) -> dict:
    """FLOPs of one dual-tower forward by component (batch 1), from the formulas above."""
    v, a, br = cfg.video_dit, cfg.audio_dit, cfg.bridge
    d, f, d_a, f_a = v.dim, v.ffn_dim, a.dim, a.ffn_dim
    lv, la, lt = s.L_v, s.L_a, s.L_t
    n_bridge = len(br.interaction_layers())

    def embed(dit, tokens):
        patch = math.prod(dit.patch_size)
        return (2 * tokens * dit.in_dim * patch * dit.dim           # patch embedding
                + 2 * tokens * dit.dim * dit.out_dim * patch        # head
                + 2 * lt * (dit.text_dim * dit.dim + dit.dim * dit.dim)  # text embedding MLP
                + 2 * (dit.freq_dim * dit.dim + dit.dim * dit.dim + dit.dim * 6 * dit.dim))

    return {
        "video_linear": v.num_layers * (12 * lv * d * d + 4 * lt * d * d + 4 * lv * d * f),
        "video_self_attention": v.num_layers * 4 * lv * lv * d,
        "video_text_attention": v.num_layers * 4 * lv * lt * d,
        "audio_linear": a.num_layers * (12 * la * d_a * d_a + 4 * lt * d_a * d_a
                                        + 4 * la * d_a * f_a),
        "audio_attention": a.num_layers * (4 * la * la * d_a + 4 * la * lt * d_a),
        "bridge_linear": n_bridge * (4 * lv * d * d + 4 * la * d_a * d
                                     + 4 * la * d_a * d_a + 4 * lv * d * d_a),
        "bridge_attention": n_bridge * (4 * lv * la * d + 4 * la * lv * d_a),
        "embeddings_heads": embed(v, lv) + embed(a, la),
    }


def tower_of(component: str) -> str:
    """Which tower a forward_flops() component belongs to (video expert, audio DiT, bridge)."""
    return component.split("_")[0] if not component.startswith("embeddings") else "video"


def param_counts(modules: dict) -> dict:
    """Parameters per module (works on meta-device modules)."""
    return {name: sum(p.numel() for p in m.parameters()) for name, m in modules.items()}


# The spec's counts (2.1) of the released architecture, for the meta-device checks.
SPEC_PARAMS = {"video_dit": 14.289e9, "audio_dit": 1.419e9, "dual_tower_bridge": 2.660e9}
SPEC_PFLOP_PER_FORWARD = {"mova-360p": 2.77, "mova-720p": 30.56}
