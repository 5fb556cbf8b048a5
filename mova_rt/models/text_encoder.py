"""UMT5 prompt encoder of MOVA, plus a tiny offline T5-style tokenizer for tests and presets.

Parity-critical points (each one changes the DiT's conditioning if missed):
- Prompts are cleaned exactly like MOVA: `ftfy.fix_text`, `html.unescape` twice, strip, then every
  whitespace run becomes one space and the result is stripped again.
- Tokenization pads to exactly `max_length` (512) with `<pad>`=0, truncates, and appends `</s>`=1;
  the attention mask marks the real tokens including `</s>`.
- The encoder runs in eval mode (UMT5 configs carry dropout_rate 0.1) with the attention mask.
- Rows past each prompt's token count are set to exact zeros: the DiT cross-attends to all 512
  positions without a mask, so padding rows must contribute zero keys/values, not encoder output.
- transformers 5 keeps `encoder.embed_tokens.weight` in `state_dict()` but ties it to
  `shared.weight` (same Parameter). Checkpoints only need `shared.weight`; after loading with
  `load_state_dict(assign=True)` call `tie_umt5_embeddings` so both names use one tensor again.
- `from_pretrained(dtype=bfloat16)` casts every UMT5 weight to bf16 (`_keep_in_fp32_modules=["wo"]`
  only applies to fp16), so a bf16 loader that casts everything matches the reference.
"""

import html
import json
import os
import re
import struct

import torch
from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, processors
from transformers import T5TokenizerFast, UMT5Config, UMT5EncoderModel

from mova_rt.errors import MovaInputError

_SPECIALS = ["<pad>", "</s>", "<unk>"]  # ids 0, 1, 2 as in T5/UMT5
_CAPITALIZED = "The A In An It He She They This There On As At With Two"
_SUFFIXES = "ing ed ly er es"
_WORDS = """
the a an and or but of in on at to from with by for as into over under through across along around
behind between above below near beside up down out off onto toward away back while then is are was
were be been has have had it its this that these those there here he she they his her their them
him we you i my your our who which what when where how not no very more most some all each every
other another one two three four five first last small large big little long short tall high low
wide narrow deep old young new bright dark light soft hard warm cold hot wet dry slow fast quick
quickly slowly gently gentle calm quiet loud beautiful happy sad serious smiling smile laughing
looking looks look walks walking walk runs running run stands standing stand sits sitting sit holds
holding hold moves moving move turns turning turn flying fly swimming swims falls falling dancing
dance speaks speaking talking talks says saying sings singing playing plays watching watches reaches
opens closes camera shot close view scene background foreground frame video film cinematic realistic
style lighting shadow shadows sun sunlight sunset sunrise sky cloud clouds rain snow wind water river
lake sea ocean wave waves beach sand forest tree trees grass flower flowers field mountain mountains
hill road street city town building house room window door wall floor table chair bed kitchen car
train boat plane bird birds dog dogs cat cats horse fish animal man woman men women boy girl child
children people person group crowd face eyes eye hair hand hands head arm arms body feet legs voice
sound music song audio noise speech color red blue green yellow white black gray orange purple pink
brown golden silver wooden glass metal stone fire smoke steam ice night day morning evening time
moment slight softly shows showing wearing wears dressed shirt dress jacket coat hat glasses phone
book cup coffee food bread guitar piano drum drums rises rising pan zoom tracking follows following
static motion blur focus depth natural studio indoor outdoor outside inside center left right top
bottom side middle edge corner distance distant nearby breeze leaves leaf branches rock rocks
waterfall desert snowy rainy foggy sunny cloudy stormy thunder lightning rainbow moon stars star neon
lights lamp candle fireplace streets market shop store cafe restaurant office school park garden
bridge tower castle church station airport highway traffic bus bike bicycle truck ship engine machine
robot computer screen television radio microphone speaker stage concert audience band singer dancer
actor player team game ball soccer basketball football tennis jumps jumping climbs climbing rides
riding drives driving pours pouring cooking cooks eating eats drinking drinks writing writes reading
reads painting paints drawing cutting throws throwing catches catching pushes pulls carries carrying
lifts picks puts places nods shakes points touches hugs kisses cries crying shouts shouting whispers
whispering breathing breath heart emotion expression mouth lips nose ears neck shoulder shoulders
fingers skin beard mask helmet uniform suit tie boots shoes jeans skirt scarf gloves bag box bottle
plate bowl knife spoon fork paper letter sign text words word tells asks answers replies listens
listening hears sounds footsteps applause laughter birdsong whistle bell bells clock ticking humming
buzzing crackling splashing rustling roaring barking chirping echo silence quietly loudly clearly
sharp smooth rough heavy thin thick full empty open closed broken clean dirty fresh ancient modern
futuristic vintage retro classic elegant simple detailed blurry hour shallow tone mood atmosphere
dramatic peaceful tense mysterious romantic playful energetic cheerful gloomy vibrant colorful cool
dim glowing shining sparkling reflecting reflection mirror surface texture pattern line lines shape
"""


