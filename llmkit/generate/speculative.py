"""Speculative decoding: a cheap proposer guesses k tokens, the target model checks them all in one forward.

Leviathan et al. 2023 ("Fast Inference from Transformers via Speculative Decoding"); Chen et al. 2023 ("Accelerating
Large Language Model Decoding with Speculative Sampling"). Each step, for one row whose text so far is `prefix`:

    x_1..x_k       proposed (llmkit.generate.proposers: a draft model, x_j ~ q_j; or n-gram prompt lookup, q_j one-hot)
    p_0..p_k       the target's next-token distributions after prefix, prefix + x_1, ..., prefix + x_1..x_k:
                   ONE forward of [last token, x_1..x_k]
    for j = 1..k:  accept x_j with probability min(1, p_{j-1}(x_j) / q_j(x_j)); at the first rejection emit
                   y ~ norm(max(0, p_{j-1} - q_j)) and stop
    all accepted:  emit a bonus y ~ p_k

The emitted tokens are distributed exactly as the target's own sampling (the papers' theorem), with the same processors
(repetition penalty, temperature, top-k, top-p) applied to p and q. Greedy decoding accepts x_j when it is the argmax
of p_{j-1}: the output is token for token that of plain greedy decoding (`llmkit.generate.decode.generate_tokens`).
A step costs one target forward and yields between 1 and k + 1 tokens per row.

KV caches: the target's and the draft's are `RowKVCache`s (slot = position, each row at its own length), so rows that
accept different counts just continue from different slots. Rejection is a rollback of a row's length: a slot past
the accepted prefix is never attended to again before the next forward writes over it.

Adaptive k (`adaptive=True`, transformers' assisted-generation heuristic): a row's k grows by 2 after a step where
every proposed token was accepted and shrinks by 1 (not below 1) after a rejection, within 1..2 * num_speculative_tokens.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from functools import partial

import torch

from llmkit.errors import LlmkitError
from llmkit.generate.decode import DEFAULT_MAX_NEW_TOKENS, checked_prompts
from llmkit.generate.proposers import DraftProposer, NgramProposer, Proposer
from llmkit.generate.sampling import SamplingSettings, make_generator, process_logits, sample_next
from llmkit.nn.attention import RowKVCache

DEFAULT_SPECULATIVE_TOKENS = 5


@dataclass
class SpeculativeStats:
    """Counts over one generation; plain decoding would have accepted 0 and made 1 token per target forward."""

    proposed: int = 0  # tokens proposed and sent to the target for checking
    accepted: int = 0  # of those, the ones the target accepted
    emitted: int = 0  # tokens yielded (accepted + corrected/bonus, cut at stop ids and max_new_tokens)
    row_forwards: int = 0  # target forwards, counted once per row they decoded (prefill included)

    @property
    def acceptance_rate(self) -> float:
        return self.accepted / self.proposed if self.proposed else 0.0

    @property
    def tokens_per_forward(self) -> float:
        return self.emitted / self.row_forwards if self.row_forwards else 0.0

    def summary(self) -> str:
        return (f"{self.accepted:,}/{self.proposed:,} proposed tokens accepted ({self.acceptance_rate:.1%}), "
                f"{self.tokens_per_forward:.2f} tokens per target forward")


def check_speculative_tokens(k: int, flag: str = "num_speculative_tokens") -> None:
    """Raise `LlmkitError` unless k, the tokens proposed per step, is an integer >= 1."""
    if isinstance(k, bool) or not isinstance(k, int) or k < 1:
        raise LlmkitError(f"{flag}={k!r} must be an integer >= 1 (tokens proposed per step); use e.g. 5")


def make_proposer(target: torch.nn.Module, draft: torch.nn.Module | str) -> Proposer:
    """A proposer from what the user names: a draft model, or "ngram" for prompt lookup."""
    if isinstance(draft, str):
        if draft != "ngram":
            raise LlmkitError(f"speculation method {draft!r} is unknown; use 'ngram' (prompt lookup) or a draft model")
        return NgramProposer()
    if isinstance(draft, torch.nn.Module):
        return DraftProposer(draft, target)
    if hasattr(draft, "propose"):
        return draft
    raise LlmkitError(f"draft={type(draft).__name__} is neither a model nor 'ngram'; pass a decoder or 'ngram'")


def speculative_tokens(
    target: torch.nn.Module,
    prompt_ids: Sequence[Sequence[int]] | Sequence[int],
    max_new_tokens: int = DEFAULT_MAX_NEW_TOKENS,
    settings: SamplingSettings | None = None,
    stop_ids: Iterable[int] = (),
    pad_id: int = 0,
    truncate_prompt: bool = False,
    *,
    draft: torch.nn.Module | str | Proposer = "ngram",
    num_speculative_tokens: int = DEFAULT_SPECULATIVE_TOKENS,
    adaptive: bool = False,
    stats: SpeculativeStats | None = None,
) -> Iterator[list[list[int]]]:
    """Yield, per target forward, the new tokens of each row: a list of B lists (empty for rows already finished).

    Arguments as in `generate_tokens` (a row ends after one of `stop_ids`, even inside an accepted run, or after
    `max_new_tokens` tokens); `draft` is a draft model (same vocabulary and device) or "ngram" (prompt lookup);
    `num_speculative_tokens` is k, the tokens proposed per step (the starting k with `adaptive`). `stats`, when
    given, is filled in as the steps run.

    Raises:
        LlmkitError: k < 1, a draft with another vocabulary or device, or any of `generate_tokens`' bad inputs.
    """
    check_speculative_tokens(num_speculative_tokens)
    settings = settings or SamplingSettings()
    settings.validate()
    proposer = make_proposer(target, draft)
    rows = checked_prompts(target, prompt_ids, max_new_tokens, pad_id, truncate_prompt)
    return _speculative_loop(target, proposer, rows, max_new_tokens, settings, frozenset(stop_ids),
                             num_speculative_tokens, adaptive, stats if stats is not None else SpeculativeStats())


def speculative_token_steps(*args, **kwargs) -> Iterator[list[int | None]]:  # noqa: ANN002, ANN003
    """`speculative_tokens` as `generate_tokens`' steps (one token per row per step, None for a row with none), for
    the text-level `generate` / `stream`: pass `partial(speculative_token_steps, draft=..., stats=...)` as their
    `token_steps`. The tokens are the same, regrouped."""
    steps = speculative_tokens(*args, **kwargs)

    def flattened() -> Iterator[list[int | None]]:
        for step in steps:
            for index in range(max(len(tokens) for tokens in step)):
                yield [tokens[index] if index < len(tokens) else None for tokens in step]

    return flattened()


def speculative_steps_with(
    draft: torch.nn.Module | str, num_speculative_tokens: int = DEFAULT_SPECULATIVE_TOKENS, adaptive: bool = False,
    stats: SpeculativeStats | None = None,
):  # noqa: ANN201 (a TokenSteps callable)
    """The `token_steps` argument of `llmkit.generate.generate` / `stream` that decodes speculatively."""
    return partial(speculative_token_steps, draft=draft, num_speculative_tokens=num_speculative_tokens,
                   adaptive=adaptive, stats=stats)


def _speculative_loop(
    target: torch.nn.Module, proposer: Proposer, rows: list[list[int]], max_new_tokens: int,
    settings: SamplingSettings, stop_ids: frozenset[int], k: int, adaptive: bool, stats: SpeculativeStats,
) -> Iterator[list[list[int]]]:
    dtype, device = target.kv_cache_dtype_device()
    vocab_size, batch_size = target.config.vocab_size, len(rows)
    k_max = 2 * k if adaptive else k
    # Room for every row's prompt + new tokens, plus a full proposal past the longest (rows share one forward width).
    capacity = min(target.config.max_seq_len, max(len(row) for row in rows) + max_new_tokens + k_max + 1)
    with torch.inference_mode():
        cache = RowKVCache(target.config, batch_size, capacity, dtype, device)
        seen = None
        if settings.repetition_penalty != 1.0:
            seen = torch.zeros(batch_size, vocab_size, dtype=torch.bool, device=device)
            for row, ids in enumerate(rows):
                seen[row, torch.tensor(ids, device=device)] = True
        proposer.start(rows, capacity)
    generator = make_generator(settings, device)
    sequences = [list(row) for row in rows]  # prompt + output; the target's cache holds all but the last token
    generated = [0] * batch_size
    finished = [False] * batch_size
    k_rows = [k] * batch_size

    def emit(row: int, tokens: list[int]) -> list[int]:
        """The row's share of `tokens` (cut after a stop id or at max_new_tokens), appended to its sequence."""
        tokens = tokens[: max_new_tokens - generated[row]]
        stop = next((index for index, token in enumerate(tokens) if token in stop_ids), None)
        if stop is not None:
            tokens = tokens[: stop + 1]
        sequences[row].extend(tokens)
        generated[row] += len(tokens)
        finished[row] = stop is not None or generated[row] == max_new_tokens
        if seen is not None:
            with torch.inference_mode():
                seen[row, torch.tensor(tokens, device=device)] = True
        stats.emitted += len(tokens)
        return tokens

    with torch.inference_mode():
        first = sample_next(_prefill(target, rows, cache, device), settings, generator, seen).tolist()  # (B,)
    stats.row_forwards += batch_size
    yield [emit(row, [token]) for row, token in enumerate(first)]
    while not all(finished):
        active = [row for row in range(batch_size) if not finished[row]]
        # Proposals end where max_new_tokens would, and every row's fit the cache after the longest one.
        width = capacity - max(len(sequences[row]) for row in active)
        counts = [max(0, min(k_rows[row], max_new_tokens - generated[row] - 1, width)) for row in active]
        with torch.inference_mode():
            row_seen = None if seen is None else seen[active]
            proposals, q = proposer.propose(active, sequences, counts, settings, row_seen, generator)
            accepted, next_tokens = _verify(target, cache, active, sequences, proposals, q, settings, row_seen,
                                            generator)
        stats.row_forwards += len(active)
        step: list[list[int]] = [[] for _ in range(batch_size)]
        for row, proposal, n_accepted, token in zip(active, proposals, accepted, next_tokens):
            stats.proposed += len(proposal)
            stats.accepted += n_accepted
            proposer.keep(row, len(sequences[row]) + n_accepted)
            step[row] = emit(row, proposal[:n_accepted] + [token])
            if adaptive and proposal:
                k_rows[row] = min(k_rows[row] + 2, k_max) if n_accepted == len(proposal) else max(k_rows[row] - 1, 1)
        yield step


