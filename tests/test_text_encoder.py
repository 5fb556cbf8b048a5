"""Tests for mova_rt.models.text_encoder: prompt cleaning, the tokenizer read from tokenizer.json as
written (every make-checkpoint variant), the UMT5 encoder against its eager formula, zero padding."""

import json
import math
import os

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
    relative_position_bucket,
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
# Awkward texts: Chinese (MOVA's default negative prompt is Chinese), NFKC-sensitive characters,
# literal special tokens, a prompt longer than 512 tokens, an empty prompt.
TEXTS = PROMPTS + [
    "", "一只猫 sits on 你好 the mat", "ＡＢＣ full-width … naïve café ½ ™",
    "Rain falls; 42 people are watching!", "<extra_id_0> and </s> inside", "word " * 700,
]
FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "spiece.model")


@pytest.fixture(scope="module")
def tokenizer_dirs(tmp_path_factory):
    """style -> a folder written by write_tiny_tokenizer(..., 512, style)."""
    out = {}
    for style in TOKENIZER_STYLES:
        folder = str(tmp_path_factory.mktemp(f"tokenizer-{style}"))
        write_tiny_tokenizer(folder, 512, style)
        out[style] = folder
    return out


def random_umt5(config, seed=0):
    model = build_umt5_encoder(config)
    gen = torch.Generator().manual_seed(seed)
    shapes = model.state_dict()
    keys = sorted(umt5_expected_keys(model))
    weights = {k: torch.randn(shapes[k].shape, generator=gen) * 0.5 for k in keys}
    missing, unexpected = model.load_state_dict(weights, strict=False, assign=True)
    assert set(missing) == {"encoder.embed_tokens.weight"} and not unexpected
    return tie_umt5_embeddings(model), weights


@pytest.fixture(scope="module")
def tiny_model():
    return random_umt5(TINY_UMT5)[0]


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


# 1. Tokenizer ------------------------------------------------------------------------------------

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


def _reference_call(folder, texts, max_length=512):
    """The reference's T5TokenizerFast call written out over the `tokenizers` library reading the
    file itself: tokens without specials, truncated on the right to leave room for `</s>`, then
    `</s>`, then `<pad>` up to max_length; mask 1 on tokens and `</s>`."""
    raw = Tokenizer.from_file(os.path.join(folder, "tokenizer.json"))
    eos, pad = raw.token_to_id("</s>"), raw.token_to_id("<pad>")
    ids, mask = [], []
    for text in texts:
        row = raw.encode(text, add_special_tokens=False).ids[: max_length - 1] + [eos]
        ids.append(row + [pad] * (max_length - len(row)))
        mask.append([1] * len(row) + [0] * (max_length - len(row)))
    return torch.tensor(ids), torch.tensor(mask)


@pytest.mark.parametrize("style", TOKENIZER_STYLES)
def test_ids_equal_the_tokenizers_library_reading_the_file(tokenizer_dirs, style):
    folder = tokenizer_dirs[style]
    ids, mask = load_tokenizer(folder)(TEXTS, 512)
    want_ids, want_mask = _reference_call(folder, TEXTS)
    assert ids.dtype == mask.dtype == torch.int64 and ids.shape == mask.shape == (len(TEXTS), 512)
    bad = [t[:30] for t, a, b in zip(TEXTS, ids, want_ids) if not torch.equal(a, b)]
    assert not bad, f"{style}: ids differ from tokenizer.json's for {bad}"
    assert torch.equal(mask, want_mask)
    assert mask[-1].all() and ids[-1, -1] == 1  # the long prompt: truncated, `</s>` kept


def test_prepend_scheme_never_adds_no_leading_metaspace(tokenizer_dirs):
    """"A person" under "never": A p er s o n </s>; transformers 5's T5TokenizerFast put "▁" (3)
    in front and "▁A ▁person" for "first" too."""
    ids, mask = load_tokenizer(tokenizer_dirs["never"])(["A person"], 512)
    assert ids[0, : int(mask.sum())].tolist() == [36, 83, 101, 86, 82, 81, 1]
    first, _ = load_tokenizer(tokenizer_dirs["first"])(["A person"], 512)
    always, _ = load_tokenizer(tokenizer_dirs["always"])(["A person"], 512)
    assert first[0, 0] == always[0, 0] != ids[0, 0]  # "▁A" before the first word only
    assert first[0, 1] != always[0, 1]


