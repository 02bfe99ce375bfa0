"""The one training loop. It knows nothing about what is trained or on what: an *objective* turns
(model, batch) into a loss and a *batch source* returns the batch at a data position. Every lever
(accumulation, clipping, precision, compile, activation checkpointing, DDP/FSDP2, evaluation,
checkpoints and exact resume) is a field of `TrainSettings`.
"""

from __future__ import annotations

import math
import re
import signal
import time
from collections import deque
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path

import torch
from torch import nn
from tqdm.auto import tqdm

from llmkit import estimate
from llmkit.config import Config
from llmkit.data.batch import Batch, input_units
from llmkit.errors import LlmkitError
from llmkit.nn.fused import fuse_projections
from llmkit.nn.moe import expert_utilisation
from llmkit.tokenizer import Tokenizer
from llmkit.train.checkpoint import (
    TrainerState,
    list_checkpoints,
    load_checkpoint,
    remove_incomplete,
    save_checkpoint,
)
from llmkit.train.distributed import (
    Cluster,
    all_reduce_sum,
    gradient_sync,
    init_cluster,
    unwrap,
    wrap_model,
)
from llmkit.train.interrupt import StopSignals, TrainingInterrupted, interrupted  # noqa: F401 (importable here too)
from llmkit.train.metrics import CROSS_ENTROPY, MetricsLog
from llmkit.train.objectives import Objective, label_tokens, loss_label
from llmkit.train.optim import build_optimizer, build_scheduler
from llmkit.train.precision import autocast, compute_dtype, grad_scaler
from llmkit.train.recompute import enable_activation_checkpointing
from llmkit.train.settings import Precision, TrainSettings, check_settings

# batch(position, batch_size, rank, world_size): the rank's slice of the global batch starting at sample `position`
# torch.cuda.get_device_name -> llmkit.estimate.GPU_PEAK_TFLOPS key ("NVIDIA H100 80GB HBM3" is the SXM part)
GPU_NAME_PATTERNS = [(r"H200", "H200"), (r"H100.*PCIE", "H100-PCIe"), (r"H100", "H100-SXM"), (r"A100", "A100"),
                     (r"\bL4\b", "L4"), (r"4090", "RTX-4090"), (r"V100", "V100")]
THROUGHPUT_WINDOW = 20  # steps over which tokens/s and the ETA are measured (not since the start: compile, resume)
BatchSource = Callable[[int, int, int, int], Batch]
EvalCallback = Callable[[nn.Module, int], dict | None]


@dataclass
class TrainResult:
    steps: int
    tokens: int
    train_loss: float
    val_loss: float | None
    checkpoint: Path | None
    best_checkpoint: Path | None
    plot: Path | None
    losses: list[float] = field(default_factory=list)


