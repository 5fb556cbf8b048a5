"""Tests for mova_rt.models.text_encoder: prompt cleaning, tiny tokenizer, zero-padded UMT5 encoding."""

import json
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pytest
import sentencepiece
import torch
from tokenizers import Tokenizer

from mova_rt.errors import MovaInputError
from mova_rt.models.text_encoder import (
    TextEncoder,
    build_umt5_encoder,
    load_tokenizer,
    prompt_clean,
    tie_umt5_embeddings,
    umt5_expected_keys,
)
from mova_rt.models.tiny_tokenizer import TOKENIZER_STYLES, write_tiny_tokenizer

TINY_UMT5 = {
    "d_model": 32, "d_ff": 64, "d_kv": 8, "num_heads": 4, "num_layers": 2, "vocab_size": 512,
    "feed_forward_proj": "gated-gelu", "relative_attention_num_buckets": 32,
    "relative_attention_max_distance": 128, "dropout_rate": 0.1, "model_type": "umt5",
    "tie_word_embeddings": False, "pad_token_id": 0, "eos_token_id": 1,
}
PROMPTS = ["A red car drives slowly down a quiet street at night, while the camera follows it.", "dog"]
FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "spiece.model")


@pytest.fixture(scope="module")
def tiny_tokenizer_dir(tmp_path_factory):
    folder = str(tmp_path_factory.mktemp("tokenizer"))
    write_tiny_tokenizer(folder, 512)
    return folder


@pytest.fixture(scope="module")
def tokenizer_dirs(tmp_path_factory):
    """style -> a folder written by write_tiny_tokenizer(..., 512, style)."""
    out = {}
    for style in TOKENIZER_STYLES:
        folder = str(tmp_path_factory.mktemp(f"tokenizer-{style}"))
        write_tiny_tokenizer(folder, 512, style)
        out[style] = folder
    return out


@pytest.fixture(scope="module")
def tiny_model():
    model = build_umt5_encoder(TINY_UMT5)
    gen = torch.Generator().manual_seed(0)
    shapes = model.state_dict()
    keys = sorted(umt5_expected_keys(model))
    weights = {k: torch.randn(shapes[k].shape, generator=gen) * 0.5 for k in keys}
    missing, unexpected = model.load_state_dict(weights, strict=False, assign=True)
    assert set(missing) == {"encoder.embed_tokens.weight"} and not unexpected
    return tie_umt5_embeddings(model)


@pytest.mark.parametrize(
    "raw, clean",
    [
        ("A &amp;amp; B", "A & B"),
        ("&lt;b&gt; bold", "<b> bold"),
        ("schÃ¶n", "schön"),
        ("The Mona Lisa doesnÃ¢â‚¬â„¢t have eyebrows.", "The Mona Lisa doesn't have eyebrows."),
        ("  a \n\t b  \r\n c ", "a b c"),
        ("", ""),
    ],
)
def test_prompt_clean(raw, clean):
    assert prompt_clean(raw) == clean


@pytest.mark.parametrize("style", TOKENIZER_STYLES)
def test_tiny_tokenizer_files_and_determinism(tmp_path, tokenizer_dirs, style):
    write_tiny_tokenizer(str(tmp_path), 512, style)
    written = sorted(os.listdir(tmp_path))
    assert written == sorted(FILES if style in ("always", "umt5-xxl") else FILES[:3])
    for name in written:
        assert (tmp_path / name).read_bytes() == open(os.path.join(tokenizer_dirs[style], name), "rb").read()
    assert Tokenizer.from_file(str(tmp_path / "tokenizer.json")).get_vocab_size() == 512
    with pytest.raises(MovaInputError):
        write_tiny_tokenizer(str(tmp_path / "bad"), 10, style)


def test_tokenizer_json_settings(tokenizer_dirs):
    """The variants say what they claim: Metaspace prepend_scheme always / first / never, and
    umt5-xxl's normalizer (Precompiled nmt_nfkc + Replace), specials and byte fallback."""
    def read(style):
        with open(os.path.join(tokenizer_dirs[style], "tokenizer.json"), encoding="utf-8") as fh:
            return json.load(fh)

    for style in ("always", "first", "never"):
        doc = read(style)
        schemes = [p.get("prepend_scheme") for p in doc["pre_tokenizer"]["pretokenizers"]]
        assert schemes == [None, style] and doc["normalizer"] is None
    doc = read("umt5-xxl")
    assert [n["type"] for n in doc["normalizer"]["normalizers"]] == ["Precompiled", "Replace"]
    assert doc["pre_tokenizer"]["type"] == "Metaspace" and doc["pre_tokenizer"]["prepend_scheme"] == "always"
    assert doc["model"]["unk_id"] == 3 and doc["model"]["byte_fallback"] is True
    added = {t["content"]: t["id"] for t in doc["added_tokens"]}
    assert [added[s] for s in ("<pad>", "</s>", "<s>", "<unk>")] == [0, 1, 2, 3]
    assert added["<extra_id_0>"] == 511


