"""The PPO loop: rollout -> rewards with the KL penalty -> GAE -> several epochs of clipped updates over minibatches
-> KL controller, logged per step (llmkit.align.ppo has the math).

Why not llmkit.train.loop: that loop draws batches from a fixed data set and takes one optimizer step per batch;
PPO makes its data with the model being trained (a rollout per step), and each rollout is reused for several epochs
of minibatch steps whose targets (old log-probs, advantages) are frozen at rollout time. What it shares with the
one loop: the optimizer builder (llmkit.train.optim.build_optimizer, AdamW and its parameter groups), the metrics
log (llmkit.train.metrics.MetricsLog: metrics.jsonl, CSV, TensorBoard when installed), the checkpoint writer and
reader (llmkit.train.checkpoint: exact resume), the precision autocast and the stop-signal handling. Training runs in
eval mode, so dropout never makes the new/old ratio differ from 1 by noise.
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from llmkit.align.ppo import (
    KLController,
    PolicyWithValue,
    clipped_policy_loss,
    clipped_value_loss,
    gae,
    masked_entropy,
    token_rewards,
    whiten,
)
from llmkit.align.rollout import RewardFn, Rollout, collect_rollout
from llmkit.align.settings import PPOSettings, PPOTrainSettings
from llmkit.errors import LlmkitError
from llmkit.tokenizer import Tokenizer
from llmkit.train.checkpoint import TrainerState
from llmkit.train.distributed import Cluster
from llmkit.train.precision import autocast

PLOTTED = ["reward", "kl", "kl_coef", "entropy", "value_loss", "clip_fraction"]
PLOT_FILE = "ppo.png"


@dataclass
class PPOResult:
    rows: list[dict] = field(default_factory=list)  # one metrics row per step
    plot: Path | None = None


def advantages_and_returns(rollout: Rollout, settings: PPOSettings, kl_coef: float
                           ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(advantages, returns, per-token KL), each (B, L), of a rollout under the current KL coefficient."""
    rewards, kl = token_rewards(rollout.scores, rollout.logps, rollout.ref_logps, rollout.mask, kl_coef,
                                settings.kl_estimator)
    advantages, returns = gae(rewards, rollout.values, rollout.mask, settings.gamma, settings.lam)
    if settings.whiten_advantages:
        advantages = whiten(advantages, rollout.mask)
    return advantages, returns, kl


def ppo_update(model: PolicyWithValue, optimizer: torch.optim.Optimizer, rollout: Rollout, settings: PPOSettings,
               train: PPOTrainSettings, kl_coef: float, generator: torch.Generator) -> dict[str, float]:
    """`settings.ppo_epochs` passes of minibatch steps over one rollout; the means of the logged quantities."""
    advantages, returns, kl = advantages_and_returns(rollout, settings, kl_coef)
    totals = {"policy_loss": 0.0, "value_loss": 0.0, "entropy": 0.0, "clip_fraction": 0.0, "approx_kl": 0.0}
    steps = 0
    size = len(rollout.prompts)
    for _ in range(settings.ppo_epochs):
        order = torch.randperm(size, generator=generator).tolist()
        for start in range(0, size, settings.minibatch_size):
            rows = torch.tensor(order[start:start + settings.minibatch_size], device=rollout.input_ids.device)
            mask = rollout.mask[rows]
            with autocast(train.precision, rollout.input_ids.device):
                logps, values, logits = model.score_responses(rollout.input_ids[rows], rollout.attention_mask[rows],
                                                              rollout.prompt_len)
            policy = clipped_policy_loss(logps, rollout.logps[rows], advantages[rows], mask, settings.clip_range)
            value_loss = clipped_value_loss(values, rollout.values[rows], returns[rows], mask, settings.vf_clip)
            loss = policy.loss + settings.vf_coef * value_loss
            if not torch.isfinite(loss):
                raise LlmkitError(f"the PPO loss became {float(loss)}; lower --train.lr or --kl_coef")
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), train.max_grad_norm)
            optimizer.step()
            with torch.no_grad():
                values_now = {"policy_loss": policy.loss.detach(), "value_loss": value_loss.detach(),
                              "clip_fraction": policy.clip_fraction, "approx_kl": policy.approx_kl,
                              "entropy": masked_entropy(logits, mask)}
            for name, value in values_now.items():
                totals[name] += float(value)
            steps += 1
    means = {name: total / steps for name, total in totals.items()}
    means["kl"] = float(kl.sum(dim=1).mean())  # nats per sequence, the estimator's
    return means


