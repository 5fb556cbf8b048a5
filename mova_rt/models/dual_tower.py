"""One joint network evaluation of MOVA: the video expert, the audio DiT and the bridge
(the reference's inference_single_step + forward_dual_tower_dit, spec 1.5 and 3.5).

    t, t_mod   = time MLPs(timestep) for each tower (fp32, then the block dtype)
    ctx_v/ctx_a = text_embedding(text) for each tower (512 zero-padded rows, no mask)
    for i < min(layers):  [bridge before block i] -> video block i -> audio block i
    for the remaining video layers: video block i
    heads (modulated by t), unpatchify
"""

from __future__ import annotations

import torch

from .audio_dit import AudioDiT
from .bridge import Bridge
from .video_dit import VideoDiT, time_embeddings


@torch.no_grad()
def dual_tower_forward(video_dit: VideoDiT, audio_dit: AudioDiT, bridge: Bridge,
                       video_in: torch.Tensor, audio_in: torch.Tensor, text: torch.Tensor,
                       timestep: torch.Tensor, video_fps: float):
    """video_in [B, 36, F, H, W] (noisy | mask | condition), audio_in [B, C_a, L_a], text
    [B, 512, text_dim], timestep [B] fp32 (the same for both towers in the released pipeline).
    Returns the velocities (video [B, 16, F, H, W], audio [B, C_a, L_a]) in the block dtype."""
    dtype = video_dit.patch_embedding.weight.dtype
    device = video_in.device
    vt, vt_mod = time_embeddings(video_dit, timestep, dtype)                # [B, D], [B, 6, D]
    at, at_mod = time_embeddings(audio_dit, timestep, dtype)
    text = text.to(dtype)
    ctx_v = video_dit.text_embedding(text)                                   # [B, 512, D_v]
    ctx_a = audio_dit.text_embedding(text)                                   # [B, 512, D_a]

    vx, grid = video_dit.patchify(video_in.to(dtype))                        # [B, L_v, D_v]
    ax, agrid = audio_dit.patchify(audio_in.to(dtype))                       # [B, L_a, D_a]
    v_rope = video_dit.rope(grid, device)
    a_rope = audio_dit.rope(agrid, device)
    bv_rope, ba_rope = bridge.rope(grid, agrid[0], video_fps, dtype, device)

    interact = set(bridge.layers)
    shared = min(len(video_dit.blocks), len(audio_dit.blocks))
    for i in range(shared):
        if i in interact:
            vx, ax = bridge(i, vx, ax, bv_rope, ba_rope)
        vx = video_dit.blocks[i](vx, ctx_v, vt_mod, v_rope)
        ax = audio_dit.blocks[i](ax, ctx_a, at_mod, a_rope)
    for block in list(video_dit.blocks)[shared:]:
        vx = block(vx, ctx_v, vt_mod, v_rope)

    video_v = video_dit.unpatchify(video_dit.head(vx, vt), grid)
    audio_v = audio_dit.unpatchify(audio_dit.head(ax, at), agrid)
    return video_v, audio_v

