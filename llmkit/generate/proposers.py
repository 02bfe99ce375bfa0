"""What proposes the tokens speculative decoding verifies (llmkit.generate.speculative): a draft model, or n-gram
prompt lookup.

- `DraftProposer` (Leviathan et al. 2023; Chen et al. 2023): a smaller model with the target's vocabulary samples k
  tokens one at a time, x_j ~ q(. | prefix, x_1..x_{j-1}), and returns q for each so the target can accept x_j with
  probability min(1, p(x_j) / q(x_j)). Its own KV cache (a `RowKVCache`, slot = position) is rolled back on rejection
  by forgetting the slots past the accepted prefix: the next forward writes over them.
- `NgramProposer` (Saxena 2023, "prompt lookup decoding"; transformers' `prompt_lookup_num_tokens`): no model. The
  last n tokens of a row (n = max_ngram down to min_ngram) are looked up earlier in its prompt + output; the k tokens
  that followed the first match are proposed. Saxena and transformers go down to n = 1; llmkit stops at 3 by default:
  on SmolLM2-135M summaries of DialogSum (2 CPU threads, greedy, k = 10) 1-token matches proposed mostly wrong tokens,
  and a rejected proposal still costs its verify forward (11 tokens: ~2.2x a one-token step on CPU): 1.10x plain
  decoding with n down to 1, 1.33x down to 2, 1.42x with n = 3 only (2026-12-05, 4 dialogues x 128 tokens).
  A deterministic proposer: q is one-hot, so the target accepts x_j with probability p(x_j). It pays on
  input-grounded text (summaries, code edits, RAG answers) that copies the prompt.

A proposer's `propose(...)` gets the rows still decoding and how many tokens each may propose this step; it returns
each row's proposal (possibly shorter, even empty) and, for a sampling draft, q (A, K, V) for the proposed positions.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Protocol

import torch

from llmkit.errors import LlmkitError
from llmkit.generate.sampling import SamplingSettings, process_logits
from llmkit.nn.attention import RowKVCache

DEFAULT_MAX_NGRAM = 3  # longest suffix looked up (transformers' prompt lookup uses 2; Saxena's reference code 3)
DEFAULT_MIN_NGRAM = 3  # shortest suffix looked up (both references: 1; see the module docstring for why 3)


class Proposer(Protocol):
    """What `speculative_tokens` asks for proposals."""

    name: str

    def start(self, prompts: list[list[int]], capacity: int) -> None:
        """Take the batch's prompts before the first step (a draft model prefills them)."""

    def propose(
        self, active: list[int], sequences: list[list[int]], counts: list[int], settings: SamplingSettings,
        seen: torch.Tensor | None, generator: torch.Generator | None,
    ) -> tuple[list[list[int]], torch.Tensor | None]:
        """Up to counts[a] tokens to follow sequences[active[a]] (prompt + output so far), and q (A, K, V), the
        distribution each was drawn from (None: one-hot, a deterministic proposer or greedy decoding). `seen` (A, V)
        marks the tokens the repetition penalty applies to, row by row."""

    def keep(self, row: int, length: int) -> None:
        """After verification: row's first `length` tokens are final; anything the proposer stored past them is not."""