def train(
    model: nn.Module,
    objective: Objective,
    train_batches: BatchSource,
    settings: TrainSettings,
    run_dir: str | Path,
    eval_batches: Callable[[], Iterable[Batch]] | None = None,
    on_eval: EvalCallback | None = None,
    tokenizer: Tokenizer | None = None,
    cluster: Cluster | None = None,
) -> TrainResult:
    """Train `model` for `settings.max_steps` optimizer steps; resumes from `run_dir` when it holds checkpoints."""
    from llmkit.device import resolve_device

    check_settings(settings)
    run_dir = Path(run_dir)
    cluster = cluster or init_cluster(resolve_device(settings.device), settings.distributed)
    if settings.precision == "fp16-mixed" and cluster.strategy == "fsdp":
        raise LlmkitError("fp16-mixed is not supported with FSDP; use --precision bf16-mixed")
    if settings.optimizer in ("adamw-8bit", "adamw-4bit") and cluster.strategy == "fsdp":
        raise LlmkitError(f"--train.optimizer {settings.optimizer} keeps whole-tensor quantization blocks, which FSDP's "
                          "sharded parameters split; use --train.distributed auto (DDP) or --train.optimizer adamw")
    if settings.optimizer in estimate.FUSED_BACKWARD_OPTIMIZERS and cluster.world_size > 1:
        raise LlmkitError(f"--train.optimizer {settings.optimizer} updates each weight during backward, before DDP/FSDP "
                          "could average its gradient over processes; run it on one process or use adamw-8bit")
    model.to(cluster.device)
    if settings.fused_projections:  # after .to(): moving a model gives each part its own storage again
        fuse_projections(model)
    enable_activation_checkpointing(model, settings.activation_checkpointing)  # none (false): nothing
    dtype = compute_dtype(settings.precision)
    model = wrap_model(model, cluster, param_dtype=dtype if dtype != torch.float32 else None)
    optimizer = build_optimizer(model, settings.lr, settings.weight_decay, settings.betas, optimizer=settings.optimizer)
    fused_backward = getattr(optimizer, "updates_in_backward", False)
    scheduler = build_scheduler(optimizer, settings.schedule, settings.warmup_steps, settings.max_steps,
                                settings.min_lr_ratio)
    scaler = grad_scaler(settings.precision, cluster.device)

    state = TrainerState()
    if cluster.is_main:
        remove_incomplete(run_dir)
    existing = list_checkpoints(run_dir)
    if existing and settings.resume == "auto":
        state = load_checkpoint(existing[-1], model, optimizer, scheduler, scaler, cluster)
        if cluster.is_main:
            print(f"resuming from {existing[-1]} (step {state.step})")
    elif existing:
        raise LlmkitError(f"{run_dir} already holds checkpoints; pass --resume auto to continue that run, or choose "
                          "another output directory")
    if state.step >= settings.max_steps and cluster.is_main:
        print(f"{run_dir} is already trained to step {state.step} (max_steps={settings.max_steps}); raise max_steps "
              "to train further")

    # FSDP applies the parameter dtype itself; single/DDP processes use autocast.
    autocast_precision = "fp32" if cluster.strategy == "fsdp" else settings.precision
    step_model = torch.compile(model) if settings.compile else model
    metrics = MetricsLog(run_dir, enabled=cluster.is_main, resume_step=state.step)
    rank, world = cluster.rank, cluster.world_size
    progress = tqdm(total=settings.max_steps, initial=state.step, disable=not cluster.is_main or None,
                    desc="train", unit="step", dynamic_ncols=True)
    losses, val_loss, last_checkpoint = [], None, None
    started = time.perf_counter()
    recent = deque([(started, state.tokens)], maxlen=THROUGHPUT_WINDOW + 1)  # (time, tokens) of the last steps
    parameters = [p for p in model.parameters() if p.requires_grad]
    peak_flops = gpu_peak_flops(cluster.device)
    flops_per_token = None

    stop = StopSignals()
    with stop:
        while state.step < settings.max_steps:
            step_model.train()
            micro_batches = [train_batches(state.position + micro * settings.batch_size * world, settings.batch_size,
                                           rank, world) for micro in range(settings.accumulation_steps)]
            state.position += settings.accumulation_steps * settings.batch_size * world
            step_tokens = sum(input_units(batch) for batch in micro_batches) * world  # images for image batches
            if flops_per_token is None and peak_flops is not None and counts_text_flops(unwrap(model), micro_batches[0]):
                flops_per_token = estimate.flops_per_token(unwrap(model).config, micro_batches[0]["input_ids"].shape[1],
                                                           attention=True)
            lr = scheduler.get_last_lr()[0]
            if fused_backward:  # LOMO / AdaLomo: the backward pass itself updates the weights
                sums, grad_norm = fused_backward_step(optimizer, settings.grad_clip, partial(
                    accumulate_gradients, step_model, objective, micro_batches, cluster, autocast_precision,
                    step=state.step + 1))
            else:
                sums = accumulate_gradients(step_model, objective, micro_batches, cluster, autocast_precision, scaler,
                                            step=state.step + 1)
                if scaler is not None:
                    scaler.unscale_(optimizer)
                grad_norm = clip_gradients(parameters, settings.grad_clip)
            if scaler is not None:
                scaler.step(optimizer)
                scaler.update()
            else:
                optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            scheduler.step()
            state.step += 1
            state.tokens += step_tokens

            loss_value, stopping = reduce_step(sums, stop.requested, cluster, state.step)
            objective_metrics = reduce_metrics(sums, cluster)
            losses.append(loss_value)
            now = time.perf_counter()
            recent.append((now, state.tokens))
            elapsed, window = now - started, now - recent[0][0]
            tokens_per_second = (state.tokens - recent[0][1]) / max(window, 1e-9)
            eta = (settings.max_steps - state.step) * window / (len(recent) - 1)
            # Model FLOPs utilisation on a known GPU: achieved training FLOP/s over the datasheet's dense bf16 peak.
            mfu = {"mfu": tokens_per_second * flops_per_token / peak_flops} if flops_per_token else {}
            progress.update(1)
            progress.set_postfix(loss=f"{loss_value:.4f}", lr=f"{lr:.2e}", tok_s=f"{tokens_per_second:,.0f}",
                                 **{key: f"{value:.1%}" for key, value in mfu.items()}, refresh=False)
            if state.step % settings.log_every == 0 or state.step in (1, settings.max_steps):
                if progress.disable and cluster.is_main:  # no terminal (a log file, CI): one line per logged step
                    print(f"step {state.step}/{settings.max_steps} loss {loss_value:.4f} lr {lr:.2e} "
                          f"{tokens_per_second:,.0f} tok/s eta {eta:,.0f}s", flush=True)
                metrics.log({"kind": "train", "step": state.step, "loss": loss_value, "lr": lr,
                             "grad_norm": grad_norm, "tokens": state.tokens, "tokens_per_s": tokens_per_second,
                             "elapsed_s": elapsed, **mfu, **objective_metrics,
                             **expert_utilisation(unwrap(model))})  # routing of the last micro-batch (MoE only)
            if stopping:  # every rank agreed in reduce_step, so every rank saves (a collective) and stops here
                last_checkpoint = save_checkpoint(run_dir, state, model, optimizer, scheduler, scaler, cluster,
                                                  tokenizer, settings.keep_last)
                progress.close()
                metrics.close(plot_title=f"{unwrap(model).config.name}: loss", ylabel=loss_label(objective))
                raise interrupted(stop.requested or signal.SIGINT, state.step, last_checkpoint, cluster)

            is_last = state.step == settings.max_steps
            if eval_batches is not None and settings.eval_every and (state.step % settings.eval_every == 0 or is_last):
                val_loss = evaluate_loss(step_model, objective, eval_batches, settings, cluster, autocast_precision)
                row = {"kind": "eval", "step": state.step, "val_loss": val_loss}
                if loss_label(objective) == CROSS_ENTROPY:  # exp(loss) is a perplexity only for cross-entropy
                    row["val_perplexity"] = math.exp(min(val_loss, 50))
                if on_eval is not None:
                    row.update(on_eval(unwrap(model), state.step) or {})
                metrics.log(row)
                if cluster.is_main:
                    perplexity = f", perplexity {row['val_perplexity']:.2f}" if "val_perplexity" in row else ""
                    progress.write(f"step {state.step}: validation loss {val_loss:.4f}{perplexity}")
                improved = state.best_val_loss is None or val_loss < state.best_val_loss
                if improved:
                    state.best_val_loss, state.best_step = val_loss, state.step
            else:
                improved = False
            # A new best validation loss is checkpointed too, so the best model is always on disk.
            if state.step % settings.checkpoint_every == 0 or is_last or improved:
                last_checkpoint = save_checkpoint(run_dir, state, model, optimizer, scheduler, scaler, cluster, tokenizer,
                                                  settings.keep_last)
    progress.close()
    plot = metrics.close(plot_title=f"{unwrap(model).config.name}: loss", ylabel=loss_label(objective))
    checkpoints = list_checkpoints(run_dir)
    best = next((path for path in checkpoints if state.best_step is not None and path.name.endswith(
        f"{state.best_step:08d}")), None)
    return TrainResult(steps=state.step, tokens=state.tokens, train_loss=losses[-1] if losses else float("nan"),
                       val_loss=val_loss, checkpoint=last_checkpoint or (checkpoints[-1] if checkpoints else None),
                       best_checkpoint=best, plot=plot, losses=losses)


