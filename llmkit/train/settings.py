"""Training settings: one dataclass of plain values (no torch import), so the CLI can show it without loading torch."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from llmkit.errors import LlmkitError
from llmkit.estimate import FUSED_BACKWARD_OPTIMIZERS, OPTIMIZERS, OptimizerName

Schedule = Literal["cosine", "linear", "constant"]
Precision = Literal["fp32", "bf16-mixed", "fp16-mixed"]
Strategy = Literal["auto", "ddp", "fsdp"]
# what activation checkpointing recomputes in each block (llmkit/train/recompute.py); true means full, false none
Recompute = Literal["none", "full", "attention", "mlp"]
RECOMPUTE_MODES: tuple[str, ...] = ("none", "full", "attention", "mlp")


@dataclass
class TrainSettings:
    """How to train (what to train on is the caller's). Batch sizes count sequences.

    Args:
        max_steps: optimizer steps to train for.
        batch_size: sequences per micro-batch on each process.
        accumulation_steps: micro-batches per optimizer step (global batch = batch_size x this x processes).
        lr: peak learning rate.
        min_lr_ratio: the schedule decays the learning rate to lr x this.
        schedule: decay after the warmup: cosine, linear or constant.
        warmup_steps: steps of linear warmup from 0 to lr.
        optimizer: adamw; adamw-8bit or adamw-4bit (AdamW with block-wise quantized moments: ~1/4 or ~1/8 of its
            state memory); lomo (SGD fused into backward: no state, no whole gradient; clipping by the global norm
            costs a second backward) or adalomo (lomo with Adafactor's factored second moment and normalised
            updates; no clipping). lomo/adalomo need accumulation_steps 1, one process, and not fp16-mixed.
        weight_decay: decoupled weight decay (never on norms, biases and embeddings).
        betas: AdamW's moment decay rates.
        grad_clip: largest global gradient norm (null turns clipping off; adalomo normalises its updates instead).
        precision: fp32, bf16-mixed (autocast; fastest on recent GPUs) or fp16-mixed (with loss scaling).
        compile: torch.compile the model (slow first steps, faster after).
        activation_checkpointing: what each block recomputes in the backward pass instead of keeping: full (the
            whole block: least memory, ~30% more compute; true means full), attention (its attention branch, norm
            included), mlp (its MLP branch, norm included: most of a block's activations for less recompute than
            full) or none (false).
        fused_projections: run q/k/v and gate/up as one matrix product each in forward and backward (names,
            optimizer groups and checkpoints unchanged; a LoRA- or quantization-wrapped projection keeps its own).
        loss_chunk: tokens per chunk of the fused LM head + cross-entropy (0: the plain head): the (tokens x vocab)
            logits and their gradient never exist in full; same loss and gradients (llmkit/train/chunked_loss.py).
        distributed: under torchrun: auto (DDP, weights replicated) or fsdp (FSDP2, weights sharded).
        eval_every: steps between validation runs and text samples (0 turns them off).
        eval_batches: validation batches per run.
        log_every: steps between rows of metrics.jsonl.
        checkpoint_every: steps between checkpoints (one is also written at the end and at each new best).
        keep_last: checkpoints kept besides the best one (the latest is always kept, so the run can resume).
        resume: auto continues from the run directory's latest checkpoint (Ctrl-C and SIGTERM save one after the
            current step); never refuses a directory that has one.
        seed: random seed (weights, data order, sampling).
        device: auto, cpu, cuda or cuda:N.
    """

    max_steps: int = 1000
    batch_size: int = 16
    accumulation_steps: int = 1
    lr: float = 1e-3
    min_lr_ratio: float = 0.1
    schedule: Schedule = "cosine"
    warmup_steps: int = 100
    optimizer: OptimizerName = "adamw"
    weight_decay: float = 0.1
    betas: tuple[float, float] = (0.9, 0.95)
    grad_clip: float | None = 1.0
    precision: Precision = "fp32"
    compile: bool = False
    activation_checkpointing: bool | Recompute = False
    fused_projections: bool = False
    loss_chunk: int = 0
    distributed: Strategy = "auto"
    eval_every: int = 200
    eval_batches: int = 20
    log_every: int = 10
    checkpoint_every: int = 500
    keep_last: int = 2
    resume: Literal["auto", "never"] = "auto"
    seed: int = 1337
    device: str = "auto"


# fields that count something and must be at least 1 (eval_every may be 0: off; keep_last 0 keeps the latest only)
AT_LEAST_ONE = ("max_steps", "batch_size", "accumulation_steps", "log_every", "checkpoint_every", "eval_batches")
AT_LEAST_ZERO = ("warmup_steps", "eval_every", "keep_last", "loss_chunk")


def recompute_mode(setting: bool | str, flag: str = "--train.activation_checkpointing") -> str:
    """The activation-checkpointing mode a setting names: true (the older boolean flag) is full, false is none.

    Raises:
        LlmkitError: a value that is not a boolean or one of RECOMPUTE_MODES.
    """
    if isinstance(setting, bool):
        return "full" if setting else "none"
    if setting not in RECOMPUTE_MODES:
        raise LlmkitError(f"{flag} {setting!r} is unknown; choose one of {', '.join(RECOMPUTE_MODES)} (true means "
                          "full, false none)")
    return setting


def check_settings(settings: TrainSettings, prefix: str = "--train.") -> None:
    """Refuse impossible settings before any work, in one line naming the flag (as the CLI spells it) and the fix.

    Raises:
        LlmkitError: an unknown activation-checkpointing mode, a count below its minimum, a learning rate that is
            not positive, a warmup longer than the run, betas outside [0, 1), min_lr_ratio outside [0, 1] (above 1
            the "decay" makes the learning rate rise), a negative weight decay, or a gradient-clipping norm that is
            not positive.
    """
    recompute_mode(settings.activation_checkpointing, f"{prefix}activation_checkpointing")
    for name in AT_LEAST_ONE:
        if getattr(settings, name) < 1:
            raise LlmkitError(f"{prefix}{name}={getattr(settings, name)} must be at least 1")
    for name in AT_LEAST_ZERO:
        if getattr(settings, name) < 0:
            raise LlmkitError(f"{prefix}{name}={getattr(settings, name)} must be at least 0")
    if settings.warmup_steps > settings.max_steps:
        raise LlmkitError(f"{prefix}warmup_steps={settings.warmup_steps} must be between 0 and "
                          f"max_steps={settings.max_steps}; shorten the warmup or train longer")
    if not settings.lr > 0:
        raise LlmkitError(f"{prefix}lr={settings.lr} must be positive (1e-3 suits small models, 3e-4 larger ones)")
    if len(settings.betas) != 2 or not all(0 <= beta < 1 for beta in settings.betas):
        raise LlmkitError(f"{prefix}betas={list(settings.betas)} must be two numbers in [0, 1), AdamW's moment decay "
                          "rates; the usual ones are [0.9, 0.95]")
    if not 0 <= settings.min_lr_ratio <= 1:
        raise LlmkitError(f"{prefix}min_lr_ratio={settings.min_lr_ratio} must be in [0, 1]: the schedule decays the "
                          "learning rate to lr x min_lr_ratio, so above 1 it would rise; 0.1 is usual")
    if not settings.weight_decay >= 0:
        raise LlmkitError(f"{prefix}weight_decay={settings.weight_decay} must be at least 0 (0 turns it off; 0.1 is "
                          "usual)")
    if settings.grad_clip is not None and not settings.grad_clip > 0:
        raise LlmkitError(f"{prefix}grad_clip={settings.grad_clip} must be positive (or null to turn clipping off)")
    if settings.optimizer not in OPTIMIZERS:
        raise LlmkitError(f"{prefix}optimizer={settings.optimizer!r} is unknown; choose one of {', '.join(OPTIMIZERS)}")
    if settings.fused_projections and settings.distributed == "fsdp":
        raise LlmkitError(f"{prefix}fused_projections views q/k/v in one tensor, which FSDP's per-parameter shards "
                          f"split; drop {prefix}fused_projections or use {prefix}distributed auto (DDP)")
    if settings.optimizer in FUSED_BACKWARD_OPTIMIZERS:
        if settings.accumulation_steps != 1:
            raise LlmkitError(f"{prefix}optimizer={settings.optimizer} updates the weights during each backward pass, so "
                              f"it cannot accumulate gradients over {settings.accumulation_steps} micro-batches; set "
                              f"{prefix}accumulation_steps 1 (raise {prefix}batch_size instead) or use adamw-8bit")
        if settings.precision == "fp16-mixed":
            raise LlmkitError(f"{prefix}optimizer={settings.optimizer} cannot unscale fp16 gradients before its fused "
                              f"update; use {prefix}precision bf16-mixed or fp32")