class NgramProposer:
    """Prompt lookup decoding: propose what followed the earliest earlier occurrence of the row's last n tokens."""

    name = "ngram"

    def __init__(self, max_ngram: int = DEFAULT_MAX_NGRAM, min_ngram: int = DEFAULT_MIN_NGRAM) -> None:
        if not 1 <= min_ngram <= max_ngram:
            raise LlmkitError(f"n-gram sizes min_ngram={min_ngram}, max_ngram={max_ngram} need 1 <= min <= max; "
                              f"use e.g. min_ngram={DEFAULT_MIN_NGRAM}, max_ngram={DEFAULT_MAX_NGRAM}")
        self.max_ngram, self.min_ngram = max_ngram, min_ngram

    def start(self, prompts: list[list[int]], capacity: int) -> None:
        """Nothing to prepare: prompt lookup reads the sequences themselves at each step."""

    def propose(
        self, active: list[int], sequences: list[list[int]], counts: list[int], settings: SamplingSettings,
        seen: torch.Tensor | None, generator: torch.Generator | None,
    ) -> tuple[list[list[int]], torch.Tensor | None]:
        return [self.lookup(sequences[row], count) for row, count in zip(active, counts)], None

    def lookup(self, sequence: list[int], count: int) -> list[int]:
        """Up to `count` tokens that followed the first earlier match of the sequence's last n tokens, trying the
        longest n first; [] when nothing matches."""
        if count < 1:
            return []
        ids = torch.tensor(sequence)
        length = len(sequence)
        for n in range(min(self.max_ngram, length - 1), self.min_ngram - 1, -1):
            windows = ids.unfold(0, n, 1)[:-1]  # (length - n, n): every n-gram but the suffix itself
            matches = (windows == ids[-n:]).all(dim=1).nonzero().flatten()
            if len(matches):
                start = int(matches[0]) + n
                return sequence[start : start + count]
        return []

    def keep(self, row: int, length: int) -> None:
        """Nothing to roll back: prompt lookup keeps no per-row state (a draft model's cache does)."""