@dataclass
class StepSums:
    """This rank's sums over one optimizer step's micro-batches (0-dim tensors, not yet reduced over ranks)."""

    loss: torch.Tensor  # sum of the token losses S_m of its micro-batches
    aux: torch.Tensor  # sum of the micro-batches' auxiliary losses, each divided by the accumulation steps
    counted: torch.Tensor  # label tokens the objective said it summed over
    tokens: int  # label tokens of the whole step, every micro-batch of every rank (N)
    metrics: dict[str, torch.Tensor] = field(default_factory=dict)  # sums of the objective's TokenLoss.metrics


def accumulate_gradients(
    model: nn.Module,
    objective: Objective,
    micro_batches: list[Batch],
    cluster: Cluster,
    precision: Precision = "fp32",
    scaler: torch.amp.GradScaler | None = None,
    step: int = 1,
) -> StepSums:
    """Forward and backward over one optimizer step's micro-batches (this rank's), leaving in `.grad` the gradient of

        L = sum_{m,r} S_{m,r} / N  +  mean_{m,r} aux_{m,r}

    S_{m,r}: summed token losses of micro-batch m on rank r, N: label tokens of all micro-batches on all ranks,
    counted from the batches *before* the first forward (one all-reduce per step). So a micro-batch or a rank with
    3 label tokens weighs 3/N and one with 300 weighs 300/N: the gradient is that of one batch holding them all.
    DDP and FSDP average gradients over the W ranks, so each rank back-propagates S_{m,r} * W / N.

    Auxiliary losses (mixture-of-experts load balancing and z-loss) are means over their micro-batch's routing
    already, not sums over label tokens: each keeps its usual weight per micro-batch, aux / accumulation_steps
    here, averaged over ranks by the gradient all-reduce, as when it was added to a per-micro-batch mean loss.
    """
    local = sum(int(label_tokens(batch)) for batch in micro_batches)  # on the batches' device: usually the CPU
    tokens = int(all_reduce_sum(torch.tensor(local, device=cluster.device), cluster)) if cluster.world_size > 1 else local
    if tokens == 0:
        raise LlmkitError(f"step {step} has no label tokens to learn from (every label of its batches is ignored); "
                          "check the data: e.g. prompts longer than --max_length leave no completion to train on")
    sums = StepSums(loss=torch.zeros((), device=cluster.device), aux=torch.zeros((), device=cluster.device),
                    counted=torch.zeros((), dtype=torch.long, device=cluster.device), tokens=tokens)
    last = len(micro_batches) - 1
    for index, batch in enumerate(micro_batches):
        batch = {name: tensor.to(cluster.device, non_blocking=True) for name, tensor in batch.items()}
        with gradient_sync(model, cluster, index == last):
            with autocast(precision, cluster.device):
                terms = objective(model, batch)
                loss = terms.total * cluster.world_size / tokens  # S * W / N
                if terms.aux is not None:
                    aux = terms.aux / len(micro_batches)
                    loss = loss + aux
                    sums.aux += aux.detach().float()
            (scaler.scale(loss) if scaler is not None else loss).backward()
        sums.loss += terms.total.detach().float()
        sums.counted += terms.tokens.to(cluster.device)
        for name, value in (terms.metrics or {}).items():
            sums.metrics[name] = sums.metrics.get(name, 0) + value.detach().float()
    return sums


