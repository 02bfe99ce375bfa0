"""T5 span corruption: the noise mask has T5's statistics (noise fraction, span count, uniformly random span
lengths), and (inputs, targets) hold exactly the information of the original tokens."""

from __future__ import annotations

import math

import pytest
import torch

from llmkit.config import Config
from llmkit.errors import LlmkitError
from llmkit.models.seq2seq import Seq2Seq
from llmkit.train.metrics import CROSS_ENTROPY
from llmkit.train.objectives import (
    IGNORE_INDEX,
    loss_label,
    random_spans_noise_mask,
    seq2seq_loss,
    seq2seq_objective,
    shift_right,
    span_corruption_batch,
    token_cross_entropy,
)

SENTINELS = list(range(1, 101))  # ids 1..100, like <extra_id_0>.. in llmkit's trained tokenizers
EOS = 0


def span_lengths(mask: torch.Tensor) -> tuple[list[int], list[int]]:
    """Lengths of the kept runs and of the noise runs of a 1-D bool mask, in order."""
    kept, noise, run = [], [], 1
    for previous, current in zip(mask.tolist(), mask.tolist()[1:] + [None]):
        if current == previous:
            run += 1
            continue
        (noise if previous else kept).append(run)
        run = 1
    return kept, noise


def reconstruct(inputs: list[int], targets: list[int], sentinels: list[int]) -> list[int]:
    """The original tokens: each sentinel in the inputs replaced by the tokens after it in the targets."""
    spans, current = {}, None
    for token in targets:
        if token in sentinels:
            current = token
            spans[current] = []
        elif current is not None:
            spans[current].append(token)
    out = []
    for token in inputs:
        out.extend(spans[token] if token in sentinels else [token])
    return out


def test_noise_fraction_and_mean_span_length_follow_t5() -> None:
    generator = torch.Generator().manual_seed(0)
    length, density, mean_span = 512, 0.15, 3.0
    masks = [random_spans_noise_mask(length, density, mean_span, generator) for _ in range(400)]
    noise_spans, kept_spans = [], []
    for mask in masks:
        kept, noise = span_lengths(mask)
        assert not mask[0] and mask[-1]  # T5's layout: starts with kept tokens, ends with noise
        assert len(kept) == len(noise) == round(round(length * density) / mean_span)
        noise_spans += noise
        kept_spans += kept
    fraction = sum(int(mask.sum()) for mask in masks) / (len(masks) * length)
    assert abs(fraction - density) < 0.005  # round(512 * 0.15) = 77 noise tokens: 0.1504
    assert abs(sum(noise_spans) / len(noise_spans) - mean_span) < 0.1  # 77 tokens in 26 spans: 2.96
    # A uniformly random split of n tokens into k spans makes a span a single token with probability (k-1)/(n-1);
    # a biased segmentation (e.g. equal spans, or one long span) misses it by far more than sampling noise (~0.005).
    n_noise, k = 77, 26
    single = sum(1 for span in noise_spans if span == 1) / len(noise_spans)
    assert abs(single - (k - 1) / (n_noise - 1)) < 0.03
    # spans start anywhere: the first noise position is spread over the sequence, not fixed
    starts = {int(mask.nonzero()[0]) for mask in masks}
    assert len(starts) > 50


def test_masks_differ_between_rows_and_seeds_but_repeat_with_a_seed() -> None:
    first = random_spans_noise_mask(100, 0.15, 3.0, torch.Generator().manual_seed(1))
    again = random_spans_noise_mask(100, 0.15, 3.0, torch.Generator().manual_seed(1))
    other = random_spans_noise_mask(100, 0.15, 3.0, torch.Generator().manual_seed(2))
    assert torch.equal(first, again) and not torch.equal(first, other)
    batch = span_corruption_batch(torch.arange(200, 300).repeat(4, 1), SENTINELS, torch.Generator().manual_seed(3))
    assert len({tuple(row) for row in batch["input_ids"].tolist()}) == 4


@pytest.mark.parametrize("length", [2, 9, 64, 257])
def test_inputs_and_targets_reconstruct_the_tokens_exactly(length: int) -> None:
    generator = torch.Generator().manual_seed(length)
    tokens = torch.randint(101, 1000, (6, length), generator=generator)
    batch = span_corruption_batch(tokens, SENTINELS, generator, eos_id=EOS, decoder_start_id=EOS)
    n_noise = min(max(round(length * 0.15), 1), length - 1)
    n_spans = max(round(n_noise / 3.0), 1)
    assert batch["input_ids"].shape == (6, length - n_noise + n_spans + 1)
    assert batch["labels"].shape == (6, n_noise + n_spans + 1)
    for inputs, labels, row in zip(batch["input_ids"].tolist(), batch["labels"].tolist(), tokens.tolist()):
        assert inputs[-1] == EOS and labels[-1] == EOS
        assert labels[0] == SENTINELS[0]  # targets open with the first sentinel
        assert [t for t in inputs if t in SENTINELS] == SENTINELS[:n_spans]  # in order, each once
        assert reconstruct(inputs[:-1], labels[:-1], SENTINELS) == row
    assert torch.equal(batch["decoder_input_ids"], shift_right(batch["labels"], EOS))
    assert batch["decoder_input_ids"][:, 0].eq(EOS).all() and torch.equal(batch["decoder_input_ids"][:, 1:],
                                                                        batch["labels"][:, :-1])