def prompt_clean(text: str) -> str:
    """MOVA's prompt cleaning: fix mojibake, unescape HTML twice, collapse whitespace runs."""
    import ftfy  # only here: the benchmark builds the encoder on machines without ftfy

    text = html.unescape(html.unescape(ftfy.fix_text(text))).strip()
    return re.sub(r"\s+", " ", text).strip()


def build_umt5_encoder(config: dict, device="meta") -> UMT5EncoderModel:
    """Build an eval-mode `UMT5EncoderModel` from the dict in `text_encoder/config.json`.

    Parameters are created on `device` (meta: no memory, fill with `load_state_dict(assign=True)`).
    State-dict keys (i < num_layers; every UMT5 layer has its own relative position bias):
      shared.weight [vocab, d_model]; encoder.embed_tokens.weight (tied alias of shared.weight);
      encoder.block.{i}.layer.0.SelfAttention.{q,k,v}.weight [heads*d_kv, d_model],
      ...SelfAttention.o.weight [d_model, heads*d_kv],
      ...SelfAttention.relative_attention_bias.weight [num_buckets, heads],
      encoder.block.{i}.layer.0.layer_norm.weight [d_model],
      encoder.block.{i}.layer.1.DenseReluDense.{wi_0,wi_1}.weight [d_ff, d_model] (gated-gelu),
      encoder.block.{i}.layer.1.DenseReluDense.wo.weight [d_model, d_ff],
      encoder.block.{i}.layer.1.layer_norm.weight [d_model]; encoder.final_layer_norm.weight [d_model].
    No buffers.
    """
    cfg = UMT5Config(**config)
    with torch.device(device):
        model = UMT5EncoderModel(cfg)
    return model.eval()


def umt5_expected_keys(model: UMT5EncoderModel) -> set:
    """Keys a checkpoint must hold: the state-dict keys minus aliases of an already-listed tensor
    (i.e. without `encoder.embed_tokens.weight`, which transformers ties to `shared.weight`)."""
    seen, keys = set(), set()
    for name, tensor in model.state_dict(keep_vars=True).items():
        if id(tensor) not in seen:
            seen.add(id(tensor))
            keys.add(name)
    return keys


def tie_umt5_embeddings(model: UMT5EncoderModel) -> UMT5EncoderModel:
    """Make `encoder.embed_tokens` use the same Parameter as `shared` after assign-loading (which
    replaces `shared.weight` and leaves the alias on the old, e.g. meta, tensor)."""
    if model.shared.weight.is_meta and not model.encoder.embed_tokens.weight.is_meta:
        model.shared.weight = model.encoder.embed_tokens.weight
    model.encoder.embed_tokens.weight = model.shared.weight
    return model