@pytest.mark.parametrize("style", ["always", "umt5-xxl"])
def test_tokenizer_json_and_spiece_model_agree(tokenizer_dirs, style):
    folder = tokenizer_dirs[style]
    tok = load_tokenizer(folder)
    spm = sentencepiece.SentencePieceProcessor(model_file=os.path.join(folder, "spiece.model"))
    pieces = 504 if style == "umt5-xxl" else 512  # umt5-xxl: the <extra_id_*> are added tokens
    assert spm.get_piece_size() == pieces and (spm.pad_id(), spm.eos_id()) == (0, 1)
    for text in TEXTS[:6]:
        ids, mask = tok([text], 512)
        assert ids[0, : int(mask.sum())].tolist() == spm.encode(text, add_eos=True), text


def test_load_tokenizer_errors(tmp_path, tokenizer_dirs):
    with pytest.raises(MovaInputError, match="does not exist"):
        load_tokenizer(str(tmp_path / "missing"))
    with pytest.raises(MovaInputError, match="no tokenizer.json"):
        load_tokenizer(str(tmp_path))
    (tmp_path / "spiece.model").write_bytes(open(os.path.join(tokenizer_dirs["always"], "spiece.model"), "rb").read())
    with pytest.raises(MovaInputError, match="no tokenizer.json"):
        load_tokenizer(str(tmp_path))
    (tmp_path / "tokenizer.json").write_text("{not json")
    with pytest.raises(MovaInputError, match="cannot read"):
        load_tokenizer(str(tmp_path))


# 2. UMT5 encoder against its eager formula -------------------------------------------------------

def _bucket_formula(rel, num_buckets=32, max_distance=128):
    """Mesh TensorFlow's bidirectional bucket for one int, with the log in float32 as transformers."""
    half = num_buckets // 2
    exact = half // 2
    sign = half if rel > 0 else 0
    d = abs(rel)
    if d < exact:
        return sign + d
    ratio = torch.log(torch.tensor(d / exact, dtype=torch.float32)) / math.log(max_distance / exact)
    return sign + min(exact + int(ratio * (half - exact)), half - 1)


def test_relative_position_buckets():
    rel = torch.arange(-600, 601)
    got = relative_position_bucket(rel, 32, 128).tolist()
    assert got == [_bucket_formula(r) for r in rel.tolist()]
    assert (got[600], got[601], got[599], got[0], got[-1]) == (0, 17, 1, 15, 31)


