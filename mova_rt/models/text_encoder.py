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
import os
import re

import torch
from transformers import T5TokenizerFast, UMT5Config, UMT5EncoderModel

from mova_rt.errors import MovaInputError


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
