"""Training checkpoints: everything needed to continue a run exactly, written atomically.

    RUN/checkpoints/step-00000500/
        config.json, model.safetensors, tokenizer files   a complete llmkit model (`llmkit chat --model` works);
                                                          trainable.safetensors instead when only part trains (PEFT)
        optimizer/                                        AdamW states, torch.distributed.checkpoint shards
        trainer_state.json                                step, data position, scheduler, grad scaler, best loss
        rng-<rank>.safetensors                            each rank's random generator states

A checkpoint is written into a hidden temporary directory and renamed when complete, so a run killed
mid-save leaves the previous checkpoint intact. The last `keep_last` checkpoints and the best one stay.
"""

from __future__ import annotations

import json
import shutil
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from llmkit.checkpoints.native import save_native
from llmkit.errors import LlmkitError
from llmkit.io import atomic_write, atomic_write_text, read_json_object
from llmkit.tokenizer import Tokenizer
from llmkit.train.distributed import (
    Cluster,
    barrier,
    full_state_dict,
    load_full_state_dict,
    load_optimizer,
    save_optimizer,
    unwrap,
)

CHECKPOINTS_DIR = "checkpoints"
STEP_PREFIX = "step-"
TRAINER_STATE_FILE = "trainer_state.json"
TRAINABLE_FILE = "trainable.safetensors"  # instead of model.safetensors when only part of the model trains (PEFT)
RNG_FILE = "rng-{rank}.safetensors"
TEMPORARY_PREFIX = ".incomplete-"


@dataclass
class TrainerState:
    """Progress of a run: optimizer steps taken, training samples consumed (all ranks), tokens seen, best eval."""

    step: int = 0
    position: int = 0
    tokens: int = 0
    best_val_loss: float | None = None
    best_step: int | None = None


def checkpoint_path(run_dir: Path, step: int) -> Path:
    return Path(run_dir) / CHECKPOINTS_DIR / f"{STEP_PREFIX}{step:08d}"


def list_checkpoints(run_dir: Path) -> list[Path]:
    """Complete checkpoints of a run, oldest first."""
    root = Path(run_dir) / CHECKPOINTS_DIR
    if not root.is_dir():
        return []
    found = [path for path in root.glob(f"{STEP_PREFIX}*") if (path / TRAINER_STATE_FILE).is_file()]
    return sorted(found, key=lambda path: path.name)


def remove_incomplete(run_dir: Path) -> None:
    """Delete the half-written checkpoints of a run that was killed while saving."""
    root = Path(run_dir) / CHECKPOINTS_DIR
    for path in root.glob(f"{TEMPORARY_PREFIX}*") if root.is_dir() else []:
        shutil.rmtree(path, ignore_errors=True)


def save_checkpoint(
    run_dir: Path,
    state: TrainerState,
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    scheduler: torch.optim.lr_scheduler.LRScheduler,
    scaler: torch.amp.GradScaler | None,
    cluster: Cluster,
    tokenizer: Tokenizer | None = None,
    keep_last: int = 2,
) -> Path:
    """Write a checkpoint of step `state.step` (every rank calls this) and prune old ones; returns its path."""
    final = checkpoint_path(run_dir, state.step)
    temporary = final.parent / f"{TEMPORARY_PREFIX}{final.name}"
    if cluster.is_main:
        shutil.rmtree(temporary, ignore_errors=True)
        temporary.mkdir(parents=True)
    barrier(cluster)
    weights = full_state_dict(model, cluster)  # collective under FSDP
    trainable = {name for name, parameter in unwrap(model).named_parameters() if parameter.requires_grad}
    partial = len(trainable) < len(list(unwrap(model).parameters()))
    save_optimizer(model, optimizer, temporary)  # collective: each rank writes its shard
    rng = {"cpu": torch.get_rng_state()}
    if cluster.device.type == "cuda":
        rng["cuda"] = torch.cuda.get_rng_state(cluster.device)
    save_file(rng, str(temporary / RNG_FILE.format(rank=cluster.rank)))
    if cluster.is_main:
        if partial:  # fine-tuning a part (PEFT): the frozen base stays where it came from
            tensors = {name: weights[name].contiguous() for name in sorted(trainable)}
            atomic_write(temporary / TRAINABLE_FILE, lambda tmp: save_file(tensors, str(tmp)))
        else:
            save_native(unwrap(model).config, weights, temporary)
        if tokenizer is not None and not partial:
            tokenizer.save(temporary)
        trainer = {
            "state": asdict(state),
            "world_size": cluster.world_size,
            "scheduler": scheduler.state_dict(),  # a partial's state is {}: JSON-safe
            "scaler": scaler.state_dict() if scaler is not None else None,
        }
        atomic_write_text(temporary / TRAINER_STATE_FILE, json.dumps(trainer, indent=2))
    barrier(cluster)
    if cluster.is_main:
        if final.exists():
            shutil.rmtree(final)
        temporary.rename(final)
        _prune(run_dir, keep_last, state.best_step)
    barrier(cluster)
    return final


