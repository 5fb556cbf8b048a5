"""The UMT5 prompt encoder of MOVA and its tokenizer, computed as the reference computes them
(OpenMOSS/MOVA with transformers 4.57: `T5TokenizerFast` + `UMT5EncoderModel`, eager attention),
whatever transformers version is installed: mova-rt does not use transformers for either.

Parity-critical points (each one changes the DiT's conditioning if missed):
- Prompts are cleaned exactly like MOVA: `ftfy.fix_text`, `html.unescape` twice, strip, then every
  whitespace run becomes one space and the result is stripped again.
- The tokenizer is the checkpoint's `tokenizer.json` read by the `tokenizers` library as written
  (normalizer, pre-tokenizer, post-processor, added tokens). transformers 5's `T5TokenizerFast`
  replaces the normalizer and pre-tokenizer with a fixed Metaspace(prepend_scheme="always"), which
  adds a leading "▁" token when the file says "never" or "first"; transformers 4 does not.
- The reference's call: pad to exactly `max_length` (512) on the right with the pad token, truncate
  on the right keeping room for the post-processor's `</s>`, add special tokens; the attention mask
  marks the real tokens including `</s>`.
- UMT5 attention is the eager formula: scores = q k^T (no 1/sqrt(d) scale, as in T5), plus the
  layer's relative position bias plus the additive padding mask (both in the activation dtype),
  softmax in fp32 and cast back, then the values. transformers 5 runs SDPA with the bias as a mask
  instead: ~5e-7 apart in fp32, ~1e-2 in bf16.
- Rows past each prompt's token count are set to exact zeros: the DiT cross-attends to all 512
  positions without a mask, so padding rows must contribute zero keys/values, not encoder output.
- `shared` and `encoder.embed_tokens` are one module (transformers ties them): checkpoints store only
  `shared.weight`.
- `from_pretrained(dtype=bfloat16)` casts every UMT5 weight to bf16 (`_keep_in_fp32_modules=["wo"]`
  only applies to fp16), so a bf16 loader that casts everything matches the reference.
"""

from __future__ import annotations

import html
import json
import math
import os
import re
from dataclasses import dataclass
from typing import NamedTuple

import torch
import torch.nn as nn
import torch.nn.functional as F

from mova_rt.errors import MovaInputError


def prompt_clean(text: str) -> str:
    """MOVA's prompt cleaning: fix mojibake, unescape HTML twice, collapse whitespace runs."""
    import ftfy  # only here: the benchmark builds the encoder on machines without ftfy

    text = html.unescape(html.unescape(ftfy.fix_text(text))).strip()
    return re.sub(r"\s+", " ", text).strip()


# 1. Tokenizer ------------------------------------------------------------------------------------

class PromptTokenizer:
    """The checkpoint's tokenizer.json as the `tokenizers` library reads it, called the way the
    reference calls `T5TokenizerFast` (padding="max_length", truncation=True,
    add_special_tokens=True, return_attention_mask=True)."""

    def __init__(self, tokenizer, pad_token: str):
        self.tokenizer = tokenizer  # tokenizers.Tokenizer
        self.pad_token = pad_token
        self.pad_id = tokenizer.token_to_id(pad_token)

    def __call__(self, texts: list, max_length: int) -> tuple:
        """texts -> (input_ids, attention_mask), int64 [B, max_length] on the CPU."""
        tok = self.tokenizer
        # What transformers' fast tokenizer sets on its backend for this call (right-side
        # truncation that keeps room for the post-processor's tokens; right padding to exactly
        # max_length with the pad token and type id 0).
        tok.enable_truncation(max_length=max_length, stride=0, strategy="longest_first",
                              direction="right")
        tok.enable_padding(direction="right", pad_id=self.pad_id, pad_type_id=0,
                           pad_token=self.pad_token, length=max_length)
        encodings = tok.encode_batch(list(texts), add_special_tokens=True)
        ids = torch.tensor([e.ids for e in encodings], dtype=torch.long)
        mask = torch.tensor([e.attention_mask for e in encodings], dtype=torch.long)
        return ids, mask


def _pad_token(folder: str) -> str:
    """The pad token as transformers resolves it: tokenizer_config.json, then
    special_tokens_map.json, then T5's default `<pad>` (each either a string or an AddedToken dict)."""
    for name in ("tokenizer_config.json", "special_tokens_map.json"):
        path = os.path.join(folder, name)
        if not os.path.isfile(path):
            continue
        try:
            with open(path, encoding="utf-8") as fh:
                value = json.load(fh).get("pad_token")
        except (OSError, ValueError, AttributeError) as exc:
            raise MovaInputError(f"cannot read {path} ({exc}); re-download the checkpoint's tokenizer/") from exc
        if isinstance(value, dict):
            value = value.get("content")
        if isinstance(value, str) and value:
            return value
    return "<pad>"