class TextEncoder:
    """Tokenizer + UMT5 encoder producing MOVA's zero-padded prompt embeddings."""

    def __init__(self, tokenizer, model: UMT5EncoderModel, max_length: int = 512):
        self.tokenizer = tokenizer
        self.model = model.eval()
        self.max_length = max_length

    def tokenize(self, prompts: list) -> tuple:
        """Clean and tokenize. Returns (input_ids, attention_mask), both int64 [B, max_length] on CPU."""
        if isinstance(prompts, str) or not prompts or not all(isinstance(p, str) for p in prompts):
            raise MovaInputError(
                "prompts must be a non-empty list of strings; wrap a single prompt in a list"
            )
        batch = self.tokenizer(
            [prompt_clean(p) for p in prompts], padding="max_length", max_length=self.max_length,
            truncation=True, add_special_tokens=True, return_attention_mask=True, return_tensors="pt",
        )
        return batch.input_ids, batch.attention_mask

    @torch.no_grad()
    def encode(self, prompts: list, device, dtype) -> torch.Tensor:
        """Encode prompts to [B, max_length, d_model] in `dtype` on `device` (where the model must live).

        Row j of prompt b is the encoder output if j < mask[b].sum() (tokens + `</s>`), else exactly 0.
        """
        input_ids, mask = self.tokenize(prompts)
        input_ids, mask = input_ids.to(device), mask.to(device)
        hidden = self.model(input_ids, mask).last_hidden_state.to(device=device, dtype=dtype)
        seq_lens = mask.gt(0).sum(dim=1)
        keep = torch.arange(hidden.shape[1], device=device)[None, :] < seq_lens[:, None]
        return torch.where(keep[:, :, None], hidden, torch.zeros((), device=device, dtype=dtype))


def load_tokenizer(folder: str) -> T5TokenizerFast:
    """Load the checkpoint's `tokenizer/` folder (tokenizer.json or spiece.model) offline."""
    if not os.path.isdir(folder):
        raise MovaInputError(
            f"tokenizer folder {folder} does not exist; pass a MOVA checkpoint that has tokenizer/"
        )
    if not any(os.path.isfile(os.path.join(folder, f)) for f in ("tokenizer.json", "spiece.model")):
        raise MovaInputError(
            f"{folder} has no tokenizer.json or spiece.model; re-download the checkpoint's tokenizer/"
        )
    try:
        tokenizer = T5TokenizerFast.from_pretrained(folder, local_files_only=True)
    except Exception as exc:
        reason = (str(exc).strip().splitlines() or [""])[0]
        raise MovaInputError(
            f"cannot read the tokenizer in {folder} ({type(exc).__name__}: {reason}); re-download tokenizer/"
        ) from exc
    if tokenizer.pad_token_id is None or tokenizer.eos_token_id is None:
        raise MovaInputError(f"tokenizer in {folder} lacks <pad> or </s>; use the checkpoint's T5 tokenizer/")
    return tokenizer


def _tiny_vocab(vocab_size: int) -> list:
    """(piece, score) list: specials, "▁", printable ASCII chars, suffixes, words, then "▁xy" fillers.

    Scores are exact in float32 so tokenizer.json and spiece.model agree bit for bit.
    """
    base = [(s, 0.0) for s in _SPECIALS] + [("▁", -3.0)] + [(chr(c), -10.0) for c in range(33, 127)]
    words = _SUFFIXES.split() + ["▁" + w for w in _CAPITALIZED.split() + _WORDS.split()]
    letters = "abcdefghijklmnopqrstuvwxyz"
    fillers = ["▁" + a + b for a in letters for b in letters]
    extra, seen = [], {p for p, _ in base}
    for piece in words + fillers:
        if piece not in seen:
            seen.add(piece)
            extra.append((piece, -12.0 if piece in fillers else -5.0 - len(extra) / 64))
    if not len(base) <= vocab_size <= len(base) + len(extra):
        raise MovaInputError(
            f"tiny tokenizer vocab_size {vocab_size} is out of range; "
            f"use {len(base)}..{len(base) + len(extra)}"
        )
    return base + extra[: vocab_size - len(base)]