class DraftProposer:
    """A draft model proposing k tokens per step from its own KV cache (same vocabulary and device as the target).

    Offline (`speculative_tokens`) its rows are the batch's rows, opened by `start`. In the serving engine its rows
    follow the engine's slots (llmkit/serve/kv.py, `SlotTable.follow`): `open_rows` makes one per slot, and the slot
    table tells it when a slot's tokens are cut back (`keep`: a request takes over a slot with a shorter shared
    prefix) or copied from another slot (`share_prefix`), and when the rows grow (`grow`). Invariant: row r holds
    the draft's keys/values of the first `lengths[r]` tokens of its sequence (the slot's tokens), never more."""

    name = "draft"

    def __init__(self, draft: torch.nn.Module, target: torch.nn.Module) -> None:
        draft_vocab, target_vocab = draft.config.vocab_size, target.config.vocab_size
        if draft_vocab != target_vocab:
            raise LlmkitError(f"the draft model {draft.config.name} has a vocabulary of {draft_vocab:,} ids, the target "
                              f"{target.config.name} {target_vocab:,}; a draft must share the target's tokenizer: use "
                              "one of the same family (e.g. a quantized or distilled copy of the target)")
        draft_device, target_device = draft.activation_dtype_device()[1], target.activation_dtype_device()[1]
        if draft_device != target_device:
            raise LlmkitError(f"the draft model is on {draft_device}, the target on {target_device}; load both on one "
                              "device (e.g. --device cuda places both)")
        self.model, self.device = draft.eval(), draft_device
        self.context = draft.config.max_seq_len
        self.cache: RowKVCache | None = None
        self.lengths: list[int] = []  # tokens of each row stored in the draft's cache

    def start(self, prompts: list[list[int]], capacity: int) -> None:
        config = self.model.config
        if capacity > self.context:
            raise LlmkitError(f"the draft model {config.name} holds {self.context:,} tokens of context; this "
                              f"generation needs up to {capacity:,}: shorten the prompt or ask for fewer tokens")
        self.open_rows(len(prompts), capacity)
        # The prompts are not fed now: the first `propose` feeds every token the draft has not seen, in one forward.

    def open_rows(self, n_rows: int, capacity: int) -> None:
        """An empty cache of `n_rows` rows of `capacity` slots (at most the draft's context)."""
        dtype, device = self.model.kv_cache_dtype_device()
        self.cache = RowKVCache(self.model.config, n_rows, min(capacity, self.context), dtype, device)
        self.lengths = [0] * n_rows

    def grow(self, capacity: int) -> None:
        """Make every row hold `capacity` slots (at most the draft's context), keeping what is stored."""
        self.cache.grow(min(capacity, self.context))

    def share_prefix(self, source: int, target: int, length: int) -> None:
        """Row `target`'s sequence now starts with row `source`'s first `length` tokens: copy the keys/values the
        draft holds for them past what `target` already holds (the rest is fed by the next `catch_up`)."""
        start, end = self.lengths[target], min(length, self.lengths[source])
        if end > start:
            self.cache.copy_slots(source, target, start, end)
            self.lengths[target] = end

    def propose(
        self, active: list[int], sequences: list[list[int]], counts: list[int], settings: SamplingSettings,
        seen: torch.Tensor | None, generator: torch.Generator | None,
    ) -> tuple[list[list[int]], torch.Tensor | None]:
        return self.draft_tokens(active, sequences, counts, shared_draw(settings, seen, generator))

    def draft_tokens(
        self, active: list[int], sequences: Sequence[list[int]] | Mapping[int, list[int]], counts: list[int],
        draw: TokenDraw,
    ) -> tuple[list[list[int]], torch.Tensor | None]:
        """`propose` with the choice of each proposed token left to `draw` (one sampling setting for the whole batch
        offline; each request's own in the serving engine). `sequences[row]` is the row's prompt + output so far."""
        k = max(counts)
        if k == 0:
            return [[] for _ in active], None
        logits = self.catch_up(active, sequences)  # (A, V): the next token's logits for each row
        proposals, probabilities = [], []
        for j in range(k):
            tokens, q = draw(logits)  # (A,), (A, V) or None
            proposals.append(tokens)
            if q is not None:
                probabilities.append(q)
            if j < k - 1:
                view = self.cache.rows(active, [self.lengths[row] for row in active])
                logits = self.model(tokens[:, None], cache=view)[:, -1]  # (A, V)
                for row in active:
                    self.lengths[row] += 1
        ids = torch.stack(proposals, dim=1).tolist()  # (A, k)
        q = torch.stack(probabilities, dim=1) if probabilities else None  # (A, k, V)
        return [row_ids[:count] for row_ids, count in zip(ids, counts)], q

    def catch_up(self, active: list[int], sequences: Sequence[list[int]] | Mapping[int, list[int]]) -> torch.Tensor:
        """Feed each row's tokens the draft has not seen (the whole prompt at first, or a prefill chunk, then the
        last step's corrected or bonus token, and the last proposal when all were accepted) in one right-padded
        forward; the logits (A, V) after each row's last token. Padding lands in slots past the row's end, which the
        next forward overwrites."""
        missing = [sequences[row][self.lengths[row] :] for row in active]
        width = max(len(tokens) for tokens in missing)
        ids = torch.tensor([tokens + [tokens[-1]] * (width - len(tokens)) for tokens in missing], device=self.device)
        last = torch.zeros(len(active), width, dtype=torch.bool, device=self.device)  # (A, T): each row's last token
        last[torch.arange(len(active)), torch.tensor([len(tokens) - 1 for tokens in missing])] = True
        view = self.cache.rows(active, [self.lengths[row] for row in active])
        logits = self.model(ids, cache=view, logits_at=last)  # (A, V)
        for row, tokens in zip(active, missing):
            self.lengths[row] += len(tokens)
        return logits

    def keep(self, row: int, length: int) -> None:
        self.lengths[row] = min(self.lengths[row], length)


TokenDraw = Callable[[torch.Tensor], tuple[torch.Tensor, "torch.Tensor | None"]]
"""Picks each row's next proposed token from the draft's logits (A, V): the tokens (A,) and the distribution q (A, V)
each was drawn from (None when every row is greedy: q is one-hot)."""


def shared_draw(settings: SamplingSettings, seen: torch.Tensor | None, generator: torch.Generator | None) -> TokenDraw:
    """Every row drawn with one `settings` and one `generator`; `seen` (A, V), the repetition penalty's tokens,
    copied and extended with each proposed token."""
    seen = None if seen is None else seen.clone()

    def draw(logits: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        processed = process_logits(logits, settings, seen)  # (A, V)
        if settings.greedy:
            tokens, q = processed.argmax(dim=-1), None  # (A,)
        else:
            q = processed.softmax(dim=-1)
            tokens = torch.multinomial(q, 1, generator=generator).squeeze(-1)
        if seen is not None:
            seen.scatter_(1, tokens[:, None], True)
        return tokens, q

    return draw
