"""The decode loop: prefill the prompt into a preallocated KV cache, then one token per forward.

    cache = model.new_cache(B, prompt_len + max_new_tokens)
    logits = model(prompt, cache, attention_mask, last_token_only=True)   # one forward for the prompt
    repeat: token = sample_next(logits); logits = model(token, cache)       # one forward per new token

Batches are left-padded so every row's last prompt token sits in the same slot; the cache
remembers which slots are padding, so decode steps need no mask of their own.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator, Sequence
from typing import Any

import torch

from llmkit.errors import LlmkitError
from llmkit.generate.compiled import decode_step
from llmkit.generate.sampling import SamplingSettings, make_generator, sample_next, seen_tokens
from llmkit.tokenizer import StreamDecoder

DEFAULT_MAX_NEW_TOKENS = 128
TokenSteps = Callable[..., Iterator[list[int | None]]]  # generate_tokens' signature: one token per row per step


def fit_prompt(
    ids: list[int], model: torch.nn.Module, max_new_tokens: int, truncate_prompt: bool, label: str = "prompt"
) -> list[int]:
    """The prompt ids, checked against the context window (prompt + new tokens); kept to the last tokens if asked."""
    config = model.config
    if not ids:
        raise LlmkitError(f"{label} is empty (0 tokens); give at least one token of text to continue from")
    room = config.max_seq_len - max_new_tokens
    if room < 1:
        raise LlmkitError(
            f"max_new_tokens={max_new_tokens:,} leaves no room for a prompt in {config.name}'s context of "
            f"{config.max_seq_len:,} tokens; ask for at most {config.max_seq_len - 1:,} new tokens"
        )
    if len(ids) <= room:
        return ids
    if truncate_prompt:
        return ids[-room:]
    raise LlmkitError(
        f"{label} has {len(ids):,} tokens; {config.name}'s context is {config.max_seq_len:,} with "
        f"{max_new_tokens:,} new tokens: pass truncate_prompt=True (CLI --truncate_prompt) to keep the last "
        f"{room:,} tokens, or shorten it"
    )


def checked_prompts(
    model: torch.nn.Module,
    prompt_ids: Sequence[Sequence[int]] | Sequence[int],
    max_new_tokens: int,
    pad_id: int,
    truncate_prompt: bool,
) -> list[list[int]]:
    """The prompts as lists of ids (one prompt or a batch), each checked against the vocabulary and fitted to the
    context with `max_new_tokens` to spare; `pad_id` checked too. Raises `LlmkitError` naming the prompt and the fix."""
    if max_new_tokens < 1:
        raise LlmkitError(f"max_new_tokens={max_new_tokens} must be >= 1; ask for at least one new token")
    single = len(prompt_ids) == 0 or not isinstance(prompt_ids[0], Sequence)
    rows = [prompt_ids] if single else prompt_ids  # an empty list is one empty prompt: fit_prompt says so
    labels = ["prompt"] if single else [f"prompt {index}" for index in range(len(rows))]
    rows = [
        fit_prompt([int(i) for i in row], model, max_new_tokens, truncate_prompt, label) for row, label in zip(rows, labels)
    ]
    vocab_size = model.config.vocab_size
    for row, label in zip(rows, labels):
        bad = [token for token in (min(row), max(row)) if not 0 <= token < vocab_size]
        if bad:
            raise LlmkitError(
                f"{label} holds token id {bad[0]}, outside {model.config.name}'s vocabulary of {vocab_size:,} ids; "
                "use the tokenizer that belongs to this model"
            )
    if not 0 <= pad_id < vocab_size:
        raise LlmkitError(f"pad_id={pad_id} is outside the vocabulary of {vocab_size:,} ids; use e.g. the EOS id")
    return rows


def generate_tokens(
    model: torch.nn.Module,
    prompt_ids: Sequence[Sequence[int]] | Sequence[int],
    max_new_tokens: int = DEFAULT_MAX_NEW_TOKENS,
    settings: SamplingSettings | None = None,
    stop_ids: Iterable[int] = (),
    pad_id: int = 0,
    truncate_prompt: bool = False,
) -> Iterator[list[int | None]]:
    """Yield, per step, the new token of each sequence: a list of B ids, None for rows already finished.

    A row finishes after yielding one of `stop_ids`; the loop ends when all rows finish or after
    `max_new_tokens` steps. Left padding uses `pad_id` (masked out, so any valid id works).
    """
    settings = settings or SamplingSettings()
    settings.validate()
    rows = checked_prompts(model, prompt_ids, max_new_tokens, pad_id, truncate_prompt)
    device = next(model.parameters()).device
    longest = max(len(row) for row in rows)
    input_ids = torch.tensor([[pad_id] * (longest - len(row)) + row for row in rows], device=device)  # (B, T)
    attention_mask = None
    if any(len(row) < longest for row in rows):
        attention_mask = torch.tensor([[0] * (longest - len(row)) + [1] * len(row) for row in rows], device=device)
    return _decode_loop(model, input_ids, attention_mask, max_new_tokens, settings, frozenset(stop_ids))


def _decode_loop(
    model: torch.nn.Module,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor | None,
    max_new_tokens: int,
    settings: SamplingSettings,
    stop_ids: frozenset[int],
) -> Iterator[list[int | None]]:
    """A decoder-only model's steps, started lazily by `generate_tokens` after its checks have run: the prompt is
    prefilled into a KV cache sized for prompt + new tokens, then each step feeds one token."""
    batch_size, prompt_len = input_ids.shape
    with torch.inference_mode():
        cache = model.new_cache(batch_size, prompt_len + max_new_tokens)
        seen = None
        if settings.repetition_penalty != 1.0:
            seen = seen_tokens(input_ids, model.config.vocab_size, attention_mask)  # (B, V)

    def prefill() -> torch.Tensor:
        return model(input_ids, cache=cache, attention_mask=attention_mask, last_token_only=True)[:, -1]  # (B, V)

    forward_one = decode_step(model)  # compiled where `compile_decode_step` was applied

    def step(next_ids: torch.Tensor) -> torch.Tensor:
        # Padded slots are already marked in the cache and new slots start valid: no mask needed.
        return forward_one(next_ids[:, None], cache=cache)[:, -1]  # (B, V)

    return sample_steps(prefill, step, max_new_tokens, settings, stop_ids, seen, input_ids.device)


def sample_steps(
    prefill: Callable[[], torch.Tensor],
    step: Callable[[torch.Tensor], torch.Tensor],
    max_new_tokens: int,
    settings: SamplingSettings,
    stop_ids: frozenset[int],
    seen: torch.Tensor | None,
    device: torch.device,
) -> Iterator[list[int | None]]:
    """The one decode loop every model family runs: `prefill()` gives the logits (B, V) of the first new token,
    `step(ids)` feeds the sampled ids (B,) and gives the next logits. Yields each step's B ids, None for rows that
    already stopped (a row stops after yielding one of `stop_ids`); `seen` (B, V) marks tokens for the repetition
    penalty and is updated in place."""
    generator = make_generator(settings, device)
    # inference_mode is entered per step, not around the yields, so the caller's code between
    # steps runs with its own autograd state.
    with torch.inference_mode():
        logits = prefill()
    finished: list[bool] | None = None
    for index in range(max_new_tokens):
        with torch.inference_mode():
            next_ids = sample_next(logits, settings, generator, seen)  # (B,)
            if seen is not None:
                seen.scatter_(1, next_ids[:, None], True)
        tokens: list[int | None] = next_ids.tolist()  # the one host sync per step
        finished = finished or [False] * len(tokens)
        if any(finished):
            tokens = [None if done else token for token, done in zip(tokens, finished)]
        if stop_ids:
            finished = [done or token in stop_ids for done, token in zip(finished, tokens)]
        yield tokens
        if index == max_new_tokens - 1 or all(finished):
            return
        with torch.inference_mode():
            logits = step(next_ids)


def tokenizer_stop_ids(tokenizer: Any) -> frozenset[int]:
    """Ids that end a reply: the tokenizer's `stop_ids` (e.g. <|im_end|>) and its EOS."""
    stop_ids = set(getattr(tokenizer, "stop_ids", None) or ())
    if getattr(tokenizer, "eos_id", None) is not None:
        stop_ids.add(tokenizer.eos_id)
    return frozenset(stop_ids)


