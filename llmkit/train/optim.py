"""The optimizer (AdamW, low-bit AdamW, LOMO, AdaLomo) with the usual parameter groups, and learning-rate schedules
(warmup, then cosine, linear or constant)."""

from __future__ import annotations

import math
from functools import partial

import torch
from torch import nn

from llmkit.errors import LlmkitError
from llmkit.estimate import OPTIMIZERS
from llmkit.train.settings import Schedule

NO_DECAY_NAMES = ("embed", "pos_embed")  # embeddings are lookup tables: decaying them only shrinks rare tokens


LR_SCALE = "lr_scale"  # a Parameter attribute: that parameter learns at the run's lr x this (default 1)


def parameter_groups(model: nn.Module, weight_decay: float, lr: float | None = None) -> list[dict]:
    """AdamW groups: matrices decay; norms, biases and embeddings do not. Frozen parameters are left out. A parameter
    carrying an `lr_scale` attribute (LR_SCALE; Flamingo's tanh gates, models/vlm.py) goes in a group of its own whose
    learning rate is `lr` x lr_scale; the schedule then scales every group alike."""
    groups: dict[tuple[bool, float], list[nn.Parameter]] = {(True, 1.0): [], (False, 1.0): []}
    for name, parameter in model.named_parameters():
        if not parameter.requires_grad:
            continue
        is_embedding = name.split(".")[0] in NO_DECAY_NAMES
        scale = float(getattr(parameter, LR_SCALE, 1.0))
        groups.setdefault((parameter.ndim >= 2 and not is_embedding, scale), []).append(parameter)
    if not any(groups.values()):
        raise LlmkitError("the model has no trainable parameters; unfreeze some (or check the fine-tuning method)")
    result = []
    for (decays, scale), parameters in groups.items():
        group = {"params": parameters, "weight_decay": weight_decay if decays else 0.0}
        if scale != 1.0:
            if lr is None:
                raise LlmkitError(f"a parameter has {LR_SCALE}={scale}: pass lr to parameter_groups")
            group["lr"] = lr * scale
        result.append(group)
    return result


def build_optimizer(
    model: nn.Module, lr: float, weight_decay: float = 0.1, betas: tuple[float, float] = (0.9, 0.95), eps: float = 1e-8,
    optimizer: str = "adamw",
) -> torch.optim.Optimizer:
    """The named optimizer over `parameter_groups`: torch's AdamW (the fused kernel when every parameter sits on a
    device that has one), or one of llmkit.train.optimizers (adamw-8bit, adamw-4bit, lomo, adalomo). LOMO and
    AdaLomo hook into the parameters: from here on, every backward pass updates the weights."""
    groups = parameter_groups(model, weight_decay, lr)
    if optimizer == "adamw":
        devices = {p.device.type for group in groups for p in group["params"]}
        fused = devices <= {"cuda", "cpu"} and not _has_dtensor(groups)
        return torch.optim.AdamW(groups, lr=lr, betas=betas, eps=eps, fused=fused or None, foreach=None if fused else True)
    from llmkit.train.optimizers import AdaLomo, Lomo, QuantizedAdamW

    if optimizer in ("adamw-8bit", "adamw-4bit"):
        return QuantizedAdamW(groups, lr=lr, betas=betas, eps=eps, bits=8 if optimizer == "adamw-8bit" else 4)
    if optimizer == "lomo":
        return Lomo(groups, lr=lr)
    if optimizer == "adalomo":
        return AdaLomo(groups, lr=lr)
    raise LlmkitError(f"unknown optimizer {optimizer!r}; choose one of {', '.join(OPTIMIZERS)}")


def _has_dtensor(groups: list[dict]) -> bool:
    """FSDP2 parameters are DTensors; the foreach path handles them everywhere, the fused one not on every backend."""
    return any(type(p).__name__ == "DTensor" for group in groups for p in group["params"])


def lr_multiplier(step: int, schedule: Schedule, warmup_steps: int, max_steps: int, min_lr_ratio: float = 0.1) -> float:
    """Fraction of the peak learning rate at `step`: linear warmup, then decay to `min_lr_ratio` at `max_steps`."""
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    if schedule == "constant":
        return 1.0
    progress = min(1.0, (step - warmup_steps) / max(1, max_steps - warmup_steps))
    if schedule == "linear":
        decay = 1.0 - progress
    elif schedule == "cosine":
        decay = 0.5 * (1.0 + math.cos(math.pi * progress))
    else:
        raise LlmkitError(f"unknown learning-rate schedule {schedule!r}; use cosine, linear or constant")
    return min_lr_ratio + (1.0 - min_lr_ratio) * decay


def build_scheduler(
    optimizer: torch.optim.Optimizer, schedule: Schedule, warmup_steps: int, max_steps: int, min_lr_ratio: float = 0.1
) -> torch.optim.lr_scheduler.LambdaLR:
    """A LambdaLR over `lr_multiplier`; its state (the step) goes into training checkpoints."""
    if schedule not in ("cosine", "linear", "constant"):
        raise LlmkitError(f"unknown learning-rate schedule {schedule!r}; use cosine, linear or constant")
    if warmup_steps < 0 or warmup_steps > max_steps:
        raise LlmkitError(f"warmup_steps={warmup_steps} must be between 0 and max_steps={max_steps}")
    if not 0 <= min_lr_ratio <= 1:  # above 1 the "decay" would raise the learning rate; below 0 make it negative
        raise LlmkitError(f"min_lr_ratio={min_lr_ratio} must be in [0, 1]: the learning rate decays to lr x min_lr_ratio")
    multiplier = partial(lr_multiplier, schedule=schedule, warmup_steps=warmup_steps, max_steps=max_steps,
                         min_lr_ratio=min_lr_ratio)
    return torch.optim.lr_scheduler.LambdaLR(optimizer, multiplier)