def load_tokenizer(folder: str) -> PromptTokenizer:
    """Load the checkpoint's `tokenizer/tokenizer.json` offline, exactly as written.

    A folder with only spiece.model is refused: turning it into a fast tokenizer is transformers'
    converter's job, and its output has changed between versions (the class of drift this module
    avoids). Official MOVA checkpoints ship tokenizer.json. Tokens listed only in
    tokenizer_config.json (transformers 4 would add them) are not added: folders written by
    transformers' save_pretrained hold them in tokenizer.json too."""
    from tokenizers import Tokenizer

    if not os.path.isdir(folder):
        raise MovaInputError(
            f"tokenizer folder {folder} does not exist; pass a MOVA checkpoint that has tokenizer/"
        )
    path = os.path.join(folder, "tokenizer.json")
    if not os.path.isfile(path):
        raise MovaInputError(
            f"{folder} has no tokenizer.json; re-download the checkpoint's tokenizer/ "
            "(mova-rt reads tokenizer.json, not spiece.model alone)"
        )
    try:
        tokenizer = Tokenizer.from_file(path)
    except Exception as exc:  # the tokenizers library raises its own exception types
        reason = (str(exc).strip().splitlines() or [""])[0]
        raise MovaInputError(
            f"cannot read the tokenizer in {folder} ({type(exc).__name__}: {reason}); re-download tokenizer/"
        ) from exc
    pad = _pad_token(folder)
    if tokenizer.token_to_id(pad) is None or tokenizer.token_to_id("</s>") is None:
        raise MovaInputError(f"tokenizer in {folder} lacks {pad} or </s>; use the checkpoint's T5 tokenizer/")
    return PromptTokenizer(tokenizer, pad)


# 2. UMT5 encoder ---------------------------------------------------------------------------------

@dataclass(frozen=True)
class UMT5Settings:
    """The fields of text_encoder/config.json the encoder reads; defaults are transformers'
    UMT5Config defaults (what the reference gets for a missing field)."""

    vocab_size: int = 250112
    d_model: int = 512
    d_kv: int = 64
    d_ff: int = 1024
    num_layers: int = 8
    num_heads: int = 6
    relative_attention_num_buckets: int = 32
    relative_attention_max_distance: int = 128
    layer_norm_epsilon: float = 1e-6
    feed_forward_proj: str = "gated-gelu"

    @classmethod
    def from_config(cls, config: dict) -> "UMT5Settings":
        known = {k: config[k] for k in cls.__dataclass_fields__ if k in config}
        out = cls(**known)
        if out.feed_forward_proj != "gated-gelu":
            raise MovaInputError(
                f"text_encoder/config.json has feed_forward_proj={out.feed_forward_proj!r}; MOVA's "
                "UMT5 uses 'gated-gelu' (mova-rt implements only that): use the checkpoint's config"
            )
        return out


class UMT5Norm(nn.Module):
    """T5's RMS norm: the mean of squares in fp32, x * rsqrt(ms + eps) (fp32 for a half input),
    rounded to a half weight's dtype, then times the weight. No mean, no bias."""

    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.empty(dim))
        self.eps = eps

    def forward(self, x):
        variance = x.to(torch.float32).pow(2).mean(-1, keepdim=True)
        x = x * torch.rsqrt(variance + self.eps)
        if self.weight.dtype in (torch.float16, torch.bfloat16):
            x = x.to(self.weight.dtype)
        return self.weight * x


def relative_position_bucket(relative_position, num_buckets: int, max_distance: int):
    """Bidirectional T5 buckets of `relative_position` (key - query, int64): half the buckets for
    each sign; within a half, exact buckets below num_buckets/4 and log-spaced ones up to
    max_distance (the float32 log rounded toward zero, as Mesh TensorFlow and transformers do)."""
    num_buckets //= 2
    buckets = (relative_position > 0).to(torch.long) * num_buckets
    distance = torch.abs(relative_position)
    max_exact = num_buckets // 2
    is_small = distance < max_exact
    log_ratio = torch.log(distance.float() / max_exact) / math.log(max_distance / max_exact)
    large = max_exact + (log_ratio * (num_buckets - max_exact)).to(torch.long)
    large = torch.clamp(large, max=num_buckets - 1)
    return buckets + torch.where(is_small, distance, large)


