"""make-checkpoint -> load round trip, the official layout, and every way a checkpoint can be bad."""
import json
import os

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from mova_rt.config import load_config, preset_config
from mova_rt.errors import MovaInputError
from mova_rt.pipeline import MovaPipeline

OFFICIAL_FILES = [
    "model_index.json", "scheduler/scheduler_config.json",
    "video_dit/config.json", "video_dit/diffusion_pytorch_model.safetensors.index.json",
    *[f"video_dit/diffusion_pytorch_model-0000{i}-of-00003.safetensors" for i in (1, 2, 3)],
    "video_dit_2/config.json", "video_dit_2/diffusion_pytorch_model.safetensors.index.json",
    *[f"video_dit_2/diffusion_pytorch_model-0000{i}-of-00003.safetensors" for i in (1, 2, 3)],
    "audio_dit/config.json", "audio_dit/diffusion_pytorch_model.safetensors",
    "dual_tower_bridge/config.json", "dual_tower_bridge/diffusion_pytorch_model.safetensors",
    "video_vae/config.json", "video_vae/diffusion_pytorch_model.safetensors",
    "audio_vae/config.json", "audio_vae/diffusion_pytorch_model.safetensors",
    "text_encoder/config.json", "text_encoder/model.safetensors.index.json",
    *[f"text_encoder/model-0000{i}-of-00003.safetensors" for i in (1, 2, 3)],
    "tokenizer/tokenizer.json", "tokenizer/tokenizer_config.json",
]


def read_component(ckpt, comp):
    out = {}
    for root, _, files in os.walk(os.path.join(ckpt, comp)):
        for f in files:
            if f.endswith(".safetensors"):
                with safe_open(os.path.join(root, f), "pt") as fh:
                    out.update({k: fh.get_tensor(k) for k in fh.keys()})
    return out


def test_official_layout_and_key_names(tiny_ckpt):
    for rel in OFFICIAL_FILES:
        assert os.path.isfile(os.path.join(tiny_ckpt, rel)), rel
    index = json.load(open(os.path.join(tiny_ckpt, "model_index.json")))
    assert index["_class_name"] == "MOVA" and index["boundary_ratio"] == 0.9
    assert index["video_dit"] == ["mova.diffusion.models.wan_video_dit", "WanModel"]
    v = read_component(tiny_ckpt, "video_dit")
    for k in ["patch_embedding.weight", "text_embedding.0.weight", "text_embedding.2.bias",
              "time_embedding.0.weight", "time_embedding.2.weight", "time_projection.1.weight",
              "blocks.0.modulation", "blocks.0.self_attn.q.weight", "blocks.0.self_attn.norm_q.weight",
              "blocks.2.cross_attn.norm_k.weight", "blocks.1.norm3.weight", "blocks.1.norm3.bias",
              "blocks.0.ffn.0.weight", "blocks.0.ffn.2.bias", "head.head.weight", "head.modulation"]:
        assert k in v, k
    assert v["blocks.0.modulation"].shape == (1, 6, 64) and v["head.modulation"].shape == (1, 2, 64)
    assert all(t.dtype == torch.bfloat16 for t in v.values())
    assert not any("norm1" in k or "norm2" in k for k in v)  # no params in the plain LayerNorms
    b = read_component(tiny_ckpt, "dual_tower_bridge")
    for k in ["audio_to_video_conditioners.1.y_norm.weight", "audio_to_video_conditioners.0.inner.k.weight",
              "video_to_audio_conditioners.1.inner.norm_q.weight", "video_to_audio_conditioners.0.inner.o.bias"]:
        assert k in b, k
    assert b["audio_to_video_conditioners.0.inner.k.weight"].shape == (64, 64)
    t = read_component(tiny_ckpt, "text_encoder")
    assert "shared.weight" in t and "encoder.final_layer_norm.weight" in t
    assert "encoder.block.1.layer.0.SelfAttention.relative_attention_bias.weight" in t
    assert "encoder.embed_tokens.weight" not in t
    a = read_component(tiny_ckpt, "audio_vae")
    assert "decoder.model.1.block.1.weight" in a and "quant_conv.weight" in a


