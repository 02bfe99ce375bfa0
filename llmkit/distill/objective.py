"""Distillation as a training-loop objective: (student, batch) -> TokenLoss, like causal_lm_loss, so the one loop
(accumulation, precision, checkpoints, resume, DDP) trains students too.

For each batch the frozen teacher's logits at the scored positions (labels that are not IGNORE_INDEX) come from a
forward pass without gradient, or from a `TeacherLogitCache`; the student's logits at the same positions give the
per-token loss alpha * D(teacher, student) + (1 - alpha) * CE (+ hidden_weight * the hidden-state loss), summed.

GKD on-policy (Agarwal et al. 2024): with probability lmbda a training batch is first rewritten by the student:
each window keeps its first `prompt_tokens` tokens and the student samples the rest (temperature 1, llmkit.generate);
the teacher then scores the student's own text, which corrects the student where it actually goes (train/inference
mismatch, "exposure bias"). Every position stays scored (prompt positions on real text, the rest on the sample), so
the batch's label count, which the loop counts before the forward pass, does not change. lmbda = 0 is purely
supervised: no generation at all.
"""

from __future__ import annotations

import random

import torch
from torch import nn

from llmkit.data.batch import IGNORE_INDEX, Batch
from llmkit.distill.cache import TeacherLogitCache, restrict_to_top_k
from llmkit.distill.losses import divergence, hidden_state_loss, mixed_with_labels
from llmkit.distill.settings import DistillSettings
from llmkit.errors import LlmkitError
from llmkit.generate import SamplingSettings, generate_tokens
from llmkit.train.distributed import unwrap
from llmkit.train.objectives import TokenLoss, label_tokens


def freeze(teacher: nn.Module) -> nn.Module:
    """The teacher in eval mode (no dropout) with no parameter asking for a gradient."""
    teacher.eval()
    for parameter in teacher.parameters():
        parameter.requires_grad_(False)
    return teacher


def check_same_vocabulary(student: nn.Module, teacher: nn.Module) -> None:
    """Token-level distillation compares distributions over one vocabulary: refuse students of another size."""
    if student.config.vocab_size != teacher.config.vocab_size:
        raise LlmkitError(f"the student's vocabulary has {student.config.vocab_size:,} ids but the teacher's "
                          f"{teacher.config.vocab_size:,}; token-level distillation needs one vocabulary: build the "
                          "student with the teacher's tokenizer (--student every_other or a preset)")


