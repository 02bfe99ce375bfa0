"""The model forwards of one engine step, over rows of the engine's slot table (llmkit/serve/kv.py).

A decode forward feeds each decoding request its pending token (and, speculating, the tokens proposed for it) at
its own position; a prefill forward feeds one request the next chunk of its prompt. With multi-LoRA serving each
row of the forward runs with its request's adapter (llmkit.peft.multi_lora.batch_adapters); without a registry
the base model runs."""

from __future__ import annotations

from contextlib import AbstractContextManager, nullcontext
from typing import Any

import torch

from llmkit.serve.active import ActiveRequest
from llmkit.serve.kv import SlotTable


def row_adapters(model: torch.nn.Module, adapters: Any, seqs: list[ActiveRequest]) -> AbstractContextManager:
    """Each row of the next forward with its request's LoRA adapter (nothing to do without a registry)."""
    if adapters is None:
        return nullcontext()
    from llmkit.peft.multi_lora import batch_adapters

    return batch_adapters(model, [seq.request.adapter for seq in seqs])


def prefill_logits(model: torch.nn.Module, slots: SlotTable, seq: ActiveRequest, chunk: list[int],
                   device: torch.device, adapters: Any) -> torch.Tensor:
    """The last position's logits (1, 1, V) after feeding `chunk` at the end of the request's prefilled prompt."""
    view = slots.cache.rows([seq.slot.row], [seq.prefilled])
    with row_adapters(model, adapters, [seq]):
        return model(torch.tensor([chunk], device=device), cache=view, last_token_only=True)  # (1, 1, V)


def decode_logits(model: torch.nn.Module, slots: SlotTable, seqs: list[ActiveRequest], proposals: list[list[int]],
                  device: torch.device, adapters: Any) -> torch.Tensor:
    """Logits (B, 1 + width, V) of one batched forward: row b is seqs[b]'s pending token then proposals[b], padded
    to the widest proposal with the pending token (a padded position's logits are never read). `seqs` in slot order,
    so when the busy slots are a run the forward reads the cache as one slice (llmkit.nn.attention.RowCacheView)."""
    width = max(len(proposal) for proposal in proposals)
    view = slots.cache.rows([seq.slot.row for seq in seqs], [len(seq.slot.tokens) for seq in seqs])
    tokens = torch.tensor([[seq.pending] + proposal + [seq.pending] * (width - len(proposal))
                           for seq, proposal in zip(seqs, proposals)], device=device)  # (B, 1 + width)
    with row_adapters(model, adapters, seqs):  # one adapter per row, in the forward's row order
        return model(tokens, cache=view)  # (B, 1 + width, V)
