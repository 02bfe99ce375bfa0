"""Log-likelihood scoring: log p(continuation | context) summed over the continuation's tokens.

Multiple-choice tasks and the lm-eval adapter call `continuation_logprobs`. Tokenization follows lm-eval-harness
(`LM._encode_pair` for causal models): trailing whitespace of the context moves to the front of the continuation,
the whole string context + continuation is encoded and split where encode(context) ends, so the continuation gets
the tokens a model reading the joined text would see; an empty context is replaced by one prefix token (BOS, else
EOS). Over-long inputs keep their last max_seq_len tokens, as lm-eval does: (context + continuation)[-(L + 1):][:-1].

Speed: requests whose model input is identical (same context, continuations differing only in their last token,
e.g. " positive" / " negative") share one row of the batch (lm-eval's one-token-continuation cache, generalised);
rows are sorted longest first so a batch pads little; a Decoder's LM head runs only at the scored positions.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from llmkit.errors import LlmkitError

HEAD_CHUNK_TOKENS = 512  # positions sent through the LM head at once: 512 x 49,152 float32 logits = 100 MB


@dataclass(frozen=True)
class ContinuationScore:
    logprob: float  # sum over the continuation's tokens of log p(token | everything before), natural log
    is_greedy: bool  # every continuation token is the argmax of its distribution (greedy decoding would give it)
    n_tokens: int  # continuation tokens scored (for per-token normalisation)
    n_bytes: int  # UTF-8 bytes of the continuation string as given (for lm-eval's acc_bytes normalisation)


def continuation_logprobs(
    model, tokenizer, requests: Sequence[tuple[str, str]], batch_size: int = 8, progress: bool = False  # noqa: ANN001
) -> list[ContinuationScore]:
    """Score each (context, continuation) pair with `model`; results come back in the order of `requests`."""
    pairs = encode_pairs(tokenizer, requests)
    scores = score_token_pairs(model, pairs, batch_size, progress)
    return [
        ContinuationScore(logprob, greedy, len(continuation_ids), len(continuation.encode("utf-8")))
        for (logprob, greedy), (_, continuation_ids), (_, continuation) in zip(scores, pairs, requests)
    ]


def encode_pairs(tokenizer, requests: Sequence[tuple[str, str]]) -> list[tuple[list[int], list[int]]]:  # noqa: ANN001
    """(context ids, continuation ids) of each request, split as lm-eval-harness splits them (see module docstring)."""
    contexts, wholes = [], []
    for context, continuation in requests:
        n_spaces = len(context) - len(context.rstrip())
        if n_spaces:  # " positive" after "Sentiment:" tokenizes as the model saw it in training
            context, continuation = context[:-n_spaces], context[-n_spaces:] + continuation
        contexts.append(context)
        wholes.append(context + continuation)
    context_ids = tokenizer.encode_batch(contexts)
    whole_ids = tokenizer.encode_batch(wholes)
    pairs = []
    for index, (context, context_enc, whole_enc) in enumerate(zip(contexts, context_ids, whole_ids)):
        if context:
            continuation_enc = whole_enc[len(context_enc) :]
        else:  # nothing to condition on: one prefix token, unless the continuation already starts with it
            prefix, bare = _prefix_token_id(tokenizer), tokenizer.encode(wholes[index], add_bos=False)
            context_enc, continuation_enc = ([prefix], bare[1:]) if bare[:1] == [prefix] else ([prefix], bare)
        if not continuation_enc:
            raise LlmkitError(
                f"request {index}: the continuation {requests[index][1]!r} has no tokens of its own once joined to its "
                "context (the tokenizer merges it into the context's last token); end the context at a word boundary"
            )
        pairs.append((list(context_enc), list(continuation_enc)))
    return pairs


def score_token_pairs(
    model, pairs: Sequence[tuple[Sequence[int], Sequence[int]]], batch_size: int = 8, progress: bool = False  # noqa: ANN001
) -> list[tuple[float, bool]]:
    """(sum of log p(continuation ids | context ids), is_greedy) per (context ids, continuation ids) pair."""
    return [(sum(logprobs), greedy) for logprobs, greedy in token_logprobs_of_pairs(model, pairs, batch_size, progress)]


def token_logprobs_of_pairs(
    model, pairs: Sequence[tuple[Sequence[int], Sequence[int]]], batch_size: int = 8, progress: bool = False  # noqa: ANN001
) -> list[tuple[list[float], bool]]:
    """(log p of each continuation token given everything before it, is_greedy) per (context ids, continuation ids)
    pair: what score_token_pairs sums, kept per token (a cascade's scorer wants the mean and the minimum)."""
    if batch_size < 1:
        raise LlmkitError(f"batch_size is {batch_size}; pass 1 or more")
    max_len = model.config.max_seq_len
    rows: dict[tuple[int, ...], list[int]] = {}  # model input -> indices of the pairs it serves
    for index, (context_ids, continuation_ids) in enumerate(pairs):
        if not continuation_ids or not context_ids:
            raise LlmkitError(f"request {index} has {len(context_ids)} context and {len(continuation_ids)} continuation "
                              "tokens; both need at least one (use encode_pairs, which adds a prefix token)")
        if len(continuation_ids) > max_len:
            raise LlmkitError(
                f"request {index}: its continuation has {len(continuation_ids)} tokens (context {len(context_ids)}) but "
                f"{model.config.name}'s context window is {max_len} tokens; shorten the continuation"
            )
        inputs = (list(context_ids) + list(continuation_ids))[-(max_len + 1) :][:-1]  # left-truncated, last token dropped
        rows.setdefault(tuple(inputs), []).append(index)

    results: list[tuple[list[float], bool] | None] = [None] * len(pairs)
    ordered = sorted(rows.items(), key=lambda item: -len(item[0]))  # longest first: equal lengths batch together
    device = next(model.parameters()).device
    bar = tqdm(total=len(pairs), desc="scoring continuations", unit="request", disable=not progress)
    for start in range(0, len(ordered), batch_size):
        batch = ordered[start : start + batch_size]
        width = len(batch[0][0])
        # Right padding needs no attention mask: a causal model's real tokens never attend to later positions.
        input_ids = torch.zeros(len(batch), width, dtype=torch.long)  # (B, T)
        row_of, position_of, target_of, owners = [], [], [], []  # one entry per scored token
        for row, (inputs, indices) in enumerate(batch):
            input_ids[row, : len(inputs)] = torch.tensor(inputs)
            for index in indices:
                continuation_ids = pairs[index][1]
                first = len(inputs) - len(continuation_ids)  # logits at position p predict token p + 1
                row_of += [row] * len(continuation_ids)
                position_of += range(first, len(inputs))
                target_of += continuation_ids
                owners += [index] * len(continuation_ids)
        logprobs, greedy = target_logprobs(
            model, input_ids.to(device), torch.tensor(row_of), torch.tensor(position_of), torch.tensor(target_of)
        )
        totals: dict[int, list] = {}
        for owner, logprob, is_greedy in zip(owners, logprobs.tolist(), greedy.tolist()):
            total = totals.setdefault(owner, [[], True])
            total[0].append(logprob)
            total[1] = total[1] and is_greedy
        for index, (logprobs_of_pair, is_greedy) in totals.items():
            results[index] = (logprobs_of_pair, is_greedy)
        bar.update(len(totals))
    bar.close()
    return results  # type: ignore[return-value]  # every index was filled: each pair belongs to one row


@torch.inference_mode()
def target_logprobs(
    model,  # noqa: ANN001
    input_ids: torch.Tensor,
    rows: torch.Tensor,
    positions: torch.Tensor,
    targets: torch.Tensor,
    with_greedy: bool = True,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """log p(targets[i] | input_ids[rows[i], :positions[i] + 1]) as float64 (N,), and whether each is the argmax (N,)
    (None without `with_greedy`).

    A model with `hidden_states` and `head` (Decoder) runs the LM head only at the N scored positions; any other
    model is called for full logits (B, T, V). Logits are made float32; cross_entropy is torch's fused log-softmax.
    """
    device = input_ids.device
    rows, positions, targets = rows.to(device), positions.to(device), targets.to(device)
    if hasattr(model, "hidden_states") and hasattr(model, "head"):
        selected, head = model.hidden_states(input_ids)[rows, positions], model.head  # (N, C)
    else:
        selected, head = model(input_ids)[rows, positions], (lambda logits: logits)  # (N, V)
    logprobs, greedy = [], []
    for start in range(0, len(targets), HEAD_CHUNK_TOKENS):
        logits = head(selected[start : start + HEAD_CHUNK_TOKENS]).float()  # (n, V)
        chunk_targets = targets[start : start + HEAD_CHUNK_TOKENS]  # (n,)
        logprobs.append(-F.cross_entropy(logits, chunk_targets, reduction="none").double())
        if with_greedy:
            greedy.append(logits.argmax(-1) == chunk_targets)
    return torch.cat(logprobs).cpu(), torch.cat(greedy).cpu() if with_greedy else None


def rolling_loglikelihood(
    model, tokenizer, text: str, window: int | None = None, batch_size: int = 8, progress: bool = False  # noqa: ANN001
) -> float:
    """log p(text), every token scored once, as lm-eval's loglikelihood_rolling: disjoint windows of `window` tokens
    (default: the model's context), the first token conditioned on a prefix token (BOS, else EOS)."""
    window = model.config.max_seq_len if window is None else window
    if not 1 <= window <= model.config.max_seq_len:
        raise LlmkitError(f"window is {window}; pass 1 to {model.config.max_seq_len} ({model.config.name}'s context)")
    ids = tokenizer.encode(text, add_bos=False)
    if not ids:
        raise LlmkitError("rolling_loglikelihood got an empty text; pass text with at least one token")
    # lm-eval's get_rolling_token_windows(context_len=1) + make_disjoint_window: window k scores tokens
    # [k * window, (k + 1) * window) given the tokens before them in a `window`-token input (prefix token for the
    # first); so a short last window sees more context.
    pairs = []
    for start in range(0, len(ids), window):
        end = min(start + window, len(ids))
        context = ids[max(end - window - 1, 0) : start] if start else [_prefix_token_id(tokenizer)]
        pairs.append((context, ids[start:end]))
    return sum(logprob for logprob, _ in score_token_pairs(model, pairs, batch_size, progress))


def _prefix_token_id(tokenizer) -> int:  # noqa: ANN001
    """The token an empty context becomes: BOS, else EOS (lm-eval's prefix_token_id)."""
    for token_id in (tokenizer.bos_id, tokenizer.eos_id):
        if token_id is not None:
            return token_id
    raise LlmkitError("an empty context needs a prefix token but the tokenizer has neither BOS nor EOS; "
                      "give every request a non-empty context")
