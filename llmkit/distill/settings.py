"""Distillation settings: plain values (no torch import), so the CLI can show them without loading torch."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal, get_args

from llmkit.errors import LlmkitError

LossName = Literal["kl", "reverse_kl", "gkd"]
HiddenLoss = Literal["cosine", "mse"]
LOSSES: tuple[str, ...] = get_args(LossName)
HIDDEN_LOSSES: tuple[str, ...] = get_args(HiddenLoss)


@dataclass(frozen=True)
class DistillSettings:
    """What the student learns from the teacher (llmkit.distill.losses has the math).

    loss: kl (Hinton's soft targets, T^2 KL(teacher || student)), reverse_kl (MiniLLM) or gkd (generalised JSD).
    temperature: softens both distributions before the divergence.
    alpha: weight of the divergence; 1 - alpha goes to cross-entropy on the data's own next tokens.
    beta: gkd's interpolation (0: forward KL, 1: reverse KL).
    lmbda: gkd's on-policy share: each batch, with this probability, the student writes the continuation itself.
    prompt_tokens: on-policy batches keep this many tokens of each window and sample the rest (None: half).
    hidden_weight: weight of a hidden-state loss on the last block's output (0: off; same-width students only).
    hidden_loss: cosine (DistilBERT) or mse.
    seed: seeds the on-policy coin and the student's sampling.
    """

    loss: LossName = "kl"
    temperature: float = 2.0
    alpha: float = 0.5
    beta: float = 0.5
    lmbda: float = 0.0
    prompt_tokens: int | None = None
    hidden_weight: float = 0.0
    hidden_loss: HiddenLoss = "cosine"
    seed: int = 0

    def validate(self) -> None:
        """Raise naming the flag and the fix for an impossible value."""
        if self.loss not in LOSSES:
            raise LlmkitError(f"--loss {self.loss} is unknown; choose one of {', '.join(LOSSES)}")
        if self.hidden_loss not in HIDDEN_LOSSES:
            raise LlmkitError(f"--hidden_loss {self.hidden_loss} is unknown; choose one of {', '.join(HIDDEN_LOSSES)}")
        if not self.temperature > 0:
            raise LlmkitError(f"--temperature {self.temperature} must be positive (1 keeps the distributions; 2 is usual)")
        for flag, value in (("alpha", self.alpha), ("beta", self.beta), ("lmbda", self.lmbda)):
            if not 0 <= value <= 1:
                raise LlmkitError(f"--{flag} {value} must be in [0, 1]")
        if self.lmbda > 0 and self.loss != "gkd":
            raise LlmkitError(f"--lmbda {self.lmbda}: on-policy samples belong to --loss gkd; pass --loss gkd or --lmbda 0")
        if self.hidden_weight < 0:
            raise LlmkitError(f"--hidden_weight {self.hidden_weight} must be at least 0 (0 turns it off)")
        if self.prompt_tokens is not None and self.prompt_tokens < 1:
            raise LlmkitError(f"--prompt_tokens {self.prompt_tokens} must be at least 1 (or null: half of each window)")