def _pb(field: int, value) -> bytes:
    """One protobuf field: bytes/str -> length-delimited, float -> fixed32, int/bool -> varint."""

    def varint(n: int) -> bytes:
        n &= (1 << 64) - 1
        out = bytearray()
        while n > 0x7F:
            out.append(n & 0x7F | 0x80)
            n >>= 7
        return bytes(out + bytes([n]))

    if isinstance(value, str):
        value = value.encode("utf-8")
    if isinstance(value, bytes):
        return varint(field << 3 | 2) + varint(len(value)) + value
    if isinstance(value, float):
        return varint(field << 3 | 5) + struct.pack("<f", value)
    return varint(field << 3) + varint(int(value))


def _spiece_model(vocab: list) -> bytes:
    """Serialize a SentencePiece Unigram ModelProto (pad=0, eos=1, unk=2, no bos) for `vocab`."""
    kinds = {"<pad>": 3, "</s>": 3, "<unk>": 2}  # CONTROL, CONTROL, UNKNOWN; others NORMAL=1
    pieces = b"".join(_pb(1, _pb(1, p) + _pb(2, s) + _pb(3, kinds.get(p, 1))) for p, s in vocab)
    trainer = _pb(3, 1) + _pb(4, len(vocab)) + _pb(40, 2) + _pb(41, -1) + _pb(42, 1) + _pb(43, 0)
    normalizer = _pb(1, "identity") + _pb(3, True) + _pb(4, True) + _pb(5, True)
    return pieces + _pb(2, trainer) + _pb(3, normalizer)


def write_tiny_tokenizer(folder: str, vocab_size: int) -> None:
    """Write a deterministic T5-style Unigram tokenizer with exactly `vocab_size` pieces to `folder`.

    Files: tokenizer.json, tokenizer_config.json, special_tokens_map.json, spiece.model (same layout
    as an official T5/UMT5 `tokenizer/` folder). `<pad>`=0, `</s>`=1, `<unk>`=2; no `<extra_id_*>`
    sentinels (extra_ids=0; MOVA never uses them). Whitespace split + Metaspace "▁" (prepended to
    every word), `</s>` appended, unknown characters (e.g. Chinese) map to `<unk>`; model_max_length 512.
    """
    vocab = _tiny_vocab(vocab_size)
    tok = Tokenizer(models.Unigram(vocab, unk_id=2, byte_fallback=False))
    metaspace = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="always")
    tok.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.WhitespaceSplit(), metaspace])
    tok.decoder = decoders.Metaspace(replacement="▁", prepend_scheme="always")
    tok.post_processor = processors.TemplateProcessing(
        single=["$A", "</s>"], pair=["$A", "</s>", "$B", "</s>"], special_tokens=[("</s>", 1)]
    )
    tok.add_special_tokens([AddedToken(s, special=True, normalized=False) for s in _SPECIALS])
    specials = {"pad_token": "<pad>", "eos_token": "</s>", "unk_token": "<unk>"}
    added = {
        str(i): {"content": s, "lstrip": False, "normalized": False, "rstrip": False, "single_word": False,
                 "special": True}
        for i, s in enumerate(_SPECIALS)
    }
    config = dict(specials, added_tokens_decoder=added, clean_up_tokenization_spaces=False, extra_ids=0,
                  model_max_length=512, tokenizer_class="T5Tokenizer")
    os.makedirs(folder, exist_ok=True)
    texts = {
        "tokenizer.json": tok.to_str(pretty=True) + "\n",
        "tokenizer_config.json": json.dumps(config, indent=2, sort_keys=True) + "\n",
        "special_tokens_map.json": json.dumps(specials, indent=2, sort_keys=True) + "\n",
    }
    for name, text in texts.items():
        with open(os.path.join(folder, name), "w", encoding="utf-8", newline="\n") as f:
            f.write(text)
    with open(os.path.join(folder, "spiece.model"), "wb") as f:
        f.write(_spiece_model(vocab))
