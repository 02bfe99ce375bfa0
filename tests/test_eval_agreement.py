"""eval/agreement.py: llama.cpp's KL-divergence statistics and embedding agreement, held against written-out float64
formulas (numpy), and the windowed scoring against eval/perplexity.py on a tiny random decoder."""

import math

import numpy as np
import pytest
import torch

from llmkit.errors import LlmkitError
from llmkit.eval.agreement import (
    compare_to_reference,
    embedding_agreement,
    position_stats,
    score_text,
    token_agreement,
)
from llmkit.eval.perplexity import perplexity
from tests.helpers import byte_tokenizer, tiny_decoder

pytestmark = pytest.mark.usefixtures("one_thread")

TEXT = "To be, or not to be, that is the question: whether 'tis nobler in the mind to suffer. " * 3


def written_out(logits_ref: np.ndarray, logits: np.ndarray, targets: np.ndarray) -> dict[str, float]:
    """The statistics position by position, as llama.cpp's perplexity.cpp defines them, in float64."""
    klds, same, dps = [], [], []
    for z_ref, z, x in zip(logits_ref, logits, targets):
        p = np.exp(z_ref - z_ref.max()) / np.exp(z_ref - z_ref.max()).sum()
        q = np.exp(z - z.max()) / np.exp(z - z.max()).sum()
        klds.append(float(np.sum(p * (np.log(p) - np.log(q)))))
        same.append(int(np.argmax(p) == np.argmax(q)))
        dps.append(q[x] - p[x])
    klds, dps = np.array(klds), np.array(dps)
    return {"mean_kld": klds.mean(), "median_kld": np.percentile(klds, 50), "p99_kld": np.percentile(klds, 99),
            "max_kld": klds.max(), "top1_agreement": np.mean(same), "mean_delta_p": dps.mean(),
            "rms_delta_p": math.sqrt(np.mean(dps**2))}


def test_token_agreement_equals_the_written_out_float64_statistics():
    generator = torch.Generator().manual_seed(0)
    logits_ref = torch.randn(37, 50, generator=generator) * 3
    logits = logits_ref + torch.randn(37, 50, generator=generator)  # a perturbed copy: some top-1 tokens change
    targets = torch.randint(0, 50, (37,), generator=generator)
    result = token_agreement(logits_ref, logits, targets, chunk_rows=8)  # chunks of 8 rows: 5 chunks, the last short
    expected = written_out(logits_ref.double().numpy(), logits.double().numpy(), targets.numpy())
    for name, value in expected.items():
        assert getattr(result, name) == pytest.approx(value, rel=1e-9, abs=1e-12), name  # both float64
    assert result.n_positions == 37
    assert 0 < result.top1_agreement < 1  # the test exercises both outcomes


def test_identical_logits_have_zero_divergence_and_full_agreement():
    logits = torch.randn(20, 30, generator=torch.Generator().manual_seed(1))
    result = token_agreement(logits, logits.clone(), torch.zeros(20, dtype=torch.long))
    assert result.mean_kld == pytest.approx(0, abs=1e-15) and result.max_kld == pytest.approx(0, abs=1e-15)
    assert result.top1_agreement == 1.0 and result.rms_delta_p == 0.0


def test_shapes_that_do_not_match_are_refused():
    with pytest.raises(LlmkitError, match=r"do not match the reference"):
        position_stats(torch.zeros(4, 10), torch.zeros(4, 11))
    with pytest.raises(LlmkitError, match=r"targets of shape"):
        position_stats(torch.zeros(4, 10), torch.zeros(4, 10), torch.zeros(3, dtype=torch.long))


def test_scoring_a_text_gives_perplexity_s_windows_and_figures():
    model, tokenizer = tiny_decoder(), byte_tokenizer()
    window, stride = 64, 32  # several overlapping windows over the ~270 byte tokens
    reference = score_text(model, tokenizer, TEXT, window=window, stride=stride)
    expected = perplexity(model, tokenizer, TEXT, window=window, stride=stride)
    assert reference.logits.shape == (expected.n_tokens, model.config.vocab_size)
    assert reference.perplexity == pytest.approx(expected.perplexity, rel=1e-5)  # same ids, windows and targets

    same, same_ppl = compare_to_reference(model, reference)
    assert same.mean_kld == pytest.approx(0, abs=1e-9) and same.top1_agreement == 1.0
    assert same_ppl == pytest.approx(reference.perplexity, rel=1e-9)

    other = tiny_decoder(seed=1)
    agreement, other_ppl = compare_to_reference(other, reference)
    assert other_ppl == pytest.approx(perplexity(other, tokenizer, TEXT, window=window, stride=stride).perplexity,
                                      rel=1e-5)
    assert agreement.mean_kld > 0.01 and agreement.n_positions == expected.n_tokens


def test_embedding_agreement_equals_the_written_out_cosine_and_neighbours():
    generator = torch.Generator().manual_seed(2)
    reference = torch.randn(12, 8, generator=generator)
    embeddings = reference + 0.8 * torch.randn(12, 8, generator=generator)
    result = embedding_agreement(reference, embeddings)
    ref, emb = reference.double().numpy(), embeddings.double().numpy()
    cosines = [a @ b / np.linalg.norm(a) / np.linalg.norm(b) for a, b in zip(ref, emb)]

    def neighbours(matrix: np.ndarray) -> list[int]:
        unit = matrix / np.linalg.norm(matrix, axis=1, keepdims=True)
        return [max((j for j in range(len(unit)) if j != i), key=lambda j: unit[i] @ unit[j]) for i in range(len(unit))]

    assert result.mean_cosine == pytest.approx(np.mean(cosines), rel=1e-12)
    assert result.min_cosine == pytest.approx(np.min(cosines), rel=1e-12)
    assert result.retrieval_agreement == pytest.approx(np.mean(np.array(neighbours(ref)) == neighbours(emb)))
    assert 0 < result.retrieval_agreement < 1
    identical = embedding_agreement(reference, reference.clone())
    assert identical.mean_cosine == pytest.approx(1) and identical.retrieval_agreement == 1.0
    with pytest.raises(LlmkitError, match=r"same texts"):
        embedding_agreement(reference, embeddings[:5])