def test_roundtrip_identical_tensors(tiny_ckpt):
    pipe = MovaPipeline.from_pretrained(tiny_ckpt, device="cpu", dtype="bf16")
    for comp, module in [("video_dit", pipe.video_dit), ("video_dit_2", pipe.video_dit_2),
                         ("audio_dit", pipe.audio_dit), ("dual_tower_bridge", pipe.bridge)]:
        stored = read_component(tiny_ckpt, comp)
        state = module.state_dict()
        assert set(stored) == set(state)
        for k, t in stored.items():
            assert torch.equal(state[k], t), (comp, k)
    stored = read_component(tiny_ckpt, "text_encoder")
    model = pipe.text_encoder.model
    for k, t in stored.items():
        assert torch.equal(model.state_dict()[k], t), k
    assert model.encoder.embed_tokens.weight.data_ptr() == model.shared.weight.data_ptr()
    # Both VAEs are stored fp32; the pipeline rounds to its dtype, the DAC then computes in fp32.
    vae = read_component(tiny_ckpt, "audio_vae")
    for k, t in vae.items():
        assert torch.equal(pipe.audio_vae.state_dict()[k], t.to(torch.bfloat16).float()), k


def test_config_read_from_files_not_defaults(tiny_ckpt):
    cfg = load_config(tiny_ckpt)
    assert cfg == preset_config("tiny")
    assert cfg.video_dit.num_layers == 3 and cfg.bridge.interaction_layers() == [0, 1]
    assert cfg.scheduler.shift == 5.0 and cfg.scheduler.extra_one_step


def _err(path, match, **kw):
    with pytest.raises(MovaInputError, match=match) as e:
        MovaPipeline.from_pretrained(path, device="cpu", dtype="bf16", **kw)
    assert "\n" not in str(e.value)
    return str(e.value)


def test_missing_folder_and_files(tiny_copy, tmp_path):
    _err(str(tmp_path / "nope"), "does not exist")
    os.remove(os.path.join(tiny_copy, "video_dit", "diffusion_pytorch_model-00002-of-00003.safetensors"))
    msg = _err(tiny_copy, "missing weight file")
    assert "video_dit" in msg


def test_missing_config_file(tiny_copy):
    os.remove(os.path.join(tiny_copy, "audio_vae", "config.json"))
    _err(tiny_copy, "missing audio_vae/config.json")