def _eager_umt5(w, cfg, ids, mask):
    """UMT5's encoder written from its math on the raw weights, rounding where transformers 4.57's
    eager path rounds: RMS norm with the mean of squares in fp32; scores q k^T; position bias plus
    the additive mask (dtype min) in the activation dtype, then added to the scores; softmax in fp32
    cast back; gated tanh-GELU FFN."""
    heads, d_kv, eps = cfg["num_heads"], cfg["d_kv"], 1e-6
    x = w["shared.weight"][ids]
    dtype = x.dtype
    length = ids.shape[1]
    additive = (1.0 - mask[:, None, None, :].to(dtype)) * torch.finfo(dtype).min

    def norm(h, g):
        h = h * torch.rsqrt(h.to(torch.float32).pow(2).mean(-1, keepdim=True) + eps)
        return g * (h.to(g.dtype) if g.dtype != torch.float32 else h)

    def split(h):  # [B, L, H*D] -> [B, H, L, D]
        return h.view(h.shape[0], length, heads, d_kv).transpose(1, 2)

    rel = torch.arange(length)[None, :] - torch.arange(length)[:, None]
    table = torch.tensor([[_bucket_formula(r) for r in row] for row in rel.tolist()])
    for i in range(cfg["num_layers"]):
        p = f"encoder.block.{i}.layer."
        h = norm(x, w[p + "0.layer_norm.weight"])
        q, k, v = (split(torch.nn.functional.linear(h, w[p + f"0.SelfAttention.{n}.weight"])) for n in "qkv")
        bias = w[p + "0.SelfAttention.relative_attention_bias.weight"][table].permute(2, 0, 1)[None]
        scores = torch.matmul(q, k.transpose(3, 2)) + (bias + additive)
        probs = torch.softmax(scores.float(), dim=-1).to(dtype)
        out = torch.matmul(probs, v).transpose(1, 2).reshape(x.shape[0], length, heads * d_kv)
        x = x + torch.nn.functional.linear(out, w[p + "0.SelfAttention.o.weight"])
        h = norm(x, w[p + "1.layer_norm.weight"])
        a = torch.nn.functional.linear(h, w[p + "1.DenseReluDense.wi_0.weight"])
        gelu = 0.5 * a * (1.0 + torch.tanh(math.sqrt(2.0 / math.pi) * (a + 0.044715 * torch.pow(a, 3.0))))
        x = x + torch.nn.functional.linear(gelu * torch.nn.functional.linear(h, w[p + "1.DenseReluDense.wi_1.weight"]),
                                           w[p + "1.DenseReluDense.wo.weight"])
    return norm(x, w["encoder.final_layer_norm.weight"])


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_umt5_matches_eager_formula_bit_for_bit(dtype):
    """fp32 bit-identical; bf16 identical too, since every rounding happens in the same order (SDPA
    with the bias as a mask, transformers 5's default, is ~1e-2 away in bf16)."""
    cfg = dict(TINY_UMT5, num_layers=3)
    model, weights = random_umt5(cfg, seed=1)
    model = model.to(dtype)
    w = {k: v.to(dtype) for k, v in weights.items()}
    gen = torch.Generator().manual_seed(2)
    ids = torch.randint(3, 512, (2, 97), generator=gen)
    mask = torch.zeros(2, 97, dtype=torch.long)
    mask[0, :23], mask[1, :97] = 1, 1
    with torch.no_grad():
        got = model(ids, mask).last_hidden_state
    want = _eager_umt5(w, cfg, ids, mask)
    diff = (got.float() - want.float()).abs()
    assert got.dtype == dtype and torch.equal(got, want), f"max {diff.max():.3g} mean {diff.mean():.3g}"


def test_umt5_against_transformers_eager():
    """Against transformers' own UMT5EncoderModel in eager mode, when installed: bit-identical under
    transformers 4.x (the reference's), within fp32 rounding under any version."""
    transformers = pytest.importorskip("transformers")
    model, weights = random_umt5(TINY_UMT5, seed=3)
    cfg = transformers.UMT5Config(**TINY_UMT5)
    cfg._attn_implementation = "eager"
    ref = transformers.UMT5EncoderModel(cfg).eval()
    ref.load_state_dict(weights, strict=False)
    ids = torch.randint(3, 512, (2, 61), generator=torch.Generator().manual_seed(4))
    mask = torch.ones(2, 61, dtype=torch.long)
    mask[1, 40:] = 0
    with torch.no_grad():
        got = model(ids, mask).last_hidden_state
        want = ref(input_ids=ids, attention_mask=mask).last_hidden_state
    if int(transformers.__version__.split(".")[0]) < 5:
        assert torch.equal(got, want)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


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
    with pytest.raises(MovaInputError, match="gated-gelu"):
        build_umt5_encoder(dict(TINY_UMT5, feed_forward_proj="relu"))


# 3. Prompt embeddings ----------------------------------------------------------------------------

def test_encode_zero_pads_and_matches_model(tokenizer_dirs, tiny_model):
    encoder = TextEncoder(load_tokenizer(tokenizer_dirs["always"]), tiny_model)
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


def test_encode_rejects_bad_prompts(tokenizer_dirs, tiny_model):
    encoder = TextEncoder(load_tokenizer(tokenizer_dirs["always"]), tiny_model)
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