def test_tiny_tokenizer_loads_and_pads(tiny_tokenizer_dir):
    tok = load_tokenizer(tiny_tokenizer_dir)
    assert len(tok) == 512 and tok.model_max_length == 512
    assert (tok.pad_token_id, tok.eos_token_id, tok.unk_token_id) == (0, 1, 2)
    assert tok.convert_ids_to_tokens(tok("the dog").input_ids) == ["▁the", "▁dog", "</s>"]
    batch = tok(PROMPTS, padding="max_length", max_length=512, truncation=True, add_special_tokens=True,
                return_attention_mask=True, return_tensors="pt")
    assert batch.input_ids.shape == (2, 512)
    for ids, mask in zip(batch.input_ids, batch.attention_mask):
        n = int(mask.sum())
        assert ids[n - 1] == 1 and (ids[n:] == 0).all() and (ids[: n - 1] > 2).all() and mask[:n].all()
    long = tok(["word " * 1000], padding="max_length", max_length=512, truncation=True, return_tensors="pt")
    assert long.input_ids.shape == (1, 512) and long.input_ids[0, -1] == 1 and long.attention_mask.all()
    assert 2 in tok("一只猫 sits on the mat").input_ids


def test_tiny_tokenizer_backends_agree(tiny_tokenizer_dir):
    tok = load_tokenizer(tiny_tokenizer_dir)
    raw = Tokenizer.from_file(os.path.join(tiny_tokenizer_dir, "tokenizer.json"))
    spm = sentencepiece.SentencePieceProcessor(model_file=os.path.join(tiny_tokenizer_dir, "spiece.model"))
    assert spm.get_piece_size() == 512 and (spm.pad_id(), spm.eos_id(), spm.unk_id()) == (0, 1, 2)
    for text in PROMPTS + ["Rain falls; 42 people are watching!", "一只猫 sits on 你好 the mat"]:
        ids = tok(text).input_ids
        assert ids == raw.encode(text).ids == spm.encode(text, add_eos=True)


def test_load_tokenizer_errors(tmp_path):
    with pytest.raises(MovaInputError, match="does not exist"):
        load_tokenizer(str(tmp_path / "missing"))
    with pytest.raises(MovaInputError, match="no tokenizer.json"):
        load_tokenizer(str(tmp_path))
    (tmp_path / "tokenizer.json").write_text("{not json")
    with pytest.raises(MovaInputError, match="cannot read"):
        load_tokenizer(str(tmp_path))


def test_umt5_keys_and_tying(tiny_model):
    fresh = build_umt5_encoder(TINY_UMT5)
    keys = umt5_expected_keys(fresh)
    assert set(fresh.state_dict()) - keys == {"encoder.embed_tokens.weight"}
    assert {"shared.weight", "encoder.final_layer_norm.weight",
            "encoder.block.1.layer.0.SelfAttention.relative_attention_bias.weight",
            "encoder.block.1.layer.1.DenseReluDense.wi_1.weight"} <= keys
    assert all(p.is_meta for p in fresh.parameters()) and not fresh.training
    assert not any(t.is_meta for t in list(tiny_model.parameters()) + list(tiny_model.buffers()))
    assert tiny_model.encoder.embed_tokens.weight is tiny_model.shared.weight


def test_encode_zero_pads_and_matches_model(tiny_tokenizer_dir, tiny_model):
    encoder = TextEncoder(load_tokenizer(tiny_tokenizer_dir), tiny_model)
    out = encoder.encode(PROMPTS, "cpu", torch.float32)
    assert out.shape == (2, 512, 32) and out.dtype == torch.float32
    ids, mask = encoder.tokenize(PROMPTS)
    with torch.no_grad():
        ref = tiny_model(ids, mask).last_hidden_state
    lens = mask.sum(dim=1).tolist()
    assert lens[0] > lens[1] == 2
    for b, n in enumerate(lens):
        assert torch.equal(out[b, :n], ref[b, :n])
        assert (out[b, :n].abs().sum(dim=-1) > 0).all()
        assert torch.equal(out[b, n:], torch.zeros(512 - n, 32))
    half = encoder.encode(PROMPTS, "cpu", torch.bfloat16)
    assert half.dtype == torch.bfloat16 and torch.equal(half, out.to(torch.bfloat16))
    single = encoder.encode(["  dog \n"], "cpu", torch.float32)[0]
    torch.testing.assert_close(single, out[1], rtol=1e-5, atol=1e-6)


def test_encode_rejects_bad_prompts(tiny_tokenizer_dir, tiny_model):
    encoder = TextEncoder(load_tokenizer(tiny_tokenizer_dir), tiny_model)
    for bad in ("a single string", [], [None]):
        with pytest.raises(MovaInputError):
            encoder.encode(bad, "cpu", torch.float32)


def test_make_checkpoint_writes_the_requested_tokenizer(monkeypatch, tmp_path):
    from mova_rt import checkpoint
    from mova_rt.cli import main

    calls = []
    monkeypatch.setattr(checkpoint, "write_checkpoint",
                        lambda cfg, out, seed, tokenizer: calls.append((out, tokenizer)))
    for style in TOKENIZER_STYLES:
        assert main(["make-checkpoint", "--out", str(tmp_path / style), "--tokenizer", style]) == 0
    assert calls == [(str(tmp_path / s), s) for s in TOKENIZER_STYLES]
    with pytest.raises(SystemExit):
        main(["make-checkpoint", "--out", str(tmp_path / "x"), "--tokenizer", "sometimes"])
    with pytest.raises(MovaInputError, match="unknown --tokenizer"):
        checkpoint.make_checkpoint("tiny", str(tmp_path / "y"), tokenizer="sometimes")
