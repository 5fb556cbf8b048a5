"""Tiny offline T5-style tokenizers for `mova-rt make-checkpoint` and the tests.

`write_tiny_tokenizer(folder, vocab_size, style)` writes an official-looking `tokenizer/` folder
(tokenizer.json, tokenizer_config.json, special_tokens_map.json and, where SentencePiece can say
the same thing, spiece.model) with exactly `vocab_size` ids. Styles:

- "always" (the default): `<pad>`=0, `</s>`=1, `<unk>`=2; WhitespaceSplit, then Metaspace
  prepend_scheme "always" ("▁" before every word); `</s>` appended. Files byte-identical to
  those make-checkpoint wrote before styles existed.
- "first", "never": the same vocabulary with Metaspace prepend_scheme "first" ("▁" only before
  the first word) or "never". SentencePiece has no such setting, so no spiece.model is written.
  transformers 5's T5TokenizerFast overrides these with "always" (an extra leading "▁" token).
- "umt5-xxl": the settings of the real umt5-xxl tokenizer as transformers' T5 converter writes
  them: normalizer Precompiled(SentencePiece nmt_nfkc) + Replace(" {2,}" -> " "), one Metaspace
  pre-tokenizer (prepend_scheme "always", split), `<pad>`=0 `</s>`=1 `<s>`=2 `<unk>`=3, the 256
  byte pieces with byte_fallback, and `<extra_id_*>` special tokens at the top of the vocabulary
  (`<extra_id_0>` last), legacy=True.

Scores are exact in float32 so tokenizer.json and spiece.model agree bit for bit.
"""

import functools
import io
import json
import os
import struct

from mova_rt.errors import MovaInputError

TOKENIZER_STYLES = ("always", "first", "never", "umt5-xxl")
_T5_SPECIALS = ["<pad>", "</s>", "<unk>"]  # ids 0, 1, 2
_UMT5_SPECIALS = ["<pad>", "</s>", "<s>", "<unk>"]  # ids 0, 1, 2, 3 as in umt5-xxl
_UMT5_EXTRA_IDS = 8  # umt5-xxl has 300 `<extra_id_*>`; MOVA never uses them
_UMT5_MAX_LENGTH = 1000000000000000019884624838656  # umt5-xxl's tokenizer_config (no limit)
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

def _word_pieces() -> list:
    """Suffixes, "▁"-words, then "▁xy" fillers: the vocabulary after the specials and characters."""
    words = _SUFFIXES.split() + ["▁" + w for w in _CAPITALIZED.split() + _WORDS.split()]
    letters = "abcdefghijklmnopqrstuvwxyz"
    fillers = ["▁" + a + b for a in letters for b in letters]
    return words, fillers


def _tiny_vocab(vocab_size: int, base: list) -> list:
    """(piece, score) list of exactly `vocab_size` pieces: `base`, then words and fillers."""
    words, fillers = _word_pieces()
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


def _t5_base() -> list:
    """Specials, "▁", then the printable ASCII characters (the "always"/"first"/"never" layout)."""
    return [(s, 0.0) for s in _T5_SPECIALS] + [("▁", -3.0)] + [(chr(c), -10.0) for c in range(33, 127)]


def _umt5_base() -> list:
    """umt5-xxl's layout: 4 specials, the 256 byte pieces, "▁", printable ASCII characters."""
    return ([(s, 0.0) for s in _UMT5_SPECIALS] + [(f"<0x{b:02X}>", 0.0) for b in range(256)]
            + [("▁", -3.0)] + [(chr(c), -10.0) for c in range(33, 127)])


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


def _pb_bytes(buf: bytes, field: int) -> bytes:
    """The first length-delimited `field` of a serialized protobuf message (b"" if absent)."""
    pos = 0

    def varint():
        nonlocal pos
        n = shift = 0
        while True:
            byte = buf[pos]
            pos += 1
            n |= (byte & 0x7F) << shift
            shift += 7
            if byte < 0x80:
                return n

    while pos < len(buf):
        key = varint()
        kind = key & 7
        if kind == 0:
            varint()
        elif kind == 1:
            pos += 8
        elif kind == 5:
            pos += 4
        elif kind == 2:
            n = varint()
            if key >> 3 == field:
                return buf[pos:pos + n]
            pos += n
        else:
            raise ValueError(f"unsupported protobuf wire type {kind}")
    return b""


@functools.lru_cache(maxsize=1)
def _nmt_nfkc_charsmap() -> bytes:
    """SentencePiece's built-in nmt_nfkc normalization table (what umt5-xxl's spiece.model and
    tokenizer.json carry), taken from a throwaway 12-piece model trained in memory."""
    import sentencepiece

    model = io.BytesIO()
    sentencepiece.SentencePieceTrainer.train(
        sentence_iterator=iter(["a b c d e f g h"] * 8), model_writer=model, vocab_size=12,
        model_type="char", normalization_rule_name="nmt_nfkc", minloglevel=3)
    # ModelProto.normalizer_spec (3) -> NormalizerSpec.precompiled_charsmap (2)
    return _pb_bytes(_pb_bytes(model.getvalue(), 3), 2)


