"""The engine's KV memory: `max_batch_size` slots, each one row of a `RowKVCache` holding one sequence.

Why slots and not pages (vLLM's PagedAttention): a slot row is a plain contiguous tensor, so a decode step reads each
request's keys/values with a slice, no gather through a page table, and the attention kernel stays the stock SDPA. The
price: a row is as long as the longest sequence admitted so far (the buffers grow on demand, up to the model's
context), so memory is max_batch_size x that length even when most rows are short. `kv_cache_tokens` bounds the
tokens that running requests may reserve (prompt + max_new_tokens each): the admission budget.

Prefix caching: a slot remembers the tokens whose keys/values it stores. When a request ends its slot keeps them
(least recently used first to be overwritten), and a new request whose prompt shares a prefix with any slot's tokens
(a finished one, or one still running: rows only ever append) and the same `kv_key` starts from that prefix: it
takes the finished slot itself, or copies the prefix's keys/values into its own row (checked again before each
prefill chunk, so requests with the same prompt that arrive together, such as OpenAI's `n` choices, compute it
once), and prefills only the rest. The `kv_key` names the weights that computed a slot's keys/values (None: the
base model; a LoRA adapter's load, see llmkit/serve/adapters.py): an adapter on q/k/v/o changes them, so slots of
different keys never share a prefix.

A follower (`SlotTable.follow`: a draft model's cache, llmkit.generate.proposers.DraftProposer) keeps one row per
slot of its own keys/values for the same tokens. The table tells it what happens to the slots' tokens: a slot taken
over keeps only the shared prefix (`keep`), a prefix copied between slots is copied in its rows too (`share_prefix`),
and the rows grow together (`grow`). What the follower computes for those tokens, and when, is its own business.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Protocol

import torch

from llmkit.nn.attention import RowKVCache

GROWTH_QUANTUM = 256  # rows grow in multiples of this many slots


class RowFollower(Protocol):
    """A second cache with one row per slot, over the same tokens (a draft model's: llmkit.generate.proposers)."""

    def open_rows(self, n_rows: int, capacity: int) -> None: ...

    def grow(self, capacity: int) -> None: ...

    def keep(self, row: int, length: int) -> None:
        """Row `row`'s first `length` tokens stay; anything stored past them is no longer its tokens'."""

    def share_prefix(self, source: int, target: int, length: int) -> None:
        """Row `target` now starts with row `source`'s first `length` tokens."""


@dataclass
class Slot:
    """One row of the cache: the tokens whose keys/values it stores (slot s = token s), and who holds it."""

    row: int
    tokens: list[int] = field(default_factory=list)
    busy: bool = False  # a running request writes to it
    last_used: int = 0  # LRU clock of when it was last released
    kv_key: str | None = None  # which weights computed the keys/values (None: the base model)


def common_prefix(a: list[int], b: list[int]) -> int:
    """Length of the longest common prefix of two id lists."""
    n = min(len(a), len(b))
    if a[:n] == b[:n]:  # the usual case, compared at C speed
        return n
    for index in range(n):
        if a[index] != b[index]:
            return index
    return n


class SlotTable:
    """Assigns slots to requests, reuses cached prefixes, and grows the rows as longer requests arrive."""

    def __init__(self, model: torch.nn.Module, n_slots: int, max_row_tokens: int) -> None:
        dtype, device = model.kv_cache_dtype_device()
        self.max_row_tokens = max_row_tokens
        self.cache = RowKVCache(model.config, n_slots, min(GROWTH_QUANTUM, max_row_tokens), dtype, device)
        self.slots = [Slot(row) for row in range(n_slots)]
        self.clock = 0
        self.follower: RowFollower | None = None

    def follow(self, follower: RowFollower) -> None:
        """Give `follower` one row per slot, as long as the slots' rows, and keep it told of their tokens."""
        follower.open_rows(len(self.slots), self.cache.capacity)
        self.follower = follower

    def acquire(self, prompt: list[int], needed_tokens: int, reuse_prefix: bool = True,
                kv_key: str | None = None) -> tuple[Slot, int]:
        """A free slot for a prompt that will need `needed_tokens` slots, and how many of its first tokens it
        already holds: the free slot of the same `kv_key` sharing the longest prefix with the prompt is taken over
        as it is (else an empty slot, else the least recently used). The caller has checked that a slot is free."""
        self._grow(needed_tokens)
        free = [slot for slot in self.slots if not slot.busy]
        reused, target = 0, min(free, key=lambda slot: (bool(slot.tokens), slot.last_used))
        if reuse_prefix:
            best = max(free, key=lambda slot: self._shared(slot, prompt, kv_key))
            if self._shared(best, prompt, kv_key) > 0:
                reused, target = self._shared(best, prompt, kv_key), best
        target.tokens = prompt[:reused]
        if self.follower is not None:
            self.follower.keep(target.row, reused)
        target.busy = True
        target.kv_key = kv_key
        return target, reused

    def extend_prefix(self, slot: Slot, prompt: list[int]) -> int:
        """Copy into `slot` the keys/values of any further prompt tokens that another slot (running or cached) holds,
        so requests sharing a prefix compute it once, even when they arrive together; returns how many were copied.
        Called before each prefill chunk: a sibling may have just computed the next part."""
        done = len(slot.tokens)
        source = max(self.slots, key=lambda other: self._shared(other, prompt, slot.kv_key))
        shared = self._shared(source, prompt, slot.kv_key)
        if source is slot or shared <= done:
            return 0
        self.cache.copy_slots(source.row, slot.row, done, shared)
        if self.follower is not None:
            self.follower.share_prefix(source.row, slot.row, shared)
        slot.tokens = prompt[:shared]
        return shared - done

    @staticmethod
    def _shared(slot: Slot, prompt: list[int], kv_key: str | None = None) -> int:
        """Prompt tokens a slot's keys/values can stand for: the common prefix, short of the last prompt token (it is
        always computed, for its logits); none when other weights (another adapter) computed them."""
        if slot.kv_key != kv_key:
            return 0
        return min(common_prefix(slot.tokens, prompt), len(prompt) - 1)

    def release(self, slot: Slot) -> None:
        """The request is done: the slot is free, its tokens stay for later prefix hits."""
        self.clock += 1
        slot.busy, slot.last_used = False, self.clock

    def free_slots(self) -> int:
        return sum(not slot.busy for slot in self.slots)

    def used_tokens(self) -> int:
        """Tokens stored for running requests."""
        return sum(len(slot.tokens) for slot in self.slots if slot.busy)

    def _grow(self, needed_tokens: int) -> None:
        if needed_tokens > self.cache.capacity:
            quanta = -(-needed_tokens // GROWTH_QUANTUM)
            self.cache.grow(min(max(quanta * GROWTH_QUANTUM, 2 * self.cache.capacity), self.max_row_tokens))
            if self.follower is not None:
                self.follower.grow(self.cache.capacity)
