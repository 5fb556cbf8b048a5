"""One joint network evaluation of MOVA: the video expert, the audio DiT and the bridge
(the reference's inference_single_step + forward_dual_tower_dit, spec 1.5 and 3.5).

    t, t_mod   = time MLPs(timestep) for each tower (fp32, then the block dtype)
    ctx_v/ctx_a = text_embedding(text) for each tower (512 zero-padded rows, no mask), and from it
                 the K/V of every block's text cross-attention
    for i < min(layers):  [bridge before block i] -> video block i -> audio block i
    for the remaining video layers: video block i
    heads (modulated by t), unpatchify

The per-request constants (time embeddings of each step, text K/V, RoPE descriptions) can be
handed in precomputed (`Prepared`); they are then not recomputed, with identical results.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .audio_dit import AudioDiT
from .bridge import Bridge
from ..cache import cached_stack
from ..offload import materialized
from .video_dit import VideoDiT, time_embeddings


@dataclass
class Prepared:
    """Exact per-request caches; a field left None is computed by the forward."""
    video_time: tuple | None = None      # (t [B, D], t_mod [B, 6, D]) in the block dtype
    audio_time: tuple | None = None
    video_text: list | None = None       # per video block: (k, v) of its text cross-attention
    audio_text: list | None = None
    ropes: tuple | None = None           # (video, audio, bridge video, bridge audio)


def text_kv(dit, text: torch.Tensor) -> list:
    """The K/V [B, 512, H, D] of every block's text cross-attention (k before its RMSNorm)."""
    dtype = dit.patch_embedding.weight.dtype
    ctx = dit.text_embedding(text.to(dtype))                                 # [B, 512, D]
    out = []
    for block in dit.blocks:
        with materialized(block):        # a streamed block's weights, bound for this call
            out.append(block.cross_attn.kv(ctx))
    return out


def ropes(video_dit: VideoDiT, audio_dit: AudioDiT, bridge: Bridge, grid: tuple, agrid: tuple,
          video_fps: float, dtype: torch.dtype, device) -> tuple:
    bv, ba = bridge.rope(grid, agrid[0], video_fps, dtype, device)
    return video_dit.rope(grid, device), audio_dit.rope(agrid, device), bv, ba


@torch.no_grad()
def dual_tower_forward(video_dit: VideoDiT, audio_dit: AudioDiT, bridge: Bridge,
                       video_in: torch.Tensor, audio_in: torch.Tensor, text: torch.Tensor,
                       timestep: torch.Tensor, video_fps: float, prepared: Prepared | None = None,
                       bridge_from: int = 0, step_cache=None, cache_key=None):
    """video_in [B, 36, F, H, W] (noisy | mask | condition), audio_in [B, C_a, L_a], text
    [B, 512, text_dim] (unused when `prepared` holds the text K/V), timestep [1] or [B] fp32
    (the same for both towers in the released pipeline). Batch rows >= bridge_from get the
    bridge; rows before it run the two towers independently (Dual CFG's bridge-off pass).
    step_cache (mova_rt.cache.StepCache) may replace the layers after the first by a stored
    residual (step caching, opt-in); cache_key names the guidance passes of this call.
    Returns the velocities (video [B, 16, F, H, W], audio [B, C_a, L_a]) in the block dtype."""
    p = prepared or Prepared()
    dtype = video_dit.patch_embedding.weight.dtype
    device = video_in.device
    vt, vt_mod = p.video_time or time_embeddings(video_dit, timestep, dtype)  # [B, D], [B, 6, D]
    at, at_mod = p.audio_time or time_embeddings(audio_dit, timestep, dtype)
    kv_v = p.video_text or text_kv(video_dit, text)
    kv_a = p.audio_text or text_kv(audio_dit, text)

    vx, grid = video_dit.patchify(video_in.to(dtype))                        # [B, L_v, D_v]
    ax, agrid = audio_dit.patchify(audio_in.to(dtype))                       # [B, L_a, D_a]
    v_rope, a_rope, bv_rope, ba_rope = p.ropes or ropes(video_dit, audio_dit, bridge, grid, agrid,
                                                        video_fps, dtype, device)

    interact = set(bridge.layers)
    shared = min(len(video_dit.blocks), len(audio_dit.blocks))
    k = bridge_from

    def layer(i, s):
        """[bridge before block i] -> video block i -> audio block i (video only past shared).
        s = [video, audio] is updated in place, so no stale state stays referenced."""
        if i < shared and i in interact and k < s[0].shape[0]:
            if k == 0:
                s[0], s[1] = bridge(i, s[0], s[1], bv_rope, ba_rope)
            else:
                nv, na = bridge(i, s[0][k:], s[1][k:], bv_rope, ba_rope)
                s[0], s[1] = torch.cat([s[0][:k], nv]), torch.cat([s[1][:k], na])
                del nv, na
        s[0] = video_dit.blocks[i](s[0], kv_v[i], vt_mod, v_rope)
        if i < shared:
            s[1] = audio_dit.blocks[i](s[1], kv_a[i], at_mod, a_rope)

    caching = step_cache is not None and step_cache.enabled
    v_in, a_in = (vx, ax) if caching else (None, None)      # kept only to measure the change
    state = [vx, ax]
    del vx, ax
    layer(0, state)
    reuse = cached_stack(step_cache, cache_key, v_in, a_in, *state) if caching else None
    del v_in, a_in
    if reuse is not None:                       # step caching: the stored stack residual
        state = [state[0] + reuse[0], state[1] + reuse[1]]
    else:
        for i in range(1, len(video_dit.blocks)):
            layer(i, state)
        if caching:
            step_cache.store(*state)
    vx, ax = state

    video_v = video_dit.unpatchify(video_dit.head(vx, vt), grid)
    audio_v = audio_dit.unpatchify(audio_dit.head(ax, at), agrid)
    return video_v, audio_v