def _spiece_model(vocab: list, umt5: bool) -> bytes:
    """Serialize a SentencePiece Unigram ModelProto for `vocab` (T5: pad=0 eos=1 unk=2, no bos;
    umt5: pad=0 eos=1 bos=2 unk=3, byte pieces and byte_fallback, nmt_nfkc normalizer)."""
    kinds = {"<pad>": 3, "</s>": 3, "<s>": 3, "<unk>": 2}  # CONTROL, UNKNOWN; others NORMAL=1
    byte_kind = 6  # BYTE

    def kind(piece):
        return byte_kind if umt5 and piece.startswith("<0x") else kinds.get(piece, 1)

    pieces = b"".join(_pb(1, _pb(1, p) + _pb(2, s) + _pb(3, kind(p))) for p, s in vocab)
    if umt5:
        trainer = (_pb(3, 1) + _pb(4, len(vocab)) + _pb(35, True) + _pb(40, 3) + _pb(41, 2)
                   + _pb(42, 1) + _pb(43, 0))
        normalizer = (_pb(1, "nmt_nfkc") + _pb(2, _nmt_nfkc_charsmap()) + _pb(3, True)
                      + _pb(4, True) + _pb(5, True))
    else:
        trainer = _pb(3, 1) + _pb(4, len(vocab)) + _pb(40, 2) + _pb(41, -1) + _pb(42, 1) + _pb(43, 0)
        normalizer = _pb(1, "identity") + _pb(3, True) + _pb(4, True) + _pb(5, True)
    return pieces + _pb(2, trainer) + _pb(3, normalizer)


def _added(tokens: dict) -> dict:
    return {str(i): {"content": s, "lstrip": False, "normalized": False, "rstrip": False,
                     "single_word": False, "special": True} for i, s in tokens.items()}


def _build(vocab_size: int, style: str):
    """(tokenizers.Tokenizer, tokenizer_config dict, special_tokens_map dict, spiece bytes | None)."""
    from tokenizers import (AddedToken, Regex, Tokenizer, decoders, models, normalizers,
                            pre_tokenizers, processors)

    specials = {"pad_token": "<pad>", "eos_token": "</s>", "unk_token": "<unk>"}
    post = processors.TemplateProcessing(
        single=["$A", "</s>"], pair=["$A", "</s>", "$B", "</s>"], special_tokens=[("</s>", 1)])
    if style != "umt5-xxl":
        vocab = _tiny_vocab(vocab_size, _t5_base())
        tok = Tokenizer(models.Unigram(vocab, unk_id=2, byte_fallback=False))
        metaspace = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme=style)
        tok.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.WhitespaceSplit(), metaspace])
        tok.decoder = decoders.Metaspace(replacement="▁", prepend_scheme=style)
        tok.post_processor = post
        tok.add_special_tokens([AddedToken(s, special=True, normalized=False) for s in _T5_SPECIALS])
        config = dict(specials, added_tokens_decoder=_added(dict(enumerate(_T5_SPECIALS))),
                      clean_up_tokenization_spaces=False, extra_ids=0, model_max_length=512,
                      tokenizer_class="T5Tokenizer")
        return tok, config, specials, _spiece_model(vocab, umt5=False) if style == "always" else None

    n_pieces = vocab_size - _UMT5_EXTRA_IDS
    vocab = _tiny_vocab(n_pieces, _umt5_base())
    tok = Tokenizer(models.Unigram(vocab, unk_id=3, byte_fallback=True))
    tok.normalizer = normalizers.Sequence([
        normalizers.Precompiled(_nmt_nfkc_charsmap()), normalizers.Replace(Regex(" {2,}"), " ")])
    tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="always", split=True)
    tok.decoder = decoders.Metaspace(replacement="▁", prepend_scheme="always", split=True)
    tok.post_processor = post
    extras = [f"<extra_id_{i}>" for i in range(_UMT5_EXTRA_IDS - 1, -1, -1)]  # id order
    tok.add_special_tokens([AddedToken(s, special=True, normalized=False)
                            for s in _UMT5_SPECIALS + extras])
    added = dict(enumerate(_UMT5_SPECIALS)) | {n_pieces + i: s for i, s in enumerate(extras)}
    specials = dict(specials, bos_token="<s>",
                    additional_special_tokens=[f"<extra_id_{i}>" for i in range(_UMT5_EXTRA_IDS)])
    config = dict(specials, added_tokens_decoder=_added(added), clean_up_tokenization_spaces=True,
                  extra_ids=_UMT5_EXTRA_IDS, legacy=True, model_max_length=_UMT5_MAX_LENGTH,
                  sp_model_kwargs={}, spaces_between_special_tokens=False,
                  tokenizer_class="T5Tokenizer")
    return tok, config, specials, _spiece_model(vocab, umt5=True)


def write_tiny_tokenizer(folder: str, vocab_size: int, style: str = "always") -> None:
    """Write a deterministic T5-style Unigram tokenizer with exactly `vocab_size` ids to `folder`
    (same file layout as an official T5/UMT5 `tokenizer/` folder); see the module doc for `style`.
    Unknown characters (e.g. Chinese) map to `<unk>` (umt5-xxl: to byte pieces)."""
    if style not in TOKENIZER_STYLES:
        raise MovaInputError(f"unknown tokenizer style {style!r}; use one of {', '.join(TOKENIZER_STYLES)}")
    tok, config, specials, spiece = _build(vocab_size, style)
    os.makedirs(folder, exist_ok=True)
    texts = {
        "tokenizer.json": tok.to_str(pretty=True) + "\n",
        "tokenizer_config.json": json.dumps(config, indent=2, sort_keys=True) + "\n",
        "special_tokens_map.json": json.dumps(specials, indent=2, sort_keys=True) + "\n",
    }
    for name, text in texts.items():
        with open(os.path.join(folder, name), "w", encoding="utf-8", newline="\n") as f:
            f.write(text)
    if spiece is not None:
        with open(os.path.join(folder, "spiece.model"), "wb") as f:
            f.write(spiece)
