"""How closely a model (e.g. a quantized one) follows a reference model (its float original) on the same inputs.

Next-token distributions: the statistics of llama.cpp's `llama-perplexity --kl-divergence`. At each scored position t,
with reference distribution p_t = softmax(z_ref,t), candidate q_t = softmax(z_t) and the text's next token x_t:

    KLD_t      = sum_v p_t(v) (log p_t(v) - log q_t(v))      >= 0, and 0 exactly when q_t == p_t
    same top_t = [argmax_v p_t(v) == argmax_v q_t(v)]       llama.cpp's "Same top p" (= top-1 agreement)
    dp_t       = q_t(x_t) - p_t(x_t)                        llama.cpp's Δp: change in the probability of the text

summarised over positions as mean KLD, its median, 99th percentile and maximum (quantiles with linear interpolation),
top-1 agreement (mean of same top), mean and RMS of dp. Logits are compared in float64 chunks of rows, so a
candidate's (N, V) logits never exist in full beside the reference's.

`score_text` runs the sliding windows of eval/perplexity.py (one forward per window) and keeps the reference's logits;
`compare_to_reference` runs a candidate through the same windows, so perplexity and agreement come from one forward.

Sentence embeddings (encoders): mean cosine of each text's embedding with the reference's, and retrieval agreement,
the share of texts whose nearest other text (cosine) is the one the reference finds.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F

from llmkit.errors import LlmkitError
from llmkit.eval.perplexity import _check_settings, _ids_and_scored_bytes, sliding_windows
from llmkit.eval.scoring import HEAD_CHUNK_TOKENS

CHUNK_ROWS = 64  # positions compared at once: 64 x 49,152 float64 values = 25 MB per temporary


@dataclass(frozen=True)
class PositionStats:
    """Per scored position (n,): KL(p_ref || q), whether the top-1 tokens agree, and (given targets) dp and the
    candidate's negative log-likelihood of the target."""

    kld: torch.Tensor  # (n,) float64
    same_top: torch.Tensor  # (n,) bool
    delta_p: torch.Tensor | None = None  # (n,) float64
    nll: torch.Tensor | None = None  # (n,) float64, -log q(x_t)

    @staticmethod
    def concat(parts: list[PositionStats]) -> PositionStats:
        def cat(name: str) -> torch.Tensor | None:
            values = [getattr(part, name) for part in parts]
            return None if any(value is None for value in values) else torch.cat(values)

        return PositionStats(cat("kld"), cat("same_top"), cat("delta_p"), cat("nll"))


@dataclass(frozen=True)
class Agreement:
    n_positions: int
    mean_kld: float
    median_kld: float
    p99_kld: float
    max_kld: float
    top1_agreement: float  # llama.cpp's "same top p", as a fraction
    mean_delta_p: float | None  # mean of q(x_t) - p(x_t): negative when the candidate gives the text less probability
    rms_delta_p: float | None

    def to_dict(self) -> dict[str, float | int | None]:
        return asdict(self)


def position_stats(logits_ref: torch.Tensor, logits: torch.Tensor, targets: torch.Tensor | None = None,
                   chunk_rows: int = CHUNK_ROWS) -> PositionStats:
    """Per-position statistics of candidate `logits` (N, V) against `logits_ref` (N, V), in float64 chunks."""
    if logits_ref.shape != logits.shape or logits.dim() != 2:
        raise LlmkitError(f"logits of shape {tuple(logits.shape)} do not match the reference's "
                          f"{tuple(logits_ref.shape)}; both must be (positions, vocabulary) from the same inputs")
    if targets is not None and targets.shape != logits.shape[:1]:
        raise LlmkitError(f"targets of shape {tuple(targets.shape)} do not match {logits.shape[0]} positions")
    parts = []
    for start in range(0, logits.shape[0], chunk_rows):
        log_p = torch.log_softmax(logits_ref[start:start + chunk_rows].double(), dim=-1)  # (n, V)
        log_q = torch.log_softmax(logits[start:start + chunk_rows].double(), dim=-1)  # (n, V)
        kld = (log_p.exp() * (log_p - log_q)).sum(-1)  # (n,)
        same_top = log_p.argmax(-1) == log_q.argmax(-1)
        delta_p = nll = None
        if targets is not None:
            index = targets[start:start + chunk_rows, None].to(log_p.device)  # (n, 1)
            target_p, target_q = log_p.gather(1, index)[:, 0], log_q.gather(1, index)[:, 0]
            delta_p, nll = target_q.exp() - target_p.exp(), -target_q
        parts.append(PositionStats(kld.cpu(), same_top.cpu(), None if delta_p is None else delta_p.cpu(),
                                   None if nll is None else nll.cpu()))
    return PositionStats.concat(parts)


def summarize(stats: PositionStats) -> Agreement:
    """Agreement over all positions of `stats`."""
    kld = stats.kld
    if kld.numel() == 0:
        raise LlmkitError("no positions to compare; score a text of at least two tokens")
    quantiles = torch.quantile(kld, torch.tensor([0.5, 0.99], dtype=kld.dtype))
    dp = stats.delta_p
    return Agreement(
        n_positions=kld.numel(), mean_kld=float(kld.mean()), median_kld=float(quantiles[0]),
        p99_kld=float(quantiles[1]), max_kld=float(kld.max()), top1_agreement=float(stats.same_top.double().mean()),
        mean_delta_p=None if dp is None else float(dp.mean()),
        rms_delta_p=None if dp is None else float(dp.square().mean().sqrt()),
    )  # fmt: skip


