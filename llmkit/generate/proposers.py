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
    """A draft model proposing k tokens per step from its own KV cache (same vocabulary and device as the target)."""

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
        self.cache: RowKVCache | None = None
        self.lengths: list[int] = []  # tokens of each row stored in the draft's cache

    def start(self, prompts: list[list[int]], capacity: int) -> None:
        config = self.model.config
        if capacity > config.max_seq_len:
            raise LlmkitError(f"the draft model {config.name} holds {config.max_seq_len:,} tokens of context; this "
                              f"generation needs up to {capacity:,}: shorten the prompt or ask for fewer tokens")
        dtype, device = self.model.kv_cache_dtype_device()
        self.cache = RowKVCache(config, len(prompts), capacity, dtype, device)
        self.lengths = [0] * len(prompts)
        # The prompts are not fed now: the first `propose` feeds every token the draft has not seen, in one forward.

    def propose(
        self, active: list[int], sequences: list[list[int]], counts: list[int], settings: SamplingSettings,
        seen: torch.Tensor | None, generator: torch.Generator | None,
    ) -> tuple[list[list[int]], torch.Tensor | None]:
        k = max(counts)
        if k == 0:
            return [[] for _ in active], None
        logits = self._catch_up(active, sequences)  # (A, V): the next token's logits for each row
        seen = None if seen is None else seen.clone()
        proposals, probabilities = [], []
        for j in range(k):
            processed = process_logits(logits, settings, seen)  # (A, V)
            if settings.greedy:
                tokens = processed.argmax(dim=-1)  # (A,)
            else:
                q = processed.softmax(dim=-1)
                tokens = torch.multinomial(q, 1, generator=generator).squeeze(-1)
                probabilities.append(q)
            proposals.append(tokens)
            if seen is not None:
                seen.scatter_(1, tokens[:, None], True)
            if j < k - 1:
                view = self.cache.rows(active, [self.lengths[row] for row in active])
                logits = self.model(tokens[:, None], cache=view)[:, -1]  # (A, V)
                for row in active:
                    self.lengths[row] += 1
        ids = torch.stack(proposals, dim=1).tolist()  # (A, k)
        q = torch.stack(probabilities, dim=1) if probabilities else None  # (A, k, V)
        return [row_ids[:count] for row_ids, count in zip(ids, counts)], q

    def _catch_up(self, active: list[int], sequences: list[list[int]]) -> torch.Tensor:
        """Feed each row's tokens the draft has not seen (the whole prompt at first, then the last step's corrected
        or bonus token, and the last proposal when all were accepted) in one right-padded forward; the logits (A, V)
        after each row's last token. Padding lands in slots past the row's end, which the next forward overwrites."""
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