def _pad_id(tokenizer: Any) -> int:
    for name in ("pad_id", "eos_id"):
        if getattr(tokenizer, name, None) is not None:
            return getattr(tokenizer, name)
    return 0  # padding is masked out, so any valid id works


def _check_stop_strings(stop_strings: Iterable[str]) -> tuple[str, ...]:
    if isinstance(stop_strings, str):
        stop_strings = (stop_strings,)
    stop_strings = tuple(stop_strings)
    for stop in stop_strings:
        if not isinstance(stop, str) or not stop:
            raise LlmkitError(f"stop string {stop!r} must be a non-empty string; remove it from stop_strings")
    return stop_strings


def first_stop(text: str, stop_strings: Sequence[str]) -> int | None:
    """Index where the earliest stop string starts in `text`, or None."""
    found = [index for index in (text.find(stop) for stop in stop_strings) if index >= 0]
    return min(found) if found else None


def cut_at_stop(text: str, stop_strings: Sequence[str]) -> str:
    """`text` up to (not including) its first stop string."""
    index = first_stop(text, stop_strings)
    return text if index is None else text[:index]


def generate(
    model: torch.nn.Module,
    tokenizer: Any,
    prompts: str | Sequence[str],
    max_new_tokens: int = DEFAULT_MAX_NEW_TOKENS,
    settings: SamplingSettings | None = None,
    stop_strings: Sequence[str] = (),
    truncate_prompt: bool = False,
    token_steps: TokenSteps | None = None,
) -> str | list[str]:
    """Continue one prompt (-> str) or a batch (-> list[str]); returns only the new text.

    Each row stops at EOS / the tokenizer's stop ids, at the first of `stop_strings` (cut off), or
    after `max_new_tokens`. `token_steps` replaces `generate_tokens` as the source of tokens (same arguments and
    steps), e.g. speculative decoding's `llmkit.generate.speculative.speculative_token_steps`.
    """
    single = isinstance(prompts, str)
    texts = [prompts] if single else list(prompts)
    if not texts:
        raise LlmkitError("no prompts given; pass a string or a non-empty list of strings")
    stop_strings = _check_stop_strings(stop_strings)
    prompt_ids = [tokenizer.encode(text) for text in texts]
    stop_ids = tokenizer_stop_ids(tokenizer)
    steps = (token_steps or generate_tokens)(
        model,
        prompt_ids[0] if single else prompt_ids,
        max_new_tokens,
        settings,
        stop_ids,
        _pad_id(tokenizer),
        truncate_prompt,
    )
    outputs: list[list[int]] = [[] for _ in texts]
    done = [False] * len(texts)
    # A stop string spans at most 4 bytes per character, and every token holds at least one byte:
    # decoding this many trailing tokens is enough to see one that just completed.
    window = 4 * max((len(stop) for stop in stop_strings), default=0) + 4
    for tokens in steps:
        for row, token in enumerate(tokens):
            if done[row] or token is None:
                continue
            if token in stop_ids:
                done[row] = True
                continue
            outputs[row].append(token)
            if stop_strings and first_stop(tokenizer.decode(outputs[row][-window:]), stop_strings) is not None:
                done[row] = True
        if all(done):
            break
    results = [cut_at_stop(tokenizer.decode(ids), stop_strings) for ids in outputs]
    return results[0] if single else results