def token_agreement(logits_ref: torch.Tensor, logits: torch.Tensor, targets: torch.Tensor | None = None,
                    chunk_rows: int = CHUNK_ROWS) -> Agreement:
    """KLD / top-1 / dp statistics of candidate `logits` (N, V) against `logits_ref` (N, V) (module docstring)."""
    return summarize(position_stats(logits_ref, logits, targets, chunk_rows))


# ----------------------------------------------------------------------------- scoring a text with two models


@dataclass(frozen=True)
class ScoredText:
    """A reference model's logits at every scored position of a text, and what is needed to score a candidate the
    same way: the ids, the windows and the targets."""

    ids: list[int]
    window: int
    stride: int
    logits: torch.Tensor  # (N, V) float32, the reference's logits at the N scored positions
    targets: torch.Tensor  # (N,) the token each position predicts
    perplexity: float  # the reference's: exp(mean -log p(x_t))


def window_logits(model, ids: list[int], window: int, stride: int) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:  # noqa: ANN001
    """(logits (n, V) float32, targets (n,)) of the scored positions, window by window (eval/perplexity.py's
    windows), at most HEAD_CHUNK_TOKENS positions at a time. A model with `hidden_states` and `head` (Decoder)
    runs its LM head only at the scored positions."""
    device = next(model.parameters()).device
    with torch.inference_mode():
        for begin, first, end in sliding_windows(len(ids), window, stride):
            input_ids = torch.tensor([ids[begin:end]], device=device)  # (1, T)
            positions = torch.arange(first - 1 - begin, end - 1 - begin, device=device)  # position p predicts p + 1
            targets = torch.tensor(ids[first:end])
            if hasattr(model, "hidden_states") and hasattr(model, "head"):
                selected, head = model.hidden_states(input_ids)[0, positions], model.head  # (n, C)
            else:
                selected, head = model(input_ids)[0, positions], (lambda logits: logits)  # (n, V)
            for start in range(0, len(targets), HEAD_CHUNK_TOKENS):
                logits = head(selected[start:start + HEAD_CHUNK_TOKENS]).float().cpu()  # (n, V)
                yield logits, targets[start:start + HEAD_CHUNK_TOKENS]


def score_text(model, tokenizer, text: str, window: int | None = None, stride: int | None = None,  # noqa: ANN001
               max_tokens: int | None = None) -> ScoredText:
    """The reference pass: `model`'s logits over `text` with perplexity()'s windows (window default: the model's
    context; stride default: window // 2; the first `max_tokens` tokens). Holds (N, V) float32 logits."""
    window = model.config.max_seq_len if window is None else window
    stride = max(window // 2, 1) if stride is None else stride
    _check_settings(model, window, stride, 1, max_tokens)
    ids, _ = _ids_and_scored_bytes(tokenizer, text, max_tokens)
    chunks = list(window_logits(model, ids, window, stride))
    logits, targets = torch.cat([c[0] for c in chunks]), torch.cat([c[1] for c in chunks])
    nll = -torch.log_softmax(logits.double(), dim=-1).gather(1, targets[:, None])[:, 0]
    return ScoredText(ids, window, stride, logits, targets, math.exp(float(nll.mean())))


def compare_to_reference(model, reference: ScoredText) -> tuple[Agreement, float]:  # noqa: ANN001
    """(agreement with the reference, the candidate's perplexity) on the reference's text and windows; the
    candidate's logits are compared chunk by chunk as they come."""
    parts, offset = [], 0
    for logits, targets in window_logits(model, reference.ids, reference.window, reference.stride):
        ref = reference.logits[offset:offset + len(targets)]
        parts.append(position_stats(ref, logits, targets))
        offset += len(targets)
    stats = PositionStats.concat(parts)
    return summarize(stats), math.exp(float(stats.nll.mean()))


# ----------------------------------------------------------------------------- sentence embeddings


@dataclass(frozen=True)
class EmbeddingAgreement:
    n_texts: int
    mean_cosine: float  # mean over texts of cos(e_ref, e)
    min_cosine: float
    retrieval_agreement: float  # share of texts whose nearest other text is the reference's nearest

    def to_dict(self) -> dict[str, float | int]:
        return asdict(self)


def nearest_neighbours(embeddings: torch.Tensor) -> torch.Tensor:
    """For each row of (N, C), the index of the most cosine-similar other row (N,)."""
    unit = F.normalize(embeddings.double(), dim=-1)
    similarity = unit @ unit.T  # (N, N)
    similarity.fill_diagonal_(-math.inf)
    return similarity.argmax(-1)


def embedding_agreement(reference: torch.Tensor, embeddings: torch.Tensor) -> EmbeddingAgreement:
    """Cosine and nearest-neighbour agreement of `embeddings` (N, C) with `reference` (N, C), N >= 2."""
    if reference.shape != embeddings.shape or reference.dim() != 2 or reference.shape[0] < 2:
        raise LlmkitError(f"embeddings of shape {tuple(embeddings.shape)} and reference {tuple(reference.shape)}: "
                          "pass two (N, C) matrices of the same texts, N >= 2")
    cosine = F.cosine_similarity(reference.double(), embeddings.double(), dim=-1)  # (N,)
    same = nearest_neighbours(reference) == nearest_neighbours(embeddings)
    return EmbeddingAgreement(reference.shape[0], float(cosine.mean()), float(cosine.min()), float(same.double().mean()))