class UMT5Attention(nn.Module):
    """Self-attention with a per-layer relative position bias, computed eagerly (module doc)."""

    def __init__(self, s: UMT5Settings):
        super().__init__()
        inner = s.num_heads * s.d_kv
        self.heads, self.head_dim = s.num_heads, s.d_kv
        self.num_buckets = s.relative_attention_num_buckets
        self.max_distance = s.relative_attention_max_distance
        self.q = nn.Linear(s.d_model, inner, bias=False)
        self.k = nn.Linear(s.d_model, inner, bias=False)
        self.v = nn.Linear(s.d_model, inner, bias=False)
        self.o = nn.Linear(inner, s.d_model, bias=False)
        self.relative_attention_bias = nn.Embedding(self.num_buckets, s.num_heads)

    def position_bias(self, length: int, device) -> torch.Tensor:
        """[1, H, L, L] in the bias table's dtype: bias[h, i, j] = table[bucket(j - i), h]."""
        query = torch.arange(length, dtype=torch.long, device=device)[:, None]
        key = torch.arange(length, dtype=torch.long, device=device)[None, :]
        bucket = relative_position_bucket(key - query, self.num_buckets, self.max_distance)
        return self.relative_attention_bias(bucket).permute([2, 0, 1]).unsqueeze(0)

    def forward(self, x, mask_bias):
        """x [B, L, C]; mask_bias [B, 1, 1, L] additive (0 or the dtype's min) -> [B, L, C]."""
        b, length = x.shape[:2]
        q = self.q(x).view(b, -1, self.heads, self.head_dim).transpose(1, 2)  # [B, H, L, D]
        k = self.k(x).view(b, -1, self.heads, self.head_dim).transpose(1, 2)  # [B, H, L, D]
        v = self.v(x).view(b, -1, self.heads, self.head_dim).transpose(1, 2)  # [B, H, L, D]
        scores = torch.matmul(q, k.transpose(3, 2))                            # [B, H, L, L]
        # bias + mask first, then added to the scores: two roundings in a half dtype, in this order
        scores = scores + (self.position_bias(length, scores.device) + mask_bias)
        weights = F.softmax(scores.float(), dim=-1).type_as(scores)  # softmax in fp32, cast back
        out = torch.matmul(weights, v)                                         # [B, H, L, D]
        out = out.transpose(1, 2).contiguous().view(b, length, -1)             # [B, L, H*D]
        return self.o(out)


def gelu_tanh(x):
    """GELU, tanh approximation, written as transformers' "gelu_new" computes it (the rounding
    order differs from F.gelu(approximate="tanh"))."""
    return 0.5 * x * (1.0 + torch.tanh(math.sqrt(2.0 / math.pi) * (x + 0.044715 * torch.pow(x, 3.0))))


class UMT5GatedFFN(nn.Module):
    """wo(gelu_tanh(wi_0 x) * wi_1 x); the product cast to wo's dtype if it differs."""

    def __init__(self, s: UMT5Settings):
        super().__init__()
        self.wi_0 = nn.Linear(s.d_model, s.d_ff, bias=False)
        self.wi_1 = nn.Linear(s.d_model, s.d_ff, bias=False)
        self.wo = nn.Linear(s.d_ff, s.d_model, bias=False)

    def forward(self, x):
        h = gelu_tanh(self.wi_0(x)) * self.wi_1(x)                              # [B, L, d_ff]
        if h.dtype != self.wo.weight.dtype and self.wo.weight.dtype.is_floating_point:
            h = h.to(self.wo.weight.dtype)
        return self.wo(h)


class UMT5AttentionLayer(nn.Module):
    def __init__(self, s: UMT5Settings):
        super().__init__()
        self.SelfAttention = UMT5Attention(s)
        self.layer_norm = UMT5Norm(s.d_model, s.layer_norm_epsilon)

    def forward(self, x, mask_bias):
        return x + self.SelfAttention(self.layer_norm(x), mask_bias)


class UMT5FFLayer(nn.Module):
    def __init__(self, s: UMT5Settings):
        super().__init__()
        self.DenseReluDense = UMT5GatedFFN(s)
        self.layer_norm = UMT5Norm(s.d_model, s.layer_norm_epsilon)

    def forward(self, x):
        return x + self.DenseReluDense(self.layer_norm(x))


class UMT5Block(nn.Module):
    """Pre-norm residual self-attention, then pre-norm residual gated FFN (`layer.0`, `layer.1`).
    transformers' fp16 inf-clamping is left out: mova-rt runs the encoder in fp32 or bf16."""

    def __init__(self, s: UMT5Settings):
        super().__init__()
        self.layer = nn.ModuleList([UMT5AttentionLayer(s), UMT5FFLayer(s)])

    def forward(self, x, mask_bias):
        return self.layer[1](self.layer[0](x, mask_bias))


