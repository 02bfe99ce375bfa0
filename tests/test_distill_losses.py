"""Distillation losses against hand-computed values and TRL's generalized_jsd_loss (GKDTrainer)."""

from __future__ import annotations

import math
import os

import pytest
import torch

from llmkit.distill.losses import (
    divergence,
    forward_kl,
    generalized_jsd,
    hidden_state_loss,
    kl_terms,
    mixed_with_labels,
    reverse_kl,
)
from llmkit.errors import LlmkitError

os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")

STUDENT = torch.tensor([[1.0, 0.0, -1.0], [0.5, 0.5, 2.0]])
TEACHER = torch.tensor([[2.0, 0.0, 0.0], [0.0, 1.0, 1.0]])


def by_hand_kl(p_logits: list[float], q_logits: list[float], temperature: float) -> float:
    """KL(softmax(p / T) || softmax(q / T)) with plain Python floats."""
    def softmax(row: list[float]) -> list[float]:
        exps = [math.exp(value / temperature) for value in row]
        return [value / sum(exps) for value in exps]

    p, q = softmax(p_logits), softmax(q_logits)
    return sum(pi * math.log(pi / qi) for pi, qi in zip(p, q, strict=True))


@pytest.mark.parametrize("temperature", [1.0, 2.0, 0.5])
def test_forward_and_reverse_kl_equal_hand_computed_values_times_t_squared(temperature):
    expected_forward = [temperature**2 * by_hand_kl(t.tolist(), s.tolist(), temperature) for s, t in zip(STUDENT, TEACHER)]
    expected_reverse = [temperature**2 * by_hand_kl(s.tolist(), t.tolist(), temperature) for s, t in zip(STUDENT, TEACHER)]
    assert forward_kl(STUDENT, TEACHER, temperature).tolist() == pytest.approx(expected_forward, abs=1e-6)
    assert reverse_kl(STUDENT, TEACHER, temperature).tolist() == pytest.approx(expected_reverse, abs=1e-6)


def test_t_squared_keeps_the_gradient_scale():
    """d(T^2 KL)/dz_s = T (p_s - p_t): without the T^2 factor the gradient would shrink as 1/T."""
    student = STUDENT.clone().requires_grad_(True)
    forward_kl(student, TEACHER, temperature=4.0).sum().backward()
    expected = 4.0 * (torch.softmax(STUDENT / 4, -1) - torch.softmax(TEACHER / 4, -1))
    torch.testing.assert_close(student.grad, expected, atol=1e-6, rtol=1e-5)


def test_kl_of_identical_distributions_is_zero_and_a_zero_teacher_probability_adds_nothing():
    assert forward_kl(TEACHER, TEACHER, 2.0).abs().max() < 1e-6
    log_p = torch.log(torch.tensor([[0.5, 0.5, 0.0]]))  # a top-k teacher: the tail is exactly 0 (log = -inf)
    log_q = torch.log(torch.tensor([[0.25, 0.25, 0.5]]))
    assert kl_terms(log_p, log_q).item() == pytest.approx(math.log(2), abs=1e-6)


def test_gkd_endpoints_are_forward_and_reverse_kl():
    for temperature in (1.0, 2.0):
        torch.testing.assert_close(generalized_jsd(STUDENT, TEACHER, 0.0, temperature),
                                   forward_kl(STUDENT, TEACHER, temperature) / temperature**2)
        torch.testing.assert_close(generalized_jsd(STUDENT, TEACHER, 1.0, temperature),
                                   reverse_kl(STUDENT, TEACHER, temperature) / temperature**2)


def test_gkd_half_is_the_jensen_shannon_divergence_by_hand():
    p = torch.softmax(TEACHER[0], -1).tolist()
    q = torch.softmax(STUDENT[0], -1).tolist()
    m = [(a + b) / 2 for a, b in zip(p, q, strict=True)]
    jsd = 0.5 * sum(a * math.log(a / c) for a, c in zip(p, m, strict=True)) + 0.5 * sum(
        b * math.log(b / c) for b, c in zip(q, m, strict=True))
    assert generalized_jsd(STUDENT[:1], TEACHER[:1], 0.5).item() == pytest.approx(jsd, abs=1e-6)


@pytest.mark.parametrize("beta", [0.0, 0.1, 0.5, 0.9, 1.0])
@pytest.mark.parametrize("temperature", [1.0, 0.7, 2.0])
def test_gkd_equals_trl_generalized_jsd_loss(beta, temperature):
    from trl.experimental.gkd import GKDTrainer

    generator = torch.Generator().manual_seed(int(beta * 10 + temperature * 100))
    student = torch.randn(2, 5, 11, generator=generator) * 3
    teacher = torch.randn(2, 5, 11, generator=generator) * 3
    labels = torch.randint(0, 11, (2, 5), generator=generator)
    labels[0, :2] = -100  # ignored positions: TRL drops them, we never select them
    reference = GKDTrainer.generalized_jsd_loss(student, teacher, labels=labels, beta=beta, temperature=temperature,
                                                reduction="sum")
    scored = labels != -100
    ours = generalized_jsd(student[scored], teacher[scored], beta, temperature).sum()
    assert abs(ours.item() - reference.item()) <= 1e-6 * max(1.0, abs(reference.item()))


def test_alpha_mixes_the_divergence_with_hard_label_cross_entropy():
    labels = torch.tensor([0, 2])
    divergences = forward_kl(STUDENT, TEACHER, 2.0)
    cross_entropy = torch.nn.functional.cross_entropy(STUDENT, labels, reduction="none")
    torch.testing.assert_close(mixed_with_labels(divergences, STUDENT, labels, 0.3),
                               0.3 * divergences + 0.7 * cross_entropy)
    torch.testing.assert_close(mixed_with_labels(divergences, STUDENT, labels, 1.0), divergences)
    torch.testing.assert_close(mixed_with_labels(divergences, STUDENT, labels, 0.0), cross_entropy)


def test_hidden_state_losses_by_hand():
    student = torch.tensor([[1.0, 0.0], [1.0, 1.0]])
    teacher = torch.tensor([[0.0, 1.0], [2.0, 2.0]])
    assert hidden_state_loss(student, teacher, "cosine").tolist() == pytest.approx([1.0, 0.0], abs=1e-6)
    assert hidden_state_loss(student, teacher, "mse").tolist() == pytest.approx([1.0, 1.0], abs=1e-6)
    with pytest.raises(LlmkitError, match="same-width|width"):
        hidden_state_loss(student, torch.zeros(2, 3))


def test_bad_settings_name_the_flag():
    with pytest.raises(LlmkitError, match="--loss fancy is unknown"):
        divergence("fancy", STUDENT, TEACHER)
    with pytest.raises(LlmkitError, match="--temperature 0"):
        forward_kl(STUDENT, TEACHER, 0)
    with pytest.raises(LlmkitError, match="--beta 1.5"):
        generalized_jsd(STUDENT, TEACHER, 1.5)
    with pytest.raises(LlmkitError, match="--alpha -0.1"):
        mixed_with_labels(STUDENT[:, 0], STUDENT, torch.tensor([0, 1]), -0.1)
