"""Training checkpoints: everything needed to continue a run exactly, written atomically, read without pickle.

    RUN/checkpoints/step-00000500/
        config.json, model.safetensors, tokenizer files   a complete llmkit model (`llmkit chat --model` works);
                                                          trainable.safetensors instead when only part trains (PEFT)
        optimizer.safetensors                             every optimizer tensor, whole (gathered from FSDP2 shards),
                                                          named "state/<parameter name>/<entry>" (exp_avg, exp_avg_sq,
                                                          step)
        optimizer.json                                    the rest of the optimizer state: {"format", "optimizer"
                                                          (class name), "state": {parameter name: {entry: value}},
                                                          "param_groups": [{lr, betas, ..., "params": [names]}]};
                                                          a tensor value is {"__tensor__": its optimizer.safetensors
                                                          name}, a tuple {"__tuple__": [...]}
        trainer_state.json                                step, data position, scheduler, grad scaler, best loss
        rng-<rank>.safetensors                            each rank's random generator states

Rank 0 writes the single optimizer file set (DDP: every rank holds the same state; FSDP2: the shards are gathered
to rank 0 on the CPU) and every rank reads it back, FSDP2 ranks keeping their own shard, so a run may resume on
another number of processes. Nothing here unpickles: a checkpoint from another machine or person can be resumed
without running its code. The `optimizer/` folder of older llmkit versions (torch.distributed.checkpoint, whose
`.metadata` is a pickle) is never read; such a checkpoint is refused with advice.

A checkpoint is written into a hidden temporary directory and renamed when complete, so a run killed
mid-save leaves the previous checkpoint intact. The last `keep_last` checkpoints and the best one stay.
"""

from __future__ import annotations

import json
import shutil
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from llmkit.checkpoints import saved_config
from llmkit.checkpoints.native import save_native
from llmkit.errors import LlmkitError
from llmkit.io import atomic_write, atomic_write_text, read_json_object
from llmkit.tokenizer import Tokenizer
from llmkit.train.distributed import (
    Cluster,
    barrier,
    full_optimizer_state_dict,
    full_state_dict,
    load_full_optimizer_state_dict,
    load_full_state_dict,
    local_optimizer_state_dict,
    unwrap,
)

CHECKPOINTS_DIR = "checkpoints"
STEP_PREFIX = "step-"
TRAINER_STATE_FILE = "trainer_state.json"
TRAINABLE_FILE = "trainable.safetensors"  # instead of model.safetensors when only part of the model trains (PEFT)
RNG_FILE = "rng-{rank}.safetensors"
TEMPORARY_PREFIX = ".incomplete-"
OPTIMIZER_TENSORS_FILE = "optimizer.safetensors"
OPTIMIZER_STATE_FILE = "optimizer.json"
OPTIMIZER_FORMAT = "llmkit-optimizer-1"
LEGACY_OPTIMIZER_DIR = "optimizer"  # torch.distributed.checkpoint shards of older versions: a pickle, never read
TENSOR_TAG = "__tensor__"  # {"__tensor__": "state/<name>/exp_avg"}: that tensor of optimizer.safetensors
TUPLE_TAG = "__tuple__"  # {"__tuple__": [0.9, 0.95]}: JSON has lists only, and AdamW's betas is a tuple
RESTART_ADVICE = ("delete that checkpoint directory to resume from the one before it (or start over when it is the "
                  "only one), or choose a new --output directory")


