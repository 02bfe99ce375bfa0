"""Training settings: one dataclass of plain values (no torch import), so the CLI can show it without loading torch."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

Schedule = Literal["cosine", "linear", "constant"]
Precision = Literal["fp32", "bf16-mixed", "fp16-mixed"]
Strategy = Literal["auto", "ddp", "fsdp"]


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
        weight_decay: AdamW weight decay (never on norms, biases and embeddings).
        betas: AdamW's moment decay rates.
        grad_clip: largest global gradient norm (null turns clipping off).
        precision: fp32, bf16-mixed (autocast; fastest on recent GPUs) or fp16-mixed (with loss scaling).
        compile: torch.compile the model (slow first steps, faster after).
        activation_checkpointing: recompute each block in the backward pass: much less memory, ~30% more compute.
        distributed: under torchrun: auto (DDP, weights replicated) or fsdp (FSDP2, weights sharded).
        eval_every: steps between validation runs and text samples (0 turns them off).
        eval_batches: validation batches per run.
        log_every: steps between rows of metrics.jsonl.
        checkpoint_every: steps between checkpoints (one is also written at the end and at each new best).
        keep_last: checkpoints kept besides the best one.
        resume: auto continues from the run directory's latest checkpoint; never refuses a directory that has one.
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
    weight_decay: float = 0.1
    betas: tuple[float, float] = (0.9, 0.95)
    grad_clip: float | None = 1.0
    precision: Precision = "fp32"
    compile: bool = False
    activation_checkpointing: bool = False
    distributed: Strategy = "auto"
    eval_every: int = 200
    eval_batches: int = 20
    log_every: int = 10
    checkpoint_every: int = 500
    keep_last: int = 2
    resume: Literal["auto", "never"] = "auto"
    seed: int = 1337
    device: str = "auto"