class StopStringFilter:
    """Passes streamed text through, holding back any tail that could be the start of a stop string.

    `push(text)` returns the text that is safe to show; once a stop string appears, `stopped` is
    True and nothing from the stop string on is ever returned.
    """

    def __init__(self, stop_strings: Sequence[str]) -> None:
        self.stop_strings = tuple(stop_strings)
        self.pending = ""
        self.stopped = False

    def push(self, text: str) -> str:
        if self.stopped:
            return ""
        self.pending += text
        index = first_stop(self.pending, self.stop_strings)
        if index is not None:
            self.stopped = True
            safe, self.pending = self.pending[:index], ""
            return safe
        hold = max((self._overlap(stop) for stop in self.stop_strings), default=0)
        cut = len(self.pending) - hold
        safe, self.pending = self.pending[:cut], self.pending[cut:]
        return safe

    def flush(self) -> str:
        """The text held back, at the end of the stream (it did not become a stop string)."""
        safe, self.pending = ("" if self.stopped else self.pending), ""
        return safe

    def _overlap(self, stop: str) -> int:
        """Length of the longest tail of `pending` that is a proper prefix of `stop`."""
        for length in range(min(len(stop) - 1, len(self.pending)), 0, -1):
            if self.pending.endswith(stop[:length]):
                return length
        return 0


def stream(
    model: torch.nn.Module,
    tokenizer: Any,
    prompt: str,
    max_new_tokens: int = DEFAULT_MAX_NEW_TOKENS,
    settings: SamplingSettings | None = None,
    stop_strings: Sequence[str] = (),
    truncate_prompt: bool = False,
    token_steps: TokenSteps | None = None,
) -> Iterator[str]:
    """Yield the new text of one prompt piece by piece as it is generated (never a broken character
    or part of a stop string); the pieces join to what `generate` returns. `token_steps` as in `generate`."""
    if not isinstance(prompt, str):
        raise LlmkitError(f"stream takes one prompt string, got {type(prompt).__name__}; use generate for a batch")
    stop_strings = _check_stop_strings(stop_strings)
    ids = tokenizer.encode(prompt)
    stop_ids = tokenizer_stop_ids(tokenizer)
    steps = (token_steps or generate_tokens)(
        model, ids, max_new_tokens, settings, stop_ids, _pad_id(tokenizer), truncate_prompt
    )
    return _stream_text(steps, StreamDecoder(tokenizer), StopStringFilter(stop_strings), stop_ids)


def _stream_text(
    steps: Iterator[list[int | None]], decoder: Any, stop_filter: StopStringFilter, stop_ids: frozenset[int]
) -> Iterator[str]:
    for (token,) in steps:
        if token in stop_ids:
            break
        text = stop_filter.push(decoder.push(token))
        if text:
            yield text
        if stop_filter.stopped:
            return
    text = stop_filter.push(decoder.flush()) + stop_filter.flush()
    if text:
        yield text