def reduce_metrics(sums: StepSums, cluster: Cluster) -> dict[str, float]:
    """The step's objective metrics, each sum / N over every micro-batch and rank (one all-reduce; none without
    metrics)."""
    if not sums.metrics:
        return {}
    names = sorted(sums.metrics)
    values = all_reduce_sum(torch.stack([sums.metrics[name].double() for name in names]), cluster)
    return {name: value / sums.tokens for name, value in zip(names, values.tolist(), strict=True)}


def reduce_step(sums: StepSums, stop_requested: int | None, cluster: Cluster, step: int) -> tuple[float, bool]:
    """The step's reported loss, sum S / N + mean aux (the L the gradient was taken of), and whether any rank was
    asked to stop: one all-reduce, so every rank takes the same decision after the same step."""
    values = torch.stack([sums.loss.double(), sums.aux.double(), sums.counted.double(),
                          torch.tensor(float(stop_requested is not None), dtype=torch.float64, device=sums.loss.device)])
    loss_sum, aux_sum, counted, stops = all_reduce_sum(values, cluster).tolist()
    if counted != sums.tokens:
        raise LlmkitError(f"the objective summed its loss over {counted:.0f} tokens but step {step}'s batches have "
                          f"{sums.tokens} labels that are not IGNORE_INDEX; an objective's TokenLoss.tokens must "
                          "count exactly those (llmkit.train.objectives.label_tokens)")
    loss = loss_sum / sums.tokens + aux_sum / cluster.world_size
    if not math.isfinite(loss):
        raise LlmkitError(f"the loss became {loss} at step {step}; lower --lr, use a longer warmup, "
                          "or bf16 instead of fp16")
    return loss, stops > 0


