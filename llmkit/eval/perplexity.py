"""Perplexity of a text with a sliding window (the Hugging Face "perplexity of fixed-length models" scheme).

Windows of `window` tokens start every `stride` tokens; each scores only the tokens after the previous window's end,
so with stride < window every scored token but the first window's sees at least window - stride tokens of context,
and stride == window scores non-overlapping chunks independently. The text's first token has no context and is never
scored (with a BOS-adding tokenizer that token is BOS, so every text token is scored). Over the N scored tokens:

    mean NLL = -(1/N) sum_t log p(x_t | window context)     perplexity = exp(mean NLL)
    bits per byte = -sum_t log p(x_t | ...) / (B ln 2)        byte perplexity = 2 ** bits per byte

where B is the UTF-8 byte count of the text the scored tokens cover. Per-byte figures do not depend on how a
tokenizer splits the text, so models with different tokenizers compare (Gao et al. 2020, The Pile, section 5).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from tqdm.auto import tqdm

from llmkit.errors import LlmkitError
from llmkit.eval.scoring import target_logprobs

TEXT_ENCODING = "utf-8"


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
    window = model.config.max_seq_len if window is None else window
    stride = max(window // 2, 1) if stride is None else stride
    _check_settings(model, window, stride, batch_size, max_tokens)
    ids, n_bytes = _ids_and_scored_bytes(tokenizer, text, max_tokens)
    windows = sliding_windows(len(ids), window, stride)
    device = next(model.parameters()).device
    nll_sum, n_tokens = 0.0, 0
    bar = tqdm(total=len(windows), desc="perplexity", unit="window", disable=not progress)
    for start in range(0, len(windows), batch_size):
        batch = windows[start : start + batch_size]
        # Right padding (only the last window can be shorter) needs no mask: a causal model never looks ahead.
        input_ids = torch.zeros(len(batch), batch[0][2] - batch[0][0], dtype=torch.long)  # (B, window)
        rows, positions, targets = [], [], []
        for row, (begin, first, end) in enumerate(batch):
            input_ids[row, : end - begin] = torch.tensor(ids[begin:end])
            rows += [row] * (end - first)
            positions += range(first - 1 - begin, end - 1 - begin)  # logits at position p predict token p + 1
            targets += ids[first:end]
        logprobs, _ = target_logprobs(
            model, input_ids.to(device), torch.tensor(rows), torch.tensor(positions), torch.tensor(targets), False
        )
        nll_sum -= float(logprobs.sum())
        n_tokens += len(targets)
        bar.update(len(batch))
    bar.close()
    mean_nll = nll_sum / n_tokens
    bits_per_byte = nll_sum / (n_bytes * math.log(2))
    return PerplexityResult(
        n_tokens=n_tokens, n_bytes=n_bytes, nll_sum=nll_sum, mean_nll=mean_nll, perplexity=math.exp(mean_nll),
        bits_per_byte=bits_per_byte, byte_perplexity=2.0**bits_per_byte, window=window, stride=stride,
        n_windows=len(windows),
    )  # fmt: skip


def file_perplexity(model, tokenizer, path: str | Path, **options) -> PerplexityResult:  # noqa: ANN001, ANN003
    """perplexity() of a UTF-8 text file; `options` as for perplexity (window, stride, batch_size, ...)."""
    path = Path(path)
    if not path.is_file():
        raise LlmkitError(f"text file not found: {path}; pass the path of a UTF-8 text file")
    try:
        text = path.read_text(encoding=TEXT_ENCODING)
    except UnicodeDecodeError as error:
        raise LlmkitError(f"{path} is not UTF-8 text ({error}); convert it to UTF-8 first") from None
    if not text:
        raise LlmkitError(f"{path} is empty; perplexity needs a text of at least two tokens")
    return perplexity(model, tokenizer, text, **options)


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


def _ids_and_scored_bytes(tokenizer, text: str, max_tokens: int | None) -> tuple[list[int], int]:  # noqa: ANN001
    """Token ids (the model's BOS rule, cut to max_tokens) and the UTF-8 bytes of the text ids[1:] cover.

    The covered text runs from the first scored text token's start to the last kept token's end, by the tokenizer's
    character offsets (a token holding part of a multi-byte character counts that whole character).
    """
    encoding = tokenizer.backend.encode(text, add_special_tokens=False)  # ids equal tokenizer.encode(text, add_bos=False)
    bos = [tokenizer.bos_id] if tokenizer.add_bos else []
    ids = (bos + encoding.ids)[:max_tokens]
    if len(ids) < 2:
        raise LlmkitError(f"the text has {len(ids)} token(s) ({text[:40]!r}); perplexity needs at least two "
                          "(the first one is only context)")
    first_text_token = 1 - len(bos)  # ids[1] is text token 0 after BOS, else text token 1
    last_text_token = len(ids) - 1 - len(bos)
    start, end = encoding.offsets[first_text_token][0], encoding.offsets[last_text_token][1]
    return ids, len(text[start:end].encode(TEXT_ENCODING))
