"""LoRA: both MOVA trainer formats and safetensors, merged W += scale * alpha / r * B @ A."""
import os

import pytest
import torch
from safetensors.torch import save_file

from mova_rt.errors import MovaInputError
from mova_rt.pipeline import MovaPipeline

R = 4


def lora_pairs(pipe):
    q = pipe.video_dit.blocks[1].self_attn.q.weight
    f = pipe.audio_dit.blocks[0].ffn[2].weight
    b = pipe.bridge.audio_to_video_conditioners["1"].inner.k.weight
    return {"video_dit.blocks.1.self_attn.q": q.shape, "audio_dit.blocks.0.ffn.2": f.shape,
            "dual_tower_bridge.audio_to_video_conditioners.1.inner.k": b.shape}


def make(pipe, suffix):
    sd, raw = {}, {}
    for name, (out_f, in_f) in lora_pairs(pipe).items():
        a, b = torch.randn(R, in_f), torch.randn(out_f, R)
        sd[f"{name}.lora_A{suffix}"], sd[f"{name}.lora_B{suffix}"] = a, b
        raw[name] = (a, b)
    return sd, raw


def weights(pipe):
    return {"video_dit.blocks.1.self_attn.q": pipe.video_dit.blocks[1].self_attn.q.weight,
            "audio_dit.blocks.0.ffn.2": pipe.audio_dit.blocks[0].ffn[2].weight,
            "dual_tower_bridge.audio_to_video_conditioners.1.inner.k":
                pipe.bridge.audio_to_video_conditioners["1"].inner.k.weight}


def check(base, merged, raw, alpha, scale):
    wb, wm = weights(base), weights(merged)
    for name, (a, b) in raw.items():
        expect = wb[name] + scale * (alpha / R) * (b @ a)
        assert torch.allclose(wm[name], expect, atol=1e-4, rtol=1e-5), name
    untouched = merged.video_dit.blocks[0].self_attn.q.weight
    assert torch.equal(untouched, base.video_dit.blocks[0].self_attn.q.weight)


@pytest.fixture
def base(tiny_pipe_fp32):
    return tiny_pipe_fp32


def test_accelerate_folder_with_config(base, tiny_ckpt, tmp_path):
    sd, raw = make(base, ".weight")
    torch.save(sd, tmp_path / "lora_weights.pt")
    torch.save({"rank": "WanModel", "alpha": 8.0}, tmp_path / "lora_config.pt")
    merged = MovaPipeline.from_pretrained(tiny_ckpt, dtype="fp32", lora_path=str(tmp_path))
    check(base, merged, raw, alpha=8.0, scale=1.0)


def test_accelerate_default_variant_and_alpha_override(base, tiny_ckpt, tmp_path):
    sd, raw = make(base, ".default.weight")
    torch.save(sd, tmp_path / "lora_weights.pt")
    merged = MovaPipeline.from_pretrained(tiny_ckpt, dtype="fp32", lora_path=str(tmp_path),
                                          lora_alpha=2.0, lora_scale=0.5)
    check(base, merged, raw, alpha=2.0, scale=0.5)


def test_low_resource_format(base, tiny_ckpt, tmp_path):
    sd, raw = make(base, "")
    torch.save({"lora_state_dict": sd, "rank": R, "alpha": 4.0, "dropout": 0.0,
                "target_modules": ["q", "k", "v", "o"]}, tmp_path / "lora_weights.pt")
    merged = MovaPipeline.from_pretrained(tiny_ckpt, dtype="fp32",
                                          lora_path=str(tmp_path / "lora_weights.pt"))
    check(base, merged, raw, alpha=4.0, scale=1.0)


def test_safetensors_lora_default_alpha(base, tiny_ckpt, tmp_path):
    sd, raw = make(base, ".weight")
    save_file(sd, tmp_path / "l.safetensors")
    with pytest.warns(UserWarning, match="stores no alpha"):
        merged = MovaPipeline.from_pretrained(tiny_ckpt, dtype="fp32",
                                              lora_path=str(tmp_path / "l.safetensors"))
    check(base, merged, raw, alpha=16.0, scale=1.0)


def test_mismatched_lora_is_refused(base, tiny_ckpt, tmp_path):
    sd, _ = make(base, ".weight")
    sd["video_dit.blocks.9.self_attn.q.lora_A.weight"] = torch.randn(R, 64)
    sd["video_dit.blocks.9.self_attn.q.lora_B.weight"] = torch.randn(64, R)
    save_file(sd, tmp_path / "bad.safetensors")
    with pytest.raises(MovaInputError, match="matches no Linear"):
        MovaPipeline.from_pretrained(tiny_ckpt, dtype="fp32", lora_path=str(tmp_path / "bad.safetensors"))
    sd, _ = make(base, ".weight")
    sd["audio_dit.blocks.0.ffn.2.lora_A.weight"] = torch.randn(R, 7)
    save_file(sd, tmp_path / "bad2.safetensors")
    with pytest.raises(MovaInputError, match="another model"):
        MovaPipeline.from_pretrained(tiny_ckpt, dtype="fp32", lora_path=str(tmp_path / "bad2.safetensors"))
    save_file({"text_encoder.x.lora_A": torch.ones(1, 1)}, tmp_path / "bad3.safetensors")
    with pytest.raises(MovaInputError, match="not a MOVA LoRA"):
        MovaPipeline.from_pretrained(tiny_ckpt, dtype="fp32", lora_path=str(tmp_path / "bad3.safetensors"))


def test_pickle_with_code_is_refused(tiny_ckpt, tmp_path):
    class Evil:
        def __reduce__(self):
            return (os.system, ("true",))
    torch.save({"x": Evil()}, tmp_path / "lora_weights.pt")
    with pytest.raises(MovaInputError, match="weights_only"):
        MovaPipeline.from_pretrained(tiny_ckpt, dtype="fp32", lora_path=str(tmp_path))
