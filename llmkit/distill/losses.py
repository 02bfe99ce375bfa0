"""Distillation losses, each a value per scored position (N,) from student and teacher logits (N, V) at those
positions (the caller selects the real tokens, so padding and ignored labels never count), summed by the objective.

With temperature T, p_t = softmax(z_t / T) and p_s = softmax(z_s / T) are the teacher's and student's softened
distributions over the vocabulary.

- Soft-target KL (Hinton, Vinyals & Dean 2015, "Distilling the Knowledge in a Neural Network"), forward KL:

      D_kl = T^2 * KL(p_t || p_s) = T^2 * sum_v p_t(v) (log p_t(v) - log p_s(v))

  The T^2 keeps the gradient's size independent of T: d KL / d z_s = (p_s - p_t) / T, whose magnitude falls as
  1/T^2 for large T. Mass-covering: the student is pushed to put probability wherever the teacher does.
- Reverse KL (Gu et al. 2023, "MiniLLM"): D_rkl = T^2 * KL(p_s || p_t), mode-seeking: the student is punished for
  mass where the teacher has little, and may ignore some of the teacher's modes (fits a small student better).
- Generalised Jensen-Shannon divergence (Agarwal et al. 2024, "On-Policy Distillation of Language Models", GKD,
  Eq. 1), with the mixture M = beta p_t + (1 - beta) p_s:

      D_jsd(beta) = beta KL(p_t || M) + (1 - beta) KL(p_s || M)

  exactly as TRL's `GKDTrainer.generalized_jsd_loss` computes it (the reference the tests hold it to): no T^2
  factor, and beta = 0 / beta = 1 are *defined* as forward KL(p_t || p_s) / reverse KL(p_s || p_t) (the formula
  itself tends to 0 at both ends; near them its gradient behaves like the forward / reverse KL's, scaled by beta).
- Hard labels: the distillation term is mixed with the usual cross-entropy on the data's next tokens,
  L = alpha * D + (1 - alpha) * CE (Hinton et al.: the CE term at T = 1, with a small weight).
- Hidden states (Sanh et al. 2019, DistilBERT): the student's hidden vectors are pulled towards the teacher's by
  1 - cos(h_s, h_t) (DistilBERT's cosine embedding loss) or by the mean squared error over the C features.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from llmkit.distill.settings import HIDDEN_LOSSES, LOSSES
from llmkit.errors import LlmkitError


def _log_probs(logits: torch.Tensor, temperature: float) -> torch.Tensor:
    """log softmax(logits / T) over the last dimension, in float32."""
    return F.log_softmax(logits.float() / temperature, dim=-1)


def kl_terms(log_p: torch.Tensor, log_q: torch.Tensor) -> torch.Tensor:
    """KL(p || q) per row (N,) from log-probabilities (N, V), with 0 log 0 = 0: a p that is exactly 0 (a top-k
    teacher's tail, log p = -inf) adds nothing."""
    p = log_p.exp()
    return torch.where(p > 0, p * (log_p - log_q), 0.0).sum(dim=-1)


def forward_kl(student_logits: torch.Tensor, teacher_logits: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """T^2 * KL(p_t || p_s) per position (N,): Hinton's soft-target loss."""
    check_temperature(temperature)
    return temperature**2 * kl_terms(_log_probs(teacher_logits, temperature), _log_probs(student_logits, temperature))


def reverse_kl(student_logits: torch.Tensor, teacher_logits: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """T^2 * KL(p_s || p_t) per position (N,): MiniLLM's mode-seeking divergence."""
    check_temperature(temperature)
    return temperature**2 * kl_terms(_log_probs(student_logits, temperature), _log_probs(teacher_logits, temperature))


def generalized_jsd(
    student_logits: torch.Tensor, teacher_logits: torch.Tensor, beta: float = 0.5, temperature: float = 1.0
) -> torch.Tensor:
    """GKD's beta KL(p_t || M) + (1 - beta) KL(p_s || M), M = beta p_t + (1 - beta) p_s, per position (N,);
    beta = 0 is KL(p_t || p_s), beta = 1 is KL(p_s || p_t) (TRL's convention; no T^2 factor)."""
    check_temperature(temperature)
    if not 0 <= beta <= 1:
        raise LlmkitError(f"--beta {beta} must be in [0, 1] (0: forward KL, 1: reverse KL, 0.5: symmetric JSD)")
    log_s, log_t = _log_probs(student_logits, temperature), _log_probs(teacher_logits, temperature)
    if beta == 0:
        return kl_terms(log_t, log_s)
    if beta == 1:
        return kl_terms(log_s, log_t)
    beta_t = torch.tensor(beta, dtype=log_s.dtype, device=log_s.device)
    log_mixture = torch.logsumexp(torch.stack([log_t + torch.log(beta_t), log_s + torch.log1p(-beta_t)]), dim=0)
    return beta * kl_terms(log_t, log_mixture) + (1 - beta) * kl_terms(log_s, log_mixture)


def divergence(
    name: str, student_logits: torch.Tensor, teacher_logits: torch.Tensor, temperature: float = 1.0, beta: float = 0.5
) -> torch.Tensor:
    """The distillation divergence `name` (kl, reverse_kl or gkd) per position (N,)."""
    if name == "kl":
        return forward_kl(student_logits, teacher_logits, temperature)
    if name == "reverse_kl":
        return reverse_kl(student_logits, teacher_logits, temperature)
    if name == "gkd":
        return generalized_jsd(student_logits, teacher_logits, beta, temperature)
    raise LlmkitError(f"--loss {name} is unknown; choose one of {', '.join(LOSSES)}")


def mixed_with_labels(
    divergences: torch.Tensor, student_logits: torch.Tensor, labels: torch.Tensor, alpha: float
) -> torch.Tensor:
    """alpha * D + (1 - alpha) * CE(student, labels) per position (N,); the CE is at temperature 1."""
    check_alpha(alpha)
    if alpha == 1:
        return divergences
    cross_entropy = F.cross_entropy(student_logits.float(), labels, reduction="none")  # (N,)
    return alpha * divergences + (1 - alpha) * cross_entropy


def hidden_state_loss(student: torch.Tensor, teacher: torch.Tensor, kind: str = "cosine") -> torch.Tensor:
    """1 - cos(h_s, h_t) or the mean squared error over the features, per vector: (N, C) -> (N,)."""
    if student.shape != teacher.shape:
        raise LlmkitError(f"student hidden states {tuple(student.shape)} and teacher's {tuple(teacher.shape)} differ in "
                          "shape; hidden-state losses need a student of the teacher's width (d_model)")
    if kind == "cosine":
        return 1 - F.cosine_similarity(student.float(), teacher.float(), dim=-1)
    if kind == "mse":
        return (student.float() - teacher.float()).pow(2).mean(dim=-1)
    raise LlmkitError(f"hidden-state loss {kind!r} is unknown; choose one of {', '.join(HIDDEN_LOSSES)}")


def check_temperature(temperature: float) -> None:
    if not temperature > 0:
        raise LlmkitError(f"--temperature {temperature} must be positive (1 keeps the distributions; 2 is usual)")


def check_alpha(alpha: float) -> None:
    if not 0 <= alpha <= 1:
        raise LlmkitError(f"--alpha {alpha} must be in [0, 1]: the weight of the distillation term (1 - alpha goes to "
                          "the hard-label cross-entropy)")