class DecoderDistillation:
    """The objective distilling `teacher` (a Decoder) into the model the loop trains. `cache` keeps teacher logits
    on disk; `top_k` keeps the teacher's k largest logits per position (on the fly too, so both agree)."""

    loss_label = "distillation loss (per token)"  # a divergence (mixed with CE by alpha), not a perplexity

    def __init__(self, teacher: nn.Module, settings: DistillSettings, cache: TeacherLogitCache | None = None,
                 top_k: int | None = None) -> None:
        settings.validate()
        top_k = cache.top_k if cache is not None else top_k
        if top_k is not None and settings.loss != "kl":
            raise LlmkitError(f"--cache_top_k {top_k} keeps only the teacher's top tokens, which reverse KL and GKD "
                              f"cannot use (they divide by the teacher's tail); use --loss kl, or --cache_top_k null "
                              f"for the full vocabulary (--loss is {settings.loss})")
        if top_k is not None and top_k < 1:
            raise LlmkitError(f"--cache_top_k {top_k} must be at least 1 (or null for the full vocabulary)")
        self.teacher, self.settings, self.cache, self.top_k = freeze(teacher), settings, cache, top_k
        self.coin = random.Random(settings.seed)
        self.on_policy_batches = 0

    def __call__(self, model: nn.Module, batch: Batch) -> TokenLoss:
        settings = self.settings
        if model.training and settings.lmbda > 0 and self.coin.random() < settings.lmbda:
            batch = self.on_policy(model, batch)
        input_ids, labels = batch["input_ids"], batch["labels"]
        scored = labels != IGNORE_INDEX  # (B, T)
        student_hidden = None
        if settings.hidden_weight > 0:
            student_hidden = unwrap(model).hidden_states(input_ids, attention_mask=batch.get("attention_mask"))
            student_logits = unwrap(model).head(student_hidden[scored])  # (N, V)
        else:
            student_logits = model(input_ids, attention_mask=batch.get("attention_mask"), logits_at=scored)  # (N, V)
        teacher_logits, teacher_hidden = self.teacher_outputs(batch, scored, settings.hidden_weight > 0)
        divergences = divergence(settings.loss, student_logits, teacher_logits, settings.temperature, settings.beta)
        per_token = mixed_with_labels(divergences, student_logits, labels[scored], settings.alpha)  # (N,)
        metrics = {"divergence": divergences.detach().sum()}
        if student_hidden is not None:
            hidden = hidden_state_loss(student_hidden[scored], teacher_hidden[scored], settings.hidden_loss)
            per_token = per_token + settings.hidden_weight * hidden
            metrics["hidden"] = hidden.detach().sum()
        return TokenLoss(per_token.sum(), label_tokens(batch), metrics=metrics)

    @torch.no_grad()
    def teacher_outputs(self, batch: Batch, scored: torch.Tensor, with_hidden: bool
                        ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The teacher's logits (N, V) at the scored positions (cached, top-k restricted) and, when asked, its
        hidden states (B, T, C), computed in one forward pass where both are needed."""
        input_ids, mask = batch["input_ids"], batch.get("attention_mask")
        hidden = self.teacher.hidden_states(input_ids, attention_mask=mask) if with_hidden else None

        def compute() -> torch.Tensor:
            if hidden is not None:
                return self.teacher.head(hidden[scored])
            return self.teacher(input_ids, attention_mask=mask, logits_at=scored)

        if self.cache is not None:
            return self.cache.logits(input_ids, scored, compute), hidden
        return restrict_to_top_k(compute().float(), self.top_k), hidden

    def on_policy(self, model: nn.Module, batch: Batch) -> Batch:
        """The batch's windows with everything after the first `prompt_tokens` tokens replaced by the student's own
        sample (as long as what it replaces, so the label count stays)."""
        input_ids, labels = batch["input_ids"], batch["labels"]
        if "attention_mask" in batch or bool((labels == IGNORE_INDEX).any()) or not torch.equal(
                labels[:, :-1], input_ids[:, 1:]):
            raise LlmkitError("on-policy distillation (--lmbda above 0) samples continuations of plain text windows "
                              "(labels = the next tokens, no padding); pass text --data or --lmbda 0")
        windows = torch.cat([input_ids, labels[:, -1:]], dim=1)  # (B, T + 1)
        prompt_tokens = self.settings.prompt_tokens or windows.shape[1] // 2
        if prompt_tokens >= windows.shape[1]:
            raise LlmkitError(f"--prompt_tokens {prompt_tokens} leaves nothing to sample in windows of "
                              f"{windows.shape[1]} tokens; pass fewer")
        sample = student_continuations(unwrap(model), windows[:, :prompt_tokens], windows.shape[1] - prompt_tokens,
                                       seed=self.coin.randrange(2**31))
        self.on_policy_batches += 1
        rewritten = torch.cat([windows[:, :prompt_tokens], sample.to(windows.device)], dim=1)  # (B, T + 1)
        return {"input_ids": rewritten[:, :-1], "labels": rewritten[:, 1:]}


def student_continuations(model: nn.Module, prompts: torch.Tensor, new_tokens: int, seed: int) -> torch.Tensor:
    """`new_tokens` tokens (B, new_tokens) sampled by `model` at temperature 1 after each prompt row (B, P), never
    stopping early; the model is back in its former mode afterwards."""
    was_training = model.training
    model.eval()
    try:
        steps = list(generate_tokens(model, prompts.tolist(), max_new_tokens=new_tokens,
                                     settings=SamplingSettings(temperature=1.0, seed=seed)))
    finally:
        model.train(was_training)
    return torch.tensor(steps, dtype=prompts.dtype).T  # (B, new_tokens)