def counts_text_flops(model: nn.Module, batch: Batch) -> bool:
    """Whether the planner's FLOPs per token describe this model and batch (for MFU): a text model's one `Config`
    (not CLIP's or a VLM's composite one, not a speech model) fed token ids (not images)."""
    config = getattr(model, "config", None)
    return (isinstance(config, Config) and config.arch in ("decoder", "encoder", "seq2seq") and "input_ids" in batch
            and "pixel_values" not in batch)


def gpu_peak_flops(device: torch.device) -> float | None:
    """Dense bf16 peak FLOP/s of this CUDA device when llmkit.estimate knows it (None on CPU or an unknown GPU)."""
    return peak_flops_of(torch.cuda.get_device_name(device)) if device.type == "cuda" else None


def peak_flops_of(gpu_name: str) -> float | None:
    """Dense bf16 peak FLOP/s of a GPU from its CUDA device name, or None when llmkit.estimate does not list it."""
    key = next((key for pattern, key in GPU_NAME_PATTERNS if re.search(pattern, gpu_name.upper())), None)
    return estimate.GPU_PEAK_TFLOPS[key] * 1e12 if key else None


def fused_backward_step(optimizer: torch.optim.Optimizer, max_norm: float | None,
                        backward: Callable[[], StepSums]) -> tuple[StepSums, float | None]:
    """One step of an optimizer that updates inside backward (llmkit.train.optimizers: LOMO, AdaLomo): `backward()`
    runs the step's forward and backward. LOMO clips by the global norm with a first pass that only measures it
    (twice the compute); AdaLomo normalises its updates and reports no norm."""
    grad_norm = None
    if max_norm is not None and optimizer.needs_grad_norm_pass:
        with optimizer.measure_grad_norm():
            backward()
        grad_norm = optimizer.grad_norm()
        optimizer.clip_to(max_norm, grad_norm)
    return backward(), grad_norm


def clip_gradients(parameters: list[torch.Tensor], max_norm: float | None) -> float:
    """Scale gradients so their global L2 norm is at most `max_norm`; returns the norm before clipping."""
    norm = torch.nn.utils.clip_grad_norm_(parameters, max_norm if max_norm is not None else float("inf"))
    if hasattr(norm, "full_tensor"):  # FSDP2: the norm is a DTensor over the shards
        norm = norm.full_tensor()
    return norm.item()


@torch.no_grad()
def evaluate_loss(
    model: nn.Module,
    objective: Objective,
    eval_batches: Callable[[], Iterable[Batch]],
    settings: TrainSettings,
    cluster: Cluster,
    precision: Precision,
) -> float:
    """Mean over the validation batches of each batch's mean loss (`TokenLoss.mean`); ranks take turns, so each batch
    is scored once."""
    model.eval()
    total = torch.zeros(2, device=cluster.device)  # (loss sum, batches)
    for index, batch in enumerate(eval_batches()):
        if index >= settings.eval_batches:
            break
        if index % cluster.world_size != cluster.rank:
            continue
        batch = {name: tensor.to(cluster.device) for name, tensor in batch.items()}
        with autocast(precision, cluster.device):
            total[0] += objective(model, batch).mean().float()
        total[1] += 1
    total = all_reduce_sum(total, cluster)
    if total[1] == 0:
        raise LlmkitError("the validation data has no batches; prepare more validation data or set --eval_every 0")
    return (total[0] / total[1]).item()