def _prefill(target: torch.nn.Module, rows: list[list[int]], cache: RowKVCache, device: torch.device) -> torch.Tensor:
    """Feed every prompt (right-padded: each row from slot 0, padding past its end is overwritten later) in one
    forward; the logits (B, V) after each row's last token."""
    width = max(len(row) for row in rows)
    ids = torch.tensor([row + [row[-1]] * (width - len(row)) for row in rows], device=device)  # (B, T)
    last = torch.zeros(len(rows), width, dtype=torch.bool, device=device)
    last[torch.arange(len(rows)), torch.tensor([len(row) - 1 for row in rows])] = True
    return target(ids, cache=cache.rows(list(range(len(rows))), [0] * len(rows)), logits_at=last)  # (B, V)


def _verify(
    target: torch.nn.Module, cache: RowKVCache, active: list[int], sequences: list[list[int]],
    proposals: list[list[int]], q: torch.Tensor | None, settings: SamplingSettings, seen: torch.Tensor | None,
    generator: torch.Generator | None,
) -> tuple[list[int], list[int]]:
    """One target forward of each active row's last token + its proposal; per row, how many proposed tokens are
    accepted and the token that follows them (the correction at the first rejection, or the bonus)."""
    device = cache.keys[0].device
    k = max(len(proposal) for proposal in proposals)
    ids = torch.tensor([[sequences[row][-1]] + proposal + [proposal[-1] if proposal else 0] * (k - len(proposal))
                        for row, proposal in zip(active, proposals)], device=device)  # (A, k + 1)
    view = cache.rows(active, [len(sequences[row]) - 1 for row in active])
    logits = target(ids, cache=view)  # (A, k + 1, V): p_0..p_k
    A, T, V = logits.shape
    if seen is not None:  # position j's penalty also covers x_1..x_j
        proposed = torch.zeros(A, T, V, dtype=torch.bool, device=device)
        proposed[:, 1:].scatter_(2, ids[:, 1:, None], True)
        seen = seen[:, None] | proposed.cumsum(dim=1).bool()  # (A, T, V)
        seen = seen.reshape(A * T, V)
    processed = process_logits(logits.reshape(A * T, V), settings, seen).reshape(A, T, V)
    lengths = torch.tensor([len(proposal) for proposal in proposals], device=device)  # (A,)
    proposed_ids = ids[:, 1:]  # (A, k)
    if settings.greedy:
        n_accepted, tokens = accept_greedy(processed, proposed_ids, lengths)
    else:
        n_accepted, tokens = accept_sampled(processed.softmax(dim=-1), proposed_ids, lengths, q, generator)
    return n_accepted.tolist(), tokens.tolist()