def train_ppo(model: PolicyWithValue, reference: nn.Module | None, tokenizer: Tokenizer, prompts: Sequence[str],
              reward_fn: RewardFn, settings: PPOSettings, train: PPOTrainSettings, output: str | Path | None = None,
              ) -> PPOResult:
    """Run `train.steps` PPO steps on batches of `prompts` (a seeded shuffle, cycled). `reference` is a frozen copy
    of the starting policy, or None for a LoRA policy (its adapter-disabled base). Both move to `train.device`; a
    reward model inside `reward_fn` is the caller's to place. With `output`: OUTPUT/metrics.jsonl, OUTPUT/ppo.png and
    checkpoints (trained parameters, AdamW state, KL coefficient, RNG) every `train.checkpoint_every` steps, at the
    end and on Ctrl-C / SIGTERM; a rerun with the same OUTPUT resumes from the latest one exactly (each step's
    sampling and minibatch order are seeded by its number, so a resumed run repeats what an unbroken one does)."""
    from llmkit.align.runs import plot_metrics
    from llmkit.device import resolve_device
    from llmkit.train.checkpoint import save_checkpoint
    from llmkit.train.loop import StopSignals, interrupted
    from llmkit.train.metrics import METRICS_FILE, MetricsLog
    from llmkit.train.optim import build_optimizer, build_scheduler

    if not prompts:
        raise LlmkitError("no prompts to roll out; give at least one prompt (--prompts FILE.jsonl with a \"prompt\" "
                          "field per line)")
    cluster = Cluster(device=resolve_device(train.device))
    model.to(cluster.device)
    if reference is not None:
        reference.to(cluster.device).eval().requires_grad_(False)
    torch.manual_seed(train.seed)
    optimizer = build_optimizer(model, train.lr, weight_decay=train.weight_decay)
    scheduler = build_scheduler(optimizer, "constant", 0, train.steps, 1.0)
    controller = KLController(settings.kl_coef, settings.target_kl, settings.kl_horizon)
    state = resumed_state(output, train, model, optimizer, scheduler, cluster, controller)
    log = MetricsLog(Path(output), resume_step=state.step) if output is not None else None
    order = list(prompts)
    random.Random(train.seed).shuffle(order)
    result = PPOResult(rows=[row for row in log.rows if row.get("kind") == "train"] if log is not None else [])

    def checkpoint() -> Path:
        state.extra = {"kl_coef": controller.coef}
        return save_checkpoint(Path(output), state, model, optimizer, scheduler, None, cluster,
                               keep_last=train.keep_last, trainable_only=True)

    model.eval()  # no dropout: the update's log-probs must match the rollout's while the weights are unchanged
    # Ctrl-C / SIGTERM: finish the step and checkpoint it (with an OUTPUT; without one they stop the run at once).
    with StopSignals() if output is not None else nullcontext() as stop:
        for step in range(state.step + 1, train.steps + 1):
            start = (step - 1) * train.rollout_batch
            batch = [order[(start + i) % len(order)] for i in range(train.rollout_batch)]
            with autocast(train.precision, cluster.device):
                rollout = collect_rollout(model, reference, tokenizer, batch, reward_fn, settings, train,
                                          train.seed + step)
            kl_coef = controller.coef
            generator = torch.Generator().manual_seed(train.seed + step)  # this step's minibatch order
            metrics = ppo_update(model, optimizer, rollout, settings, train, kl_coef, generator)
            scheduler.step()
            controller.update(metrics["kl"], len(batch))
            state.step = step
            row = {"kind": "train", "step": step, "reward": float(rollout.scores.mean()), **metrics,
                   "kl_coef": kl_coef, "response_tokens": float(rollout.mask.sum(dim=1).mean()),
                   "ended": float(rollout.ended.float().mean()),
                   "samples": [p + " ->" + r for p, r in zip(rollout.prompts, rollout.responses)][:train.samples_logged]}
            result.rows.append(row)
            if log is not None:
                log.log(row)
            print(f"step {step}/{train.steps}: reward {row['reward']:+.3f}  kl {row['kl']:.3f}  kl_coef {kl_coef:.4f}  "
                  f"entropy {row['entropy']:.2f}  value_loss {row['value_loss']:.4f}  clip {row['clip_fraction']:.3f}",
                  flush=True)
            if output is not None and (step % train.checkpoint_every == 0 or step == train.steps or stop.requested):
                saved = checkpoint()
                if stop.requested and step < train.steps:
                    raise interrupted(stop.requested, step, saved, cluster)
    if log is not None:
        log.close(plot_title="PPO")
        result.plot = plot_metrics(Path(output) / METRICS_FILE, PLOTTED, Path(output) / PLOT_FILE, "PPO")
    return result


def resumed_state(output: str | Path | None, train: PPOTrainSettings, model: PolicyWithValue,
                  optimizer: torch.optim.Optimizer, scheduler: torch.optim.lr_scheduler.LRScheduler, cluster: Cluster,
                  controller: KLController) -> TrainerState:
    """A fresh run's state, or the latest checkpoint's in OUTPUT restored into the model, optimizer and controller."""
    from llmkit.train.checkpoint import list_checkpoints, load_checkpoint, remove_incomplete

    if output is None:
        return TrainerState()
    remove_incomplete(Path(output))
    existing = list_checkpoints(Path(output))
    if not existing:
        return TrainerState()
    if train.resume == "never":
        raise LlmkitError(f"{output} already holds PPO checkpoints; pass --train.resume auto to continue that run, or "
                          "choose another --output")
    state = load_checkpoint(existing[-1], model, optimizer, scheduler, None, cluster)
    if not isinstance(state.extra.get("kl_coef"), (int, float)):
        raise LlmkitError(f"{existing[-1]} is not a PPO checkpoint (no KL coefficient in its trainer state); choose "
                          "another --output")
    controller.coef = float(state.extra["kl_coef"])
    print(f"resuming from {existing[-1]} (step {state.step} of {train.steps})")
    return state
