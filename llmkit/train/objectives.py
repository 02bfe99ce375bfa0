"""Objectives: functions from (model, batch) to a `TokenLoss`, the *sum* of the batch's token losses and the number of
label tokens it counted. The loop only ever calls one of these, so pretraining, fine-tuning and the later objectives
share every other part of training.

Why sums, not means: one optimizer step sees several micro-batches (gradient accumulation) on several processes
(DDP). Its loss is the mean over all label tokens of the step,

    L = sum_{micro-batch m, rank r} S_{m,r} / N,    N = sum_{m,r} n_{m,r}

(S: summed token losses, n: label tokens of one micro-batch), which the loop gets by dividing each micro-batch's sum
by the step's global N. Averaging per-micro-batch means instead weighs a fine-tuning batch with 3 completion tokens
as much as one with 300 (the bug transformers fixed in 2024, torchtune likewise).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn

from llmkit.data.batch import IGNORE_INDEX, Batch
from llmkit.errors import LlmkitError
from llmkit.models.decoder import Decoder
from llmkit.nn.linear import Linear
from llmkit.nn.moe import moe_aux_loss, moe_layers
from llmkit.train.chunked_loss import linear_cross_entropy
from llmkit.train.metrics import CROSS_ENTROPY


@dataclass
class TokenLoss:
    """What an objective returns for one batch.

    total: sum of the per-token losses over the label tokens (0-dim, float32).
    tokens: how many label tokens `total` sums over (0-dim integer): the labels that are not IGNORE_INDEX, so the
        loop can count them from the batch before any forward pass (`label_tokens`).
    aux: a loss that is already a mean for this batch and is not weighed by tokens (a mixture-of-experts layer's
        load-balancing and z-losses, while training), or None.
    metrics: quantities to log beside the loss, each a 0-dim *sum* over the same units as `total` (a pairwise
        objective's reward margins, say); the loop logs each as sum / N over the step, like the loss. Or None.
    """

    total: torch.Tensor
    tokens: torch.Tensor
    aux: torch.Tensor | None = None
    metrics: dict[str, torch.Tensor] | None = None

    def mean(self) -> torch.Tensor:
        """The batch's mean token loss plus its auxiliary loss: total / tokens + aux (what a single batch trains on)."""
        mean = self.total / self.tokens
        return mean if self.aux is None else mean + self.aux


Objective = Callable[[nn.Module, Batch], TokenLoss]


def loss_label(objective: Objective) -> str:
    """What an objective's loss measures, for logs and plots. An objective whose loss is not a per-token
    cross-entropy (a pairwise preference loss, a distillation divergence) says so in a `loss_label` attribute; the
    loop reports a validation perplexity, exp(loss), only for cross-entropy, where it means something."""
    return getattr(objective, "loss_label", CROSS_ENTROPY)


def label_tokens(batch: Batch) -> torch.Tensor:
    """Number of label tokens a batch's loss averages over: labels that are not IGNORE_INDEX (0-dim integer)."""
    return (batch["labels"] != IGNORE_INDEX).sum()


def causal_lm_batch(tokens: torch.Tensor) -> Batch:
    """Inputs and next-token labels from windows of T+1 tokens (B, T+1)."""
    return {"input_ids": tokens[:, :-1], "labels": tokens[:, 1:]}


def causal_lm_loss(model: nn.Module, batch: Batch) -> TokenLoss:
    """Summed next-token cross-entropy over labels that are not IGNORE_INDEX (computed in float32); while training,
    the load-balancing and z-losses of mixture-of-experts layers ride along as `aux` (validation sees cross-entropy
    alone). `.mean()` is the usual mean loss."""
    packed = {"document_ids": batch["document_ids"]} if "document_ids" in batch else {}  # packed SFT rows
    labels = batch["labels"]
    if is_compiled(model):  # static shapes: logits everywhere, ignored positions masked in the loss
        logits = model(batch["input_ids"], attention_mask=batch.get("attention_mask"), **packed)  # (B, T, V)
        total = token_cross_entropy(logits, labels, reduction="sum")
    else:  # the LM head only where a label counts (SFT: the completion, often a tenth of the tokens)
        scored = labels != IGNORE_INDEX  # (B, T)
        logits = model(batch["input_ids"], attention_mask=batch.get("attention_mask"), logits_at=scored, **packed)
        total = F.cross_entropy(logits.float(), labels[scored], reduction="sum")  # logits (N, V)
    aux = moe_aux_loss(model) if model.training and moe_layers(model) else None
    return TokenLoss(total, label_tokens(batch), aux)


def causal_lm_objective(loss_chunk: int = 0) -> Objective:
    """`causal_lm_loss`, or with `loss_chunk` > 0 the same loss through the chunked LM head + cross-entropy
    (llmkit/train/chunked_loss.py: the (tokens x vocab) logits never exist in full; same value and gradients).
    Models whose head is not a plain matrix (quantized, adapted, packed) or whose forward is not the Decoder's
    (prompt tuning) keep the plain path."""
    if loss_chunk < 0:
        raise LlmkitError(f"--train.loss_chunk {loss_chunk} must be 0 (plain LM head) or a number of tokens per chunk")
    if loss_chunk == 0:
        return causal_lm_loss

    def chunked_causal_lm_loss(model: nn.Module, batch: Batch) -> TokenLoss:
        weight = plain_head_weight(model)
        if weight is None:
            return causal_lm_loss(model, batch)
        labels = batch["labels"]
        scored = labels != IGNORE_INDEX  # (B, T)
        packed = {"document_ids": batch["document_ids"]} if "document_ids" in batch else {}
        hidden = model.hidden_states(batch["input_ids"], attention_mask=batch.get("attention_mask"), **packed)
        normed = model.final_norm(hidden[scored])  # (N, C)
        total = linear_cross_entropy(normed, weight, labels[scored], loss_chunk)
        aux = moe_aux_loss(model) if model.training and moe_layers(model) else None
        return TokenLoss(total, label_tokens(batch), aux)

    return chunked_causal_lm_loss


def plain_head_weight(model: nn.Module) -> torch.Tensor | None:
    """The LM head's (V, C) float weight of a Decoder whose logits are final_norm(h) @ W^T, else None."""
    if type(model).forward is not Decoder.forward or type(model).head is not Decoder.head or model.head_packed is not None:
        return None
    if model.lm_head is None:
        weight = getattr(model.embed, "weight", None)
        return weight if type(model.embed) is nn.Embedding and weight is not None and weight.is_floating_point() else None
    head = model.lm_head
    return head.weight if type(head) is Linear and head.bias is None and head.packed is None else None


def is_compiled(model: nn.Module) -> bool:
    """A torch.compile'd module (OptimizedModule keeps the original as _orig_mod)."""
    return hasattr(model, "_orig_mod")


def token_cross_entropy(
    logits: torch.Tensor, labels: torch.Tensor, reduction: Literal["mean", "sum"] = "mean", label_smoothing: float = 0.0
) -> torch.Tensor:
    """Cross-entropy of logits (B, T, V) against labels (B, T), mean or sum over the labels that are not
    IGNORE_INDEX (label-smoothed by `label_smoothing`, see `seq2seq_objective`); float32 whatever the autocast
    dtype."""
    return F.cross_entropy(logits.flatten(0, 1).float(), labels.flatten(), ignore_index=IGNORE_INDEX,
                           reduction=reduction, label_smoothing=label_smoothing)


# --------------------------------------------------------------------------- masked language modelling (BERT)

MASK_SHARE, RANDOM_SHARE = 0.8, 0.1  # of the chosen tokens: 80% -> [MASK], 10% -> a random token, 10% kept


def masked_lm_batch(
    tokens: torch.Tensor,
    mask_id: int,
    vocab_size: int,
    special_ids: set[int] | list[int],
    generator: torch.Generator | None = None,
    mask_probability: float = 0.15,
) -> Batch:
    """BERT's corruption (Devlin et al. 2019) of token ids (B, T): each non-special token is chosen with
    `mask_probability`; a chosen token becomes [MASK] (80%), a random non-special token (10%) or stays (10%).
    Labels hold the original id where chosen and IGNORE_INDEX elsewhere, so the loss sees only chosen tokens."""
    if not 0 < mask_probability <= 1:
        raise LlmkitError(f"mask_probability={mask_probability} must be in (0, 1]; BERT uses 0.15")
    special = torch.zeros(vocab_size, dtype=torch.bool)
    for token_id in {*special_ids, mask_id}:
        if not 0 <= token_id < vocab_size:
            raise LlmkitError(f"special token id {token_id} is outside the vocabulary of {vocab_size} tokens; pass "
                              "the tokenizer's ids and its vocab_size")
        special[token_id] = True
    ordinary = (~special).nonzero().squeeze(1)  # ids a random replacement may take
    if len(ordinary) == 0:
        raise LlmkitError(f"every one of the {vocab_size} token ids is special; nothing is left to predict")
    device = tokens.device
    chosen = (torch.rand(tokens.shape, generator=generator) < mask_probability).to(device) & ~special.to(device)[tokens]
    action = torch.rand(tokens.shape, generator=generator).to(device)  # one draw picks mask / random / keep
    replacements = ordinary[torch.randint(len(ordinary), tokens.shape, generator=generator)].to(device)
    input_ids = torch.where(chosen & (action < MASK_SHARE), mask_id, tokens)
    input_ids = torch.where(chosen & (action >= MASK_SHARE) & (action < MASK_SHARE + RANDOM_SHARE), replacements,
                            input_ids)
    return {"input_ids": input_ids, "labels": torch.where(chosen, tokens, IGNORE_INDEX)}


def masked_lm_loss(model: nn.Module, batch: Batch) -> TokenLoss:
    """Summed cross-entropy at the chosen tokens only (the label tokens); the model (models.encoder.MaskedLM)
    computes its vocabulary projection just there (`selected`), not over the whole sequence."""
    selected = batch["labels"] != IGNORE_INDEX  # (B, T)
    if not bool(selected.any()):
        raise LlmkitError("this masked-LM batch has no chosen token to predict; use longer sequences, a bigger batch "
                          "or a larger mask_probability")
    logits = model(batch["input_ids"], attention_mask=batch.get("attention_mask"), selected=selected)  # (N, V)
    total = F.cross_entropy(logits.float(), batch["labels"][selected], reduction="sum")
    return TokenLoss(total, selected.sum())


# --------------------------------------------------------------------------- span corruption (T5)


def random_spans_noise_mask(
    length: int, noise_density: float, mean_span_length: float, generator: torch.Generator | None = None
) -> torch.Tensor:
    """T5's `random_spans_noise_mask` (Raffel et al. 2020): a bool mask (length,) with round(length * density)
    noise tokens in round(noise / mean_span_length) spans, span lengths a uniformly random segmentation. It
    starts with kept tokens and ends with noise: kept span 0, noise span 0, ..., kept span k, noise span k."""
    n_noise = min(max(round(length * noise_density), 1), length - 1)
    n_spans = max(round(n_noise / mean_span_length), 1)
    n_kept = length - n_noise
    if n_kept < n_spans:
        raise LlmkitError(f"{length} tokens with noise_density={noise_density} leave {n_kept} kept tokens for {n_spans} "
                          "spans; use longer sequences or a smaller noise_density")

    def segment_lengths(n_items: int, n_segments: int) -> torch.Tensor:
        cuts = torch.randperm(n_items - 1, generator=generator)[: n_segments - 1].sort().values + 1  # distinct, in 1..n-1
        return torch.diff(torch.cat([torch.tensor([0]), cuts, torch.tensor([n_items])]))  # (n_segments,) each >= 1

    spans = torch.stack([segment_lengths(n_kept, n_spans), segment_lengths(n_noise, n_spans)], dim=1)  # (k, 2)
    is_noise = torch.tensor([False, True]).repeat(n_spans)  # kept, noise, kept, noise, ...
    return is_noise.repeat_interleave(spans.flatten())  # (length,)


def replace_spans_with_sentinels(tokens: torch.Tensor, mask: torch.Tensor, sentinel_ids: torch.Tensor) -> torch.Tensor:
    """Each run of masked tokens in tokens (B, T) becomes one sentinel: sentinel_ids[k] for the k-th run of its row.
    Every row must hold the same number of runs and masked tokens (span corruption's rows do)."""
    first = mask & ~F.pad(mask[:, :-1], (1, 0), value=False)  # (B, T) first token of each run
    runs, kept = first.sum(dim=1), (~mask | first).sum(dim=1)  # (B,) each
    if int(runs.max()) > len(sentinel_ids):
        raise LlmkitError(f"a row has {int(runs.max())} spans to replace but only {len(sentinel_ids)} sentinel ids were "
                          "given; add sentinel tokens (e.g. <extra_id_0>..<extra_id_99>) or use shorter sequences")
    if bool((runs != runs[0]).any() or (kept != kept[0]).any()):
        raise LlmkitError("rows have different numbers of spans or masked tokens, so their outputs differ in length; "
                          "corrupt rows of different shapes one at a time")
    run_index = (first.long().cumsum(dim=1) - 1).clamp(min=0)  # (B, T) k of the run a token is in
    replaced = torch.where(first, sentinel_ids[run_index], tokens)
    keep = ~mask | first
    return replaced[keep].view(tokens.shape[0], -1)  # (B, T - masked + runs)


def span_corruption_batch(
    tokens: torch.Tensor,
    sentinel_ids: list[int] | torch.Tensor,
    generator: torch.Generator | None = None,
    noise_density: float = 0.15,
    mean_span_length: float = 3.0,
    eos_id: int | None = None,
    decoder_start_id: int | None = None,
) -> Batch:
    """T5's span corruption of token ids (B, L): spans of noise (`random_spans_noise_mask`, drawn per row) are
    each replaced by one sentinel in the inputs; the targets are, per span, its sentinel then its tokens. Both end
    with `eos_id` when given. With `decoder_start_id` the batch also holds the decoder inputs (labels shifted right).

        tokens  The  cute dog walks in the park        inputs  The <X> walks in <Y> park
        labels  <X> cute dog <Y> the
    """
    if not 0 < noise_density < 1 or mean_span_length < 1:
        raise LlmkitError(f"noise_density={noise_density} must be in (0, 1) and mean_span_length={mean_span_length} "
                          "at least 1; T5 uses 0.15 and 3.0")
    batch_size, length = tokens.shape
    if length < 2:
        raise LlmkitError(f"span corruption needs at least 2 tokens per row, got {length}; use longer sequences")
    masks = torch.stack([random_spans_noise_mask(length, noise_density, mean_span_length, generator)
                         for _ in range(batch_size)]).to(tokens.device)  # (B, L)
    sentinels = torch.as_tensor(sentinel_ids, dtype=tokens.dtype, device=tokens.device)
    inputs = replace_spans_with_sentinels(tokens, masks, sentinels)  # (B, L - noise + spans)
    labels = replace_spans_with_sentinels(tokens, ~masks, sentinels)  # (B, noise + spans)
    if eos_id is not None:
        eos = torch.full((batch_size, 1), eos_id, dtype=tokens.dtype, device=tokens.device)
        inputs, labels = torch.cat([inputs, eos], dim=1), torch.cat([labels, eos], dim=1)
    batch = {"input_ids": inputs, "labels": labels}
    if decoder_start_id is not None:
        batch["decoder_input_ids"] = shift_right(labels, decoder_start_id)
    return batch


def shift_right(labels: torch.Tensor, decoder_start_id: int) -> torch.Tensor:
    """Decoder inputs for teacher forcing: labels (B, T) shifted one to the right after the start token (ignored
    labels become the start token: they only ever feed positions whose own labels are ignored)."""
    shifted = torch.cat([torch.full_like(labels[:, :1], decoder_start_id), labels[:, :-1]], dim=1)  # (B, T)
    return shifted.masked_fill(shifted == IGNORE_INDEX, decoder_start_id)


def seq2seq_loss(model: nn.Module, batch: Batch, label_smoothing: float = 0.0) -> TokenLoss:
    """Summed cross-entropy of an encoder-decoder (models.seq2seq.Seq2Seq) predicting `labels` from `input_ids` (a
    speech model, models.speech.SpeechModel: from `input_features`), decoder inputs being the labels shifted right
    (`decoder_input_ids`, or made here from the config's start id). `label_smoothing` e > 0 trains against
    (1 - e) one-hot + e / V uniform (`seq2seq_objective`)."""
    decoder_input_ids = batch.get("decoder_input_ids")
    if decoder_input_ids is None:
        from llmkit.train.distributed import unwrap

        start = unwrap(model).config.decoder_start_id
        if start is None:
            raise LlmkitError("the model's config has no decoder_start_id and the batch no decoder_input_ids; set "
                              "decoder_start_id (T5: 0)")
        decoder_input_ids = shift_right(batch["labels"], start)
    source = batch["input_features"] if "input_features" in batch else batch["input_ids"]
    logits = model(source, decoder_input_ids, attention_mask=batch.get("attention_mask"))  # (B, T, V)
    total = token_cross_entropy(logits, batch["labels"], reduction="sum", label_smoothing=label_smoothing)
    return TokenLoss(total, label_tokens(batch))


LABEL_SMOOTHED_CROSS_ENTROPY = "label-smoothed cross-entropy (nats/token)"


def seq2seq_objective(label_smoothing: float = 0.0) -> Objective:
    """`seq2seq_loss`, with label smoothing (Szegedy et al. 2016, "Rethinking the Inception Architecture") when
    `label_smoothing` e > 0: the target of each token is (1 - e) on its label plus e / V on every one of the V ids,

        loss = (1 - e) * CE(p, y) + e * mean_v(-log p_v),

    which keeps the model from driving its logits' margins without bound on a small training set (Whisper-style
    speech on four voices). The logged loss is then the smoothed one, not a cross-entropy (`loss_label`)."""
    if not 0 <= label_smoothing < 1:
        raise LlmkitError(f"label_smoothing={label_smoothing} must be in [0, 1) (0.1 is usual; 0 turns it off)")
    if label_smoothing == 0:
        return seq2seq_loss

    def smoothed_seq2seq_loss(model: nn.Module, batch: Batch) -> TokenLoss:
        return seq2seq_loss(model, batch, label_smoothing)

    smoothed_seq2seq_loss.loss_label = LABEL_SMOOTHED_CROSS_ENTROPY
    return smoothed_seq2seq_loss


# --------------------------------------------------------------------------- images (ViT, CLIP)

IMAGE_CROSS_ENTROPY = "cross-entropy (nats/image)"
CONTRASTIVE = "symmetric InfoNCE (nats/pair)"


def image_classification_loss(model: nn.Module, batch: Batch) -> TokenLoss:
    """Summed cross-entropy of an image classifier (models.vision.ImageClassifier) over the batch's images:
    pixel_values (B, C, H, W), labels (B,) class ids; each image counts as one label "token"."""
    logits = model(batch["pixel_values"])  # (B, n_labels)
    total = F.cross_entropy(logits.float(), batch["labels"], ignore_index=IGNORE_INDEX, reduction="sum")
    return TokenLoss(total, label_tokens(batch))


image_classification_loss.loss_label = IMAGE_CROSS_ENTROPY


def clip_contrastive_loss(model: nn.Module, batch: Batch) -> TokenLoss:
    """CLIP's symmetric InfoNCE loss (models.clip.contrastive_loss), summed over the batch's image-caption pairs:
    pixel_values (B, C, H, W), input_ids (B, T) captions, labels (B,) the caption row of each image (a
    permutation; arange(B) when caption i describes image i). Each pair counts as one label "token"."""
    from llmkit.models.clip import contrastive_loss

    labels = batch["labels"]
    if labels.shape != (len(batch["pixel_values"]),) or labels.shape != (len(batch["input_ids"]),) or bool(
            (labels.sort().values != torch.arange(len(labels), device=labels.device)).any()):
        raise LlmkitError("a CLIP batch needs one caption per image: labels (B,) must be a permutation of 0..B-1 "
                          "naming each image's caption row")
    logits = model(batch["pixel_values"], batch["input_ids"])  # (B images, B captions)
    return TokenLoss(contrastive_loss(logits[:, labels], reduction="sum"), label_tokens(batch))  # true pairs on the diagonal


clip_contrastive_loss.loss_label = CONTRASTIVE


# --------------------------------------------------------------------------- vision-language models (Flamingo, LLaVA)


def vlm_caption_loss(model: nn.Module, batch: Batch) -> TokenLoss:
    """Summed next-token cross-entropy on the caption tokens only of a vision-language model (models.vlm): input_ids
    (B, T) with `<image>` markers, pixel_values (B, M, C, H, W), labels (B, T) IGNORE_INDEX off the captions."""
    scored = batch["labels"] != IGNORE_INDEX  # (B, T)
    logits = model(batch["input_ids"], batch["pixel_values"], attention_mask=batch.get("attention_mask"),
                   logits_at=scored)  # (N, V)
    return TokenLoss(F.cross_entropy(logits.float(), batch["labels"][scored], reduction="sum"), label_tokens(batch))