def accept_greedy(
    logits: torch.Tensor, proposed_ids: torch.Tensor, lengths: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Greedy verification: per row, how many proposed tokens equal the argmax of the target's (processed) logits
    (A, k + 1, V) before the first that does not, and the argmax that follows them (the correction or the bonus).
    `proposed_ids` (A, k) holds row a's proposal in its first lengths[a] columns. Returns two (A,) tensors."""
    choice = logits.argmax(dim=-1)  # (A, k + 1)
    n_accepted = _leading_true(choice[:, :-1] == proposed_ids, lengths)
    return n_accepted, choice.gather(1, n_accepted[:, None]).squeeze(1)


def accept_sampled(
    p: torch.Tensor, proposed_ids: torch.Tensor, lengths: torch.Tensor, q: torch.Tensor | None,
    generator: torch.Generator | None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The Leviathan/Chen rule on the target's probabilities p (A, k + 1, V) after each proposed prefix: accept x_j
    with probability min(1, p_{j-1}(x_j) / q_j(x_j)) (q (A, k, V), None for a deterministic proposer: q one-hot, so
    with probability p_{j-1}(x_j)); at the first rejection draw from norm(max(0, p_{j-1} - q_j)), after a full accept
    from p_k. Returns how many were accepted (A,) and the token drawn after them (A,)."""
    A, device = p.shape[0], p.device
    k = proposed_ids.shape[1]
    p_proposed = p[:, :-1].gather(2, proposed_ids[:, :, None]).squeeze(2)  # (A, k) p_{j-1}(x_j)
    q_proposed = torch.ones_like(p_proposed) if q is None else q.gather(2, proposed_ids[:, :, None]).squeeze(2)
    draws = torch.rand(p_proposed.shape, generator=generator, device=device)
    n_accepted = _leading_true(draws * q_proposed < p_proposed, lengths)  # u < p / q, q > 0 where x was drawn
    rows = torch.arange(A, device=device)
    after = p[rows, n_accepted]  # (A, V): p at the first rejected position, or p_k
    rejected = n_accepted < lengths
    if bool(rejected.any()):
        position = n_accepted.clamp(max=max(k - 1, 0))
        if q is None:  # q one-hot at x: max(0, p - q) is p without x
            residual = after.scatter(1, proposed_ids[rows, position][:, None], 0.0)
        else:
            residual = (after - q[rows, position]).clamp(min=0)
        # A residual of zero mass only arises from rounding when p == q; p itself is then the right law.
        residual = torch.where(residual.sum(-1, keepdim=True) > 0, residual, after)
        after = torch.where(rejected[:, None], residual, after)
    tokens = torch.multinomial(after, 1, generator=generator).squeeze(1)  # normalises each row
    return n_accepted, tokens


def _leading_true(flags: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
    """Per row of `flags` (A, k), how many of its first lengths[a] entries are True before the first False."""
    if flags.shape[1] == 0:
        return torch.zeros_like(lengths)
    within = torch.arange(flags.shape[1], device=flags.device)[None] < lengths[:, None]
    return (flags & within).long().cumprod(dim=1).sum(dim=1)