@dataclass
class TrainerState:
    """Progress of a run: optimizer steps taken, training samples consumed (all ranks), tokens seen, best eval, and
    what a recipe with its own loop keeps besides (`extra`, JSON values: PPO's KL coefficient)."""

    step: int = 0
    position: int = 0
    tokens: int = 0
    best_val_loss: float | None = None
    best_step: int | None = None
    extra: dict = field(default_factory=dict)


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
    trainable_only: bool = False,
) -> Path:
    """Write a checkpoint of step `state.step` (every rank calls this) and prune old ones; returns its path.
    `trainable_only` writes the trained parameters by name even when all of them train (a model that is not a plain
    llmkit model, such as PPO's policy with its value head, has no native form)."""
    final = checkpoint_path(run_dir, state.step)
    temporary = final.parent / f"{TEMPORARY_PREFIX}{final.name}"
    if cluster.is_main:
        shutil.rmtree(temporary, ignore_errors=True)
        temporary.mkdir(parents=True)
    barrier(cluster)
    weights = full_state_dict(model, cluster)  # collective under FSDP
    trainable = {name for name, parameter in unwrap(model).named_parameters() if parameter.requires_grad}
    partial = trainable_only or len(trainable) < len(list(unwrap(model).parameters()))
    optimizer_state = full_optimizer_state_dict(model, optimizer)  # collective under FSDP; whole on rank 0 only
    rng = {"cpu": torch.get_rng_state()}
    if cluster.device.type == "cuda":
        rng["cuda"] = torch.cuda.get_rng_state(cluster.device)
    save_file(rng, str(temporary / RNG_FILE.format(rank=cluster.rank)))
    if cluster.is_main:
        if partial:  # fine-tuning a part (PEFT): the frozen base stays where it came from
            tensors = {name: weights[name].contiguous() for name in sorted(trainable)}
            atomic_write(temporary / TRAINABLE_FILE, lambda tmp: save_file(tensors, str(tmp)))
        else:
            save_native(saved_config(unwrap(model)), weights, temporary)
        if tokenizer is not None and not partial:
            tokenizer.save(temporary)
        write_optimizer_state(optimizer_state, type(optimizer).__name__, temporary)
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
        scheduler_state = trainer["scheduler"]
    except (KeyError, TypeError) as error:
        raise LlmkitError(f"{path / TRAINER_STATE_FILE} is not a training state ({error!r}); "
                          f"{RESTART_ADVICE}") from None
    optimizer_state = read_optimizer_state(path, type(optimizer).__name__)  # before anything changes: fail early
    if (path / TRAINABLE_FILE).is_file():
        _load_trainable(model, _read_tensors(path / TRAINABLE_FILE), path)
    else:
        config, weights = load_native(path)
        expected = saved_config(unwrap(model))
        if config != expected:
            raise LlmkitError(f"{path} holds a model with a different config than this run's ({config.name}: "
                              f"{config.n_layers} layers, d_model {config.d_model}); use a new --output directory or "
                              "the same model settings")
        load_full_state_dict(model, weights, cluster)
    _check_optimizer_state(optimizer_state, local_optimizer_state_dict(model, optimizer), path)
    load_full_optimizer_state_dict(model, optimizer, optimizer_state)
    scheduler.load_state_dict(scheduler_state)
    if scaler is not None and trainer.get("scaler"):
        scaler.load_state_dict(trainer["scaler"])
    rng_path = path / RNG_FILE.format(rank=cluster.rank)
    if rng_path.is_file():  # absent when resuming on more ranks than saved: those ranks keep their fresh seed
        rng = _read_tensors(rng_path)
        if "cpu" not in rng:
            raise LlmkitError(f"{rng_path} lacks the CPU generator state 'cpu'; {RESTART_ADVICE}")
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


# Optimizer state without pickle: tensors in safetensors, everything else in JSON (see the module docstring).


def write_optimizer_state(state: dict, optimizer_name: str, directory: Path) -> None:
    """Write a whole, name-keyed optimizer state (`get_optimizer_state_dict`'s form) as optimizer.safetensors plus
    optimizer.json in `directory`, each atomically."""
    tensors: dict[str, torch.Tensor] = {}
    document = {
        "format": OPTIMIZER_FORMAT,
        "optimizer": optimizer_name,
        "state": _encode(state.get("state", {}), "state", tensors),
        "param_groups": _encode(state.get("param_groups", []), "param_groups", tensors),
    }
    atomic_write(directory / OPTIMIZER_TENSORS_FILE, lambda tmp: save_file(tensors, str(tmp)))
    atomic_write_text(directory / OPTIMIZER_STATE_FILE, json.dumps(document, indent=1))


def read_optimizer_state(directory: Path, optimizer_name: str) -> dict:
    """The optimizer state a checkpoint holds, in `write_optimizer_state`'s form, checked to be `optimizer_name`'s;
    a missing, truncated or old-format (pickled) state is a readable error."""
    directory = Path(directory)
    for name in (OPTIMIZER_STATE_FILE, OPTIMIZER_TENSORS_FILE):
        if not (directory / name).is_file():
            raise LlmkitError(_missing_optimizer_message(directory, name))
    document = _read_optimizer_document(directory / OPTIMIZER_STATE_FILE)
    if document["optimizer"] != optimizer_name:
        raise LlmkitError(f"{directory / OPTIMIZER_STATE_FILE} holds {document['optimizer']} state but this run "
                          f"uses {optimizer_name}; {RESTART_ADVICE}")
    tensors = _read_tensors(directory / OPTIMIZER_TENSORS_FILE)
    return {key: _decode(document[key], tensors, directory) for key in ("state", "param_groups")}


def _missing_optimizer_message(directory: Path, name: str) -> str:
    if (directory / LEGACY_OPTIMIZER_DIR).is_dir():
        return (f"{directory} keeps its optimizer state in {LEGACY_OPTIMIZER_DIR}/, the torch.distributed.checkpoint "
                "layout of older llmkit versions, which is read by unpickling (loading a pickle can run arbitrary "
                f"code) and so is never read; {RESTART_ADVICE}")
    return f"{directory / name} is missing, so the optimizer state cannot be restored; {RESTART_ADVICE}"


