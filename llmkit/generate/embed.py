"""Sentence embeddings: texts -> one vector each from an encoder (mean or [CLS] pooling, Reimers & Gurevych 2019,
"Sentence-BERT"), batched by length so little of each batch is padding."""

from __future__ import annotations

from collections.abc import Sequence

import torch

from llmkit.errors import LlmkitError
from llmkit.models.encoder import Encoder, SentenceSettings, pool
from llmkit.tokenizer import Tokenizer


def embed_texts(
    model: Encoder, tokenizer: Tokenizer, texts: Sequence[str], settings: SentenceSettings | None = None
) -> torch.Tensor:
    """Sentence embeddings (N, C) in float32, in the order of `texts`. Texts are batched by length (little
    padding), wrapped in the tokenizer's special tokens ([CLS] ... [SEP]) and padded on the right."""
    settings = settings or SentenceSettings()
    if settings.pooling not in ("mean", "cls"):
        raise LlmkitError(f"pooling={settings.pooling!r} is not supported; choose 'mean' or 'cls'")
    if settings.batch_size < 1:
        raise LlmkitError(f"batch_size={settings.batch_size} must be at least 1")
    if isinstance(texts, str):
        raise LlmkitError("texts is one string; pass a list of texts (e.g. [text])")
    model = getattr(model, "encoder", model)  # a MaskedLM or classifier embeds with its encoder
    max_tokens = min(settings.max_tokens or model.config.max_seq_len, model.config.max_seq_len)
    ids = encode_for_encoder(tokenizer, texts, max_tokens)
    pad_id = next((i for i in (tokenizer.pad_id, model.config.pad_id) if i is not None), 0)
    device = model.embed.weight.device
    order = sorted(range(len(ids)), key=lambda index: len(ids[index]))
    vectors = torch.empty(len(ids), model.config.d_model)
    for start in range(0, len(order), settings.batch_size):
        rows = order[start:start + settings.batch_size]
        length = max(len(ids[row]) for row in rows)
        batch = torch.full((len(rows), length), pad_id, dtype=torch.long)  # (b, T)
        mask = torch.zeros(len(rows), length, dtype=torch.long)
        for k, row in enumerate(rows):
            batch[k, :len(ids[row])], mask[k, :len(ids[row])] = torch.tensor(ids[row]), 1
        batch, mask = batch.to(device), mask.to(device)
        with torch.inference_mode():
            pooled = pool(model(batch, mask), mask, settings)  # (b, C)
        vectors[rows] = pooled.float().cpu()
    return vectors


def encode_for_encoder(tokenizer: Tokenizer, texts: Sequence[str], max_tokens: int) -> list[list[int]]:
    """Ids of each text with the tokenizer's special tokens ([CLS] text [SEP] for BERT), truncated to `max_tokens`."""
    backend = tokenizer.backend
    n_special = backend.num_special_tokens_to_add(False)
    if max_tokens <= n_special:
        raise LlmkitError(f"max_tokens={max_tokens} leaves no room for text beside {n_special} special tokens")
    encodings = backend.encode_batch(list(texts), add_special_tokens=False)
    for encoding in encodings:
        encoding.truncate(max_tokens - n_special)
    return [backend.post_process(encoding).ids for encoding in encodings]