def load_checkpoint(
    path: Path,
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    scheduler: torch.optim.lr_scheduler.LRScheduler,
    scaler: torch.amp.GradScaler | None,
    cluster: Cluster,
) -> TrainerState:
    """Restore model, optimizer, scheduler, scaler and this rank's RNG from `path`; returns the run's progress."""
    from llmkit.checkpoints.native import load_native

    path = Path(path)
    trainer = read_json_object(path / TRAINER_STATE_FILE)
    try:
        state = TrainerState(**trainer["state"])
    except (KeyError, TypeError) as error:
        raise LlmkitError(f"{path / TRAINER_STATE_FILE} is not a training state ({error}); delete that checkpoint "
                          "directory to resume from an earlier one") from None
    if (path / TRAINABLE_FILE).is_file():
        _load_trainable(model, load_file(str(path / TRAINABLE_FILE)), path)
    else:
        config, weights = load_native(path)
        expected = unwrap(model).config
        if config != expected:
            raise LlmkitError(f"{path} holds a model with a different config than this run's ({config.name}: "
                              f"{config.n_layers} layers, d_model {config.d_model}); use a new --output directory or "
                              "the same model settings")
        load_full_state_dict(model, weights, cluster)
    load_optimizer(model, optimizer, path)
    scheduler.load_state_dict(trainer["scheduler"])
    if scaler is not None and trainer.get("scaler"):
        scaler.load_state_dict(trainer["scaler"])
    rng_path = path / RNG_FILE.format(rank=cluster.rank)
    if rng_path.is_file():  # absent when resuming on more ranks than saved: those ranks keep their fresh seed
        rng = load_file(str(rng_path))
        torch.set_rng_state(rng["cpu"])
        if "cuda" in rng and cluster.device.type == "cuda":
            torch.cuda.set_rng_state(rng["cuda"], cluster.device)
    return state


def _load_trainable(model: torch.nn.Module, tensors: dict[str, torch.Tensor], path: Path) -> None:
    """Copy a partial checkpoint's trained tensors into the model (same names as this run's trainable parameters)."""
    parameters = {name: p for name, p in unwrap(model).named_parameters() if p.requires_grad}
    if set(parameters) != set(tensors):
        raise LlmkitError(f"{path / TRAINABLE_FILE} holds other trained parameters than this run trains; use a new "
                          "--output directory or the same fine-tuning method and settings")
    with torch.no_grad():
        for name, tensor in tensors.items():
            parameters[name].copy_(tensor)


def _prune(run_dir: Path, keep_last: int, best_step: int | None) -> None:
    keep = {path.name for path in list_checkpoints(run_dir)[-max(1, keep_last):]}
    if best_step is not None:
        keep.add(checkpoint_path(run_dir, best_step).name)
    for path in list_checkpoints(run_dir):
        if path.name not in keep:
            shutil.rmtree(path)