def _read_optimizer_document(path: Path) -> dict:
    """optimizer.json, checked for the keys and format version this code reads."""
    try:
        document = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise LlmkitError(f"{path} is not valid JSON ({error}); {RESTART_ADVICE}") from None
    keys = ("format", "optimizer", "state", "param_groups")
    if (not isinstance(document, dict) or any(key not in document for key in keys)
            or not isinstance(document["state"], dict) or not isinstance(document["param_groups"], list)
            or not all(isinstance(group, dict) for group in document["param_groups"])):
        raise LlmkitError(f"{path} is not an llmkit optimizer state (an object with {', '.join(keys)}: state an "
                          f"object, param_groups a list of objects); {RESTART_ADVICE}")
    if document["format"] != OPTIMIZER_FORMAT:
        raise LlmkitError(f"{path} has format {document['format']!r}; this llmkit reads {OPTIMIZER_FORMAT!r}: "
                          f"{RESTART_ADVICE}")
    return document


def _read_tensors(path: Path) -> dict[str, torch.Tensor]:
    """A safetensors file of a checkpoint; a damaged one is a readable error."""
    if not path.is_file():
        raise LlmkitError(f"{path} is missing; {RESTART_ADVICE}")
    try:
        return load_file(str(path))
    except (SafetensorError, OSError) as error:
        raise LlmkitError(f"{path} is not a readable safetensors file ({error}); {RESTART_ADVICE}") from None


def _encode(value, where: str, tensors: dict[str, torch.Tensor]):
    """`value` as JSON, its tensors moved into `tensors` under their path (`where`) and replaced by a reference."""
    if isinstance(value, torch.Tensor):
        tensors[where] = value.detach().cpu().contiguous()
        return {TENSOR_TAG: where}
    if isinstance(value, tuple):
        return {TUPLE_TAG: [_encode(item, f"{where}/{index}", tensors) for index, item in enumerate(value)]}
    if isinstance(value, list):
        return [_encode(item, f"{where}/{index}", tensors) for index, item in enumerate(value)]
    if isinstance(value, dict):
        if not all(isinstance(key, str) and key not in (TENSOR_TAG, TUPLE_TAG) for key in value):
            raise LlmkitError(f"optimizer state {where} has keys {list(value)[:4]}; llmkit checkpoints name states by "
                              "parameter name (strings): use an optimizer built over named parameters")
        return {key: _encode(item, f"{where}/{key}", tensors) for key, item in value.items()}
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    raise LlmkitError(f"optimizer state {where} is a {type(value).__name__}; llmkit checkpoints store tensors, "
                      "numbers, strings, lists and dicts: use an optimizer whose state holds only those")


def _decode(value, tensors: dict[str, torch.Tensor], directory: Path):
    """The inverse of `_encode`: references become the tensors of optimizer.safetensors, tagged lists tuples."""
    if isinstance(value, list):
        return [_decode(item, tensors, directory) for item in value]
    if not isinstance(value, dict):
        return value
    if set(value) == {TENSOR_TAG}:
        if value[TENSOR_TAG] not in tensors:
            raise LlmkitError(f"{directory / OPTIMIZER_TENSORS_FILE} lacks the tensor {value[TENSOR_TAG]!r} that "
                              f"{OPTIMIZER_STATE_FILE} refers to; {RESTART_ADVICE}")
        return tensors[value[TENSOR_TAG]]
    if set(value) == {TUPLE_TAG}:
        return tuple(_decode(item, tensors, directory) for item in value[TUPLE_TAG])
    return {key: _decode(item, tensors, directory) for key, item in value.items()}


def _check_optimizer_state(saved: dict, expected: dict, path: Path) -> None:
    """Refuse an optimizer state for other parameters, groups or shapes than this run's optimizer holds (`expected`:
    this rank's own state; FSDP2 DTensors report their whole shape)."""
    where = path / OPTIMIZER_STATE_FILE
    saved_groups = [group.get("params") for group in saved["param_groups"]]  # dicts: _read_optimizer_document
    expected_groups = [group["params"] for group in expected["param_groups"]]
    if saved_groups != expected_groups:
        raise LlmkitError(f"{where} holds optimizer state for other parameters or groups than this run trains "
                          f"({sum(map(len, filter(None, saved_groups)))} parameters in {len(saved_groups)} groups, "
                          f"this run has {sum(map(len, expected_groups))} in {len(expected_groups)}); "
                          f"{RESTART_ADVICE}")
    for name, entries in expected["state"].items():
        kept = saved["state"].get(name)
        if not isinstance(kept, dict) or set(kept) != set(entries):
            raise LlmkitError(f"{where} lacks the optimizer state of {name} (needs {sorted(entries)}, has "
                              f"{sorted(kept) if isinstance(kept, dict) else None}); {RESTART_ADVICE}")
        for entry, value in entries.items():
            if isinstance(value, torch.Tensor) and _shape(kept[entry]) != _shape(value):
                raise LlmkitError(f"{where}: {name}/{entry} has {_shape(kept[entry])}, this run's parameter needs "
                                  f"{_shape(value)}; {RESTART_ADVICE}")


def _shape(value) -> str:
    """A tensor's shape, or what the value is instead (for the error message)."""
    return f"shape {list(value.shape)}" if isinstance(value, torch.Tensor) else f"a {type(value).__name__}, not a tensor"
