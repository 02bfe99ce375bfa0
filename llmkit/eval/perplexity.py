"""Perplexity of a text with a sliding window (the Hugging Face "perplexity of fixed-length models" scheme).

Windows of `window` tokens start every `stride` tokens; each scores only the tokens after the previous window's end,
so with stride < window every scored token but the first window's sees at least window - stride tokens of context,
and stride == window scores non-overlapping chunks independently. The text's first token has no context and is never
scored (with a BOS-adding tokenizer that token is BOS, so every text token is scored). Over the N scored tokens:

    mean NLL = -(1/N) sum_t log p(x_t | window context)     perplexity = exp(mean NLL)
    bits per byte = -sum_t log p(x_t | ...) / (B ln 2)        byte perplexity = 2 ** bits per byte

where B is the UTF-8 byte count of the text the scored tokens cover. Per-byte figures do not depend on how a
tokenizer splits the text, so models with different tokenizers compare (Gao et al. 2020, The Pile, section 5).

A file is read, tokenized and scored in pieces (llmkit/eval/text_stream.py): memory holds one piece of text and the
ids of the windows being scored, never the whole file's text or ids, and the result equals `perplexity` of its text.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Iterator
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from tqdm.auto import tqdm

from llmkit.errors import LlmkitError
from llmkit.eval.scoring import target_logprobs
from llmkit.eval.text_stream import PIECE_BYTES, TEXT_ENCODING, file_pieces, text_tokens


@dataclass(frozen=True)
class PerplexityResult:
    n_tokens: int  # tokens scored
    n_bytes: int  # UTF-8 bytes of the text those tokens cover
    nll_sum: float  # -sum of log p over the scored tokens, in nats
    mean_nll: float  # nll_sum / n_tokens
    perplexity: float  # exp(mean_nll): token-level, depends on the tokenizer
    bits_per_byte: float  # nll_sum / (n_bytes ln 2)
    byte_perplexity: float  # 2 ** bits_per_byte = exp(nll_sum / n_bytes)
    window: int
    stride: int
    n_windows: int

    def to_dict(self) -> dict[str, float | int]:
        return asdict(self)


def perplexity(
    model,  # noqa: ANN001
    tokenizer,  # noqa: ANN001
    text: str,
    window: int | None = None,
    stride: int | None = None,
    batch_size: int = 4,
    progress: bool = False,
    max_tokens: int | None = None,
) -> PerplexityResult:
    """Sliding-window perplexity of `text` (window default: the model's context; stride default: window // 2).

    `max_tokens` keeps only the first tokens of the text (BOS included); `batch_size` windows share one forward.
    """
    return _pieces_perplexity(model, tokenizer, [text], window, stride, batch_size, progress, max_tokens)


def file_perplexity(model, tokenizer, path: str | Path, window: int | None = None, stride: int | None = None,  # noqa: ANN001
                    batch_size: int = 4, progress: bool = False, max_tokens: int | None = None,
                    piece_bytes: int = PIECE_BYTES) -> PerplexityResult:
    """perplexity() of a UTF-8 text file, read and tokenized `piece_bytes` at a time (the same result as the whole
    text at once); a file cut by max_tokens is read only as far as those tokens."""
    path = Path(path)
    if not path.is_file():
        raise LlmkitError(f"text file not found: {path}; pass the path of a UTF-8 text file")
    if path.stat().st_size == 0:
        raise LlmkitError(f"{path} is empty; perplexity needs a text of at least two tokens")
    return _pieces_perplexity(model, tokenizer, file_pieces(path, piece_bytes), window, stride, batch_size, progress,
                              max_tokens)


def _pieces_perplexity(model, tokenizer, pieces: Iterable[str], window: int | None, stride: int | None,  # noqa: ANN001
                       batch_size: int, progress: bool, max_tokens: int | None) -> PerplexityResult:
    """The perplexity of the text `pieces` join into, scoring each batch of windows as soon as its ids are read."""
    window = model.config.max_seq_len if window is None else window
    stride = max(window // 2, 1) if stride is None else stride
    _check_settings(model, window, stride, batch_size, max_tokens)
    scorer, count = WindowScorer(model, window, stride, batch_size, progress), ByteCount()
    for ids in kept_ids(tokenizer, pieces, max_tokens, count):
        scorer.add(ids)
    n_bytes = count.n_bytes
    nll_sum, n_tokens, n_windows = scorer.finish()
    mean_nll = nll_sum / n_tokens
    bits_per_byte = nll_sum / (n_bytes * math.log(2))
    return PerplexityResult(
        n_tokens=n_tokens, n_bytes=n_bytes, nll_sum=nll_sum, mean_nll=mean_nll, perplexity=math.exp(mean_nll),
        bits_per_byte=bits_per_byte, byte_perplexity=2.0**bits_per_byte, window=window, stride=stride,
        n_windows=n_windows,
    )  # fmt: skip


@dataclass
class ByteCount:
    """Filled in by `kept_ids` once the text ends: the UTF-8 bytes of the text the scored tokens cover."""

    n_bytes: int = 0


def kept_ids(tokenizer, pieces: Iterable[str], max_tokens: int | None, count: ByteCount) -> Iterator[list[int]]:  # noqa: ANN001
    """The ids to score, in runs as the pieces are tokenized: the model's BOS rule, cut to max_tokens (reading no
    further). At the end `count.n_bytes` is the bytes of the text ids[1:] cover: from the first scored text token's
    start to the last kept token's end, by the tokenizer's character offsets (a token holding part of a multi-byte
    character counts that whole character).

    Raises:
        LlmkitError: fewer than two tokens.
    """
    bos = [tokenizer.bos_id] if tokenizer.add_bos else []
    yield bos
    first_scored = 1 - len(bos)  # the first scored text token: text token 0 after BOS, else text token 1
    head, total, scored_from = "", len(bos), None  # scored_from: the character where that token starts
    n_bytes, after_end = 0, 0  # UTF-8 bytes of the runs from scored_from on; of them, those after the last kept token
    for run in text_tokens(tokenizer, pieces):
        head = head or run.text[:40]
        room = len(run.ids) if max_tokens is None else min(len(run.ids), max_tokens - total)
        if scored_from is None and total - len(bos) + room > first_scored:
            scored_from = run.spans[first_scored - (total - len(bos))][0]
        yield run.ids[:room]
        total += room
        if scored_from is not None:
            counted = len(run.text[max(scored_from - run.start, 0) :].encode(TEXT_ENCODING))
            n_bytes += counted
            after_end = len(run.text[run.spans[room - 1][1] - run.start :].encode(TEXT_ENCODING)) if room else \
                after_end + counted
        if max_tokens is not None and total >= max_tokens:
            break
    if total < 2:
        raise LlmkitError(f"the text has {total} token(s) ({head!r}); perplexity needs at least two "
                          "(the first one is only context)")
    count.n_bytes = n_bytes - after_end


def _ids_and_scored_bytes(tokenizer, text: str, max_tokens: int | None) -> tuple[list[int], int]:  # noqa: ANN001
    """All the ids of `text` to score (kept_ids) and the bytes they cover, for callers that need the ids at once."""
    count = ByteCount()
    ids = [token for run in kept_ids(tokenizer, [text], max_tokens, count) for token in run]
    return ids, count.n_bytes


class WindowScorer:
    """Scores `sliding_windows` over ids that arrive in runs: a window is scored once its ids are all there (in
    batches of `batch_size`, the same batches as over the whole list), and ids no window still needs are dropped."""

    def __init__(self, model, window: int, stride: int, batch_size: int, progress: bool) -> None:  # noqa: ANN001
        self.model, self.window, self.stride, self.batch_size = model, window, stride, batch_size
        self.device = next(model.parameters()).device
        self.ids: list[int] = []  # ids[base:] of the text
        self.base = self.total = 0
        self.next_begin = self.previous_end = 0  # the next window's begin; the last window's end
        self.batch: list[tuple[int, int, int]] = []
        self.nll_sum, self.n_tokens, self.n_windows = 0.0, 0, 0
        self.bar = tqdm(desc="perplexity", unit="window", disable=not progress)

    def add(self, ids: list[int]) -> None:
        """Append ids; score every batch of windows that now lies wholly inside the ids seen."""
        self.ids += ids
        self.total += len(ids)
        while self.next_begin + self.window <= self.total:
            self._plan(self.next_begin + self.window)

    def finish(self) -> tuple[float, int, int]:
        """Score the windows left (the last ones end at the text's end): (nll sum, tokens scored, windows)."""
        while self.next_begin < self.total and self.previous_end < self.total:
            self._plan(min(self.next_begin + self.window, self.total))
        self._score()
        self.bar.close()
        return self.nll_sum, self.n_tokens, self.n_windows

    def _plan(self, end: int) -> None:
        """sliding_windows' step: the window at next_begin ending at `end`, scoring what the previous one did not."""
        begin = self.next_begin
        first = max(self.previous_end, begin + 1)  # a window's first token has no context inside it
        if first < end:
            self.batch.append((begin, first, end))
        self.previous_end, self.next_begin = end, begin + self.stride
        if len(self.batch) == self.batch_size:
            self._score()

    def _score(self) -> None:
        if not self.batch:
            return
        batch, ids, base = self.batch, self.ids, self.base
        # Right padding (only the last window can be shorter) needs no mask: a causal model never looks ahead.
        input_ids = torch.zeros(len(batch), batch[0][2] - batch[0][0], dtype=torch.long)  # (B, window)
        rows, positions, targets = [], [], []
        for row, (begin, first, end) in enumerate(batch):
            input_ids[row, : end - begin] = torch.tensor(ids[begin - base : end - base])
            rows += [row] * (end - first)
            positions += range(first - 1 - begin, end - 1 - begin)  # logits at position p predict token p + 1
            targets += ids[first - base : end - base]
        logprobs, _ = target_logprobs(
            self.model, input_ids.to(self.device), torch.tensor(rows), torch.tensor(positions), torch.tensor(targets),
            False,
        )
        self.nll_sum -= float(logprobs.sum())
        self.n_tokens += len(targets)
        self.n_windows += len(batch)
        self.bar.update(len(batch))
        self.batch = []
        keep_from = min(self.next_begin, self.total)  # no later window reads an id before its begin
        del self.ids[: keep_from - self.base]
        self.base = keep_from


def sliding_windows(n_tokens: int, window: int, stride: int) -> list[tuple[int, int, int]]:
    """(begin, first scored, end) of each window over `n_tokens` ids: it reads ids[begin:end], scores ids[first:end]."""
    windows, previous_end = [], 0
    for begin in range(0, n_tokens, stride):
        end = min(begin + window, n_tokens)
        first = max(previous_end, begin + 1)  # a window's first token has no context inside it
        if first < end:
            windows.append((begin, first, end))
        previous_end = end
        if end == n_tokens:
            break
    return windows


def _check_settings(model, window: int, stride: int, batch_size: int, max_tokens: int | None) -> None:  # noqa: ANN001
    context = model.config.max_seq_len
    if not 2 <= window <= context:
        raise LlmkitError(f"window is {window} tokens but {model.config.name}'s context is {context}; "
                          f"pass a window from 2 to {context}")
    if not 1 <= stride <= window:
        raise LlmkitError(f"stride is {stride}; pass a stride from 1 to the window ({window}): a larger stride would "
                          "leave tokens unscored")
    if batch_size < 1:
        raise LlmkitError(f"batch_size is {batch_size}; pass 1 or more")
    if max_tokens is not None and max_tokens < 2:
        raise LlmkitError(f"max_tokens is {max_tokens}; pass 2 or more (the first token is never scored)")