def test_truncated_safetensors(tiny_copy):
    path = os.path.join(tiny_copy, "audio_dit", "diffusion_pytorch_model.safetensors")
    data = open(path, "rb").read()
    open(path, "wb").write(data[: len(data) // 2])
    msg = _err(tiny_copy, "truncated or corrupt")
    assert "audio_dit" in msg


def test_garbage_safetensors(tiny_copy):
    path = os.path.join(tiny_copy, "dual_tower_bridge", "diffusion_pytorch_model.safetensors")
    open(path, "wb").write(os.urandom(4096))
    _err(tiny_copy, "dual_tower_bridge")


def test_config_and_weights_disagree_shape(tiny_copy):
    p = os.path.join(tiny_copy, "audio_dit", "config.json")
    cfg = json.load(open(p))
    cfg["ffn_dim"] = 80
    json.dump(cfg, open(p, "w"))
    msg = _err(tiny_copy, "has shape")
    assert "audio_dit" in msg and "ffn.0." in msg


def test_config_and_weights_disagree_layers(tiny_copy):
    for comp in ("video_dit", "video_dit_2"):
        p = os.path.join(tiny_copy, comp, "config.json")
        cfg = json.load(open(p))
        cfg["num_layers"] = 2
        json.dump(cfg, open(p, "w"))
    msg = _err(tiny_copy, "disagree")  # the bridge config now disagrees with the DiTs


def _rewrite(path, fn):
    with safe_open(path, "pt") as f:
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    save_file(fn(tensors), path, metadata={"format": "pt"})


def test_missing_and_unexpected_keys(tiny_copy):
    path = os.path.join(tiny_copy, "audio_dit", "diffusion_pytorch_model.safetensors")
    _rewrite(path, lambda t: {k: v for k, v in t.items() if k != "blocks.1.norm3.bias"})
    msg = _err(tiny_copy, "lacks 1 tensors")
    assert "blocks.1.norm3.bias" in msg and "audio_dit" in msg
    _rewrite(path, lambda t: {**t, "blocks.1.norm3.bias": torch.zeros(64), "extra.weight": torch.ones(2)})
    msg = _err(tiny_copy, "unexpected")
    assert "extra.weight" in msg


def test_wrong_dtype(tiny_copy):
    path = os.path.join(tiny_copy, "audio_dit", "diffusion_pytorch_model.safetensors")
    _rewrite(path, lambda t: {**t, "head.head.bias": torch.zeros(16, dtype=torch.int32)})
    msg = _err(tiny_copy, "dtype")
    assert "head.head.bias" in msg


def test_index_lists_a_key_the_shard_lacks(tiny_copy):
    p = os.path.join(tiny_copy, "video_dit", "diffusion_pytorch_model.safetensors.index.json")
    idx = json.load(open(p))
    idx["weight_map"]["blocks.0.ghost.weight"] = "diffusion_pytorch_model-00001-of-00003.safetensors"
    json.dump(idx, open(p, "w"))
    _err(tiny_copy, "lacks blocks.0.ghost.weight")


def test_not_a_mova_checkpoint(tmp_path):
    (tmp_path / "model_index.json").write_text(json.dumps({"_class_name": "WanPipeline"}))
    _err(str(tmp_path), "not a MOVA checkpoint")
    (tmp_path / "model_index.json").write_text("{not json")
    _err(str(tmp_path), "cannot parse")


def test_weight_norm_checkpoint_is_folded(tiny_copy):
    """A DAC stored with weight norm (weight_g/weight_v) loads to the same weights."""
    path = os.path.join(tiny_copy, "audio_vae", "diffusion_pytorch_model.safetensors")
    with safe_open(path, "pt") as f:
        plain = {k: f.get_tensor(k) for k in f.keys()}
    wn = {}
    for k, t in plain.items():
        if k.endswith(".weight") and t.dim() == 3 and "quant_conv" not in k:
            g = t.flatten(1).norm(dim=1).view(-1, 1, 1)
            wn[k[:-7] + ".weight_g"], wn[k[:-7] + ".weight_v"] = g, t * 3.0
        else:
            wn[k] = t
    save_file(wn, path)
    p = os.path.join(tiny_copy, "audio_vae", "config.json")
    cfg = json.load(open(p))
    cfg["use_weight_norm"] = True
    json.dump(cfg, open(p, "w"))
    pipe = MovaPipeline.from_pretrained(tiny_copy, device="cpu", dtype="fp32")
    for k, t in plain.items():
        assert torch.allclose(pipe.audio_vae.state_dict()[k], t, rtol=1e-5, atol=1e-6), k


def test_config_missing_field_and_unsupported_value(tiny_copy):
    p = os.path.join(tiny_copy, "video_dit", "config.json")
    cfg = json.load(open(p))
    del cfg["num_heads"]
    json.dump(cfg, open(p, "w"))
    _err(tiny_copy, "video_dit/config.json has no field 'num_heads'")
    cfg["num_heads"] = 2
    json.dump(cfg, open(p, "w"))
    p = os.path.join(tiny_copy, "audio_dit", "config.json")
    cfg = json.load(open(p))
    cfg["vae_type"] = "oobleck"
    json.dump(cfg, open(p, "w"))
    _err(tiny_copy, "vae_type 'oobleck' is not supported")