class UMT5Stack(nn.Module):
    def __init__(self, s: UMT5Settings, embed_tokens: nn.Embedding):
        super().__init__()
        self.embed_tokens = embed_tokens
        self.block = nn.ModuleList([UMT5Block(s) for _ in range(s.num_layers)])
        self.final_layer_norm = UMT5Norm(s.d_model, s.layer_norm_epsilon)

    def forward(self, input_ids, attention_mask):
        x = self.embed_tokens(input_ids)                                        # [B, L, C]
        # Additive padding mask in the activation dtype: 0 for tokens, the dtype's min for padding.
        keep = attention_mask[:, None, None, :].to(dtype=x.dtype)               # [B, 1, 1, L]
        mask_bias = (1.0 - keep) * torch.finfo(x.dtype).min
        for block in self.block:
            x = block(x, mask_bias)
        return self.final_layer_norm(x)


class UMT5Output(NamedTuple):
    last_hidden_state: torch.Tensor  # [B, L, d_model]


class UMT5Encoder(nn.Module):
    """MOVA's UMT5 text encoder, with transformers' UMT5EncoderModel module names (so checkpoint
    keys load unchanged) and no dropout (inference only)."""

    def __init__(self, s: UMT5Settings):
        super().__init__()
        self.settings = s
        self.shared = nn.Embedding(s.vocab_size, s.d_model)
        self.encoder = UMT5Stack(s, self.shared)

    def forward(self, input_ids, attention_mask) -> UMT5Output:
        """input_ids, attention_mask int [B, L] -> UMT5Output(last_hidden_state [B, L, d_model])."""
        return UMT5Output(self.encoder(input_ids, attention_mask))


def build_umt5_encoder(config: dict, device="meta") -> UMT5Encoder:
    """Build an eval-mode `UMT5Encoder` from the dict in `text_encoder/config.json`.

    Parameters are created on `device` (meta: no memory, fill with `load_state_dict(assign=True)`).
    State-dict keys (i < num_layers; every UMT5 layer has its own relative position bias):
      shared.weight [vocab, d_model]; encoder.embed_tokens.weight (the same tensor);
      encoder.block.{i}.layer.0.SelfAttention.{q,k,v}.weight [heads*d_kv, d_model],
      ...SelfAttention.o.weight [d_model, heads*d_kv],
      ...SelfAttention.relative_attention_bias.weight [num_buckets, heads],
      encoder.block.{i}.layer.0.layer_norm.weight [d_model],
      encoder.block.{i}.layer.1.DenseReluDense.{wi_0,wi_1}.weight [d_ff, d_model] (gated-gelu),
      encoder.block.{i}.layer.1.DenseReluDense.wo.weight [d_model, d_ff],
      encoder.block.{i}.layer.1.layer_norm.weight [d_model]; encoder.final_layer_norm.weight [d_model].
    No buffers.
    """
    settings = UMT5Settings.from_config(config)
    with torch.device(device):
        model = UMT5Encoder(settings)
    return model.eval()


def umt5_expected_keys(model: UMT5Encoder) -> set:
    """Keys a checkpoint must hold: the state-dict keys minus aliases of an already-listed tensor
    (i.e. without `encoder.embed_tokens.weight`, the same tensor as `shared.weight`)."""
    seen, keys = set(), set()
    for name, tensor in model.state_dict(keep_vars=True).items():
        if id(tensor) not in seen:
            seen.add(id(tensor))
            keys.add(name)
    return keys


def tie_umt5_embeddings(model: UMT5Encoder) -> UMT5Encoder:
    """Make `encoder.embed_tokens` the `shared` module again (a loader `finalize` hook; a no-op
    unless something replaced one of them)."""
    model.encoder.embed_tokens = model.shared
    return model


# 3. Prompt embeddings ----------------------------------------------------------------------------

class TextEncoder:
    """Tokenizer + UMT5 encoder producing MOVA's zero-padded prompt embeddings."""

    def __init__(self, tokenizer: PromptTokenizer, model: UMT5Encoder, max_length: int = 512):
        self.tokenizer = tokenizer
        self.model = model.eval()
        self.max_length = max_length

    def tokenize(self, prompts: list) -> tuple:
        """Clean and tokenize. Returns (input_ids, attention_mask), both int64 [B, max_length] on CPU."""
        if isinstance(prompts, str) or not prompts or not all(isinstance(p, str) for p in prompts):
            raise MovaInputError(
                "prompts must be a non-empty list of strings; wrap a single prompt in a list"
            )
        return self.tokenizer([prompt_clean(p) for p in prompts], self.max_length)

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