def test_shift_right_turns_ignored_labels_into_the_start_token() -> None:
    labels = torch.tensor([[5, 6, IGNORE_INDEX, IGNORE_INDEX]])
    assert shift_right(labels, 0).tolist() == [[0, 5, 6, 0]]


def test_seq2seq_loss_is_teacher_forced_cross_entropy() -> None:
    torch.manual_seed(0)
    model = Seq2Seq(Config.from_name("mini-t5", vocab_size=300, n_layers=1, n_decoder_layers=1, d_model=32, d_ff=48,
                                     decoder_start_id=7))
    tokens = torch.randint(101, 300, (3, 40))
    batch = span_corruption_batch(tokens, SENTINELS, torch.Generator().manual_seed(0), eos_id=EOS)
    assert "decoder_input_ids" not in batch  # then the loss shifts the labels after the config's start id (7)
    expected = token_cross_entropy(model(batch["input_ids"], shift_right(batch["labels"], 7)), batch["labels"])
    assert torch.allclose(seq2seq_loss(model, batch).mean(), expected)
    model.config.decoder_start_id = None
    with pytest.raises(LlmkitError, match="no decoder_start_id and the batch no decoder_input_ids"):
        seq2seq_loss(model, batch)
    assert math.isfinite(seq2seq_loss(model, {**batch, "decoder_input_ids": shift_right(batch["labels"], 7)}).mean().item())


def test_errors_name_the_setting_and_fix() -> None:
    tokens = torch.arange(101, 301).repeat(2, 1)  # 200 tokens: 30 noise tokens in 10 spans
    with pytest.raises(LlmkitError, match="10 spans to replace but only 4 sentinel ids"):
        span_corruption_batch(tokens, SENTINELS[:4], torch.Generator().manual_seed(0))
    with pytest.raises(LlmkitError, match="noise_density=1.5 must be in"):
        span_corruption_batch(tokens, SENTINELS, noise_density=1.5)
    with pytest.raises(LlmkitError, match="at least 2 tokens per row"):
        span_corruption_batch(tokens[:, :1], SENTINELS)
    with pytest.raises(LlmkitError, match="leave 1 kept tokens for 9 spans"):
        random_spans_noise_mask(10, 0.9, 1.0)


def test_label_smoothing_mixes_cross_entropy_with_the_uniform_target() -> None:
    """(1 - e) CE + e mean_v(-log p_v) per label, written out by hand; ignored labels stay out; 0 is plain CE."""
    torch.manual_seed(0)
    model = Seq2Seq(Config.from_name("mini-t5", vocab_size=300, n_layers=1, n_decoder_layers=1, d_model=32, d_ff=48,
                                     decoder_start_id=7))
    batch = span_corruption_batch(torch.randint(101, 300, (3, 40)), SENTINELS, torch.Generator().manual_seed(0),
                                  eos_id=EOS)
    batch["labels"][0, -3:] = IGNORE_INDEX  # a shorter target in the batch
    log_p = model(batch["input_ids"], shift_right(batch["labels"], 7)).float().log_softmax(-1)  # (B, T, V)
    kept = batch["labels"] != IGNORE_INDEX
    nll = -log_p[kept].gather(1, batch["labels"][kept][:, None]).squeeze(1)  # (N,)
    uniform = -log_p[kept].mean(-1)  # (N,)
    smoothed = seq2seq_objective(0.1)
    loss = smoothed(model, batch)
    assert torch.allclose(loss.total, (0.9 * nll + 0.1 * uniform).sum(), rtol=1e-5)
    assert loss.tokens == kept.sum()
    assert not torch.allclose(loss.total, nll.sum(), rtol=1e-3)  # it is not the plain loss
    assert loss_label(smoothed).startswith("label-smoothed") and loss_label(seq2seq_objective(0.0)) == CROSS_ENTROPY
    assert seq2seq_objective(0.0) is seq2seq_loss
    for bad in (-0.1, 1.0):
        with pytest.raises(LlmkitError, match="label_smoothing"):
            seq2seq_objective(bad)
