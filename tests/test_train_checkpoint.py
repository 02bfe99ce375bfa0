"""Training checkpoints never unpickle: the optimizer state is safetensors + JSON, round-trips exactly, and a
planted pickle, a truncated or missing file or the old torch.distributed.checkpoint layout is a readable error."""

from __future__ import annotations

import json
import pickle
import re
import shutil
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from llmkit.config import Config
from llmkit.errors import LlmkitError
from llmkit.models.decoder import Decoder
from llmkit.train.checkpoint import (
    LEGACY_OPTIMIZER_DIR,
    OPTIMIZER_STATE_FILE,
    OPTIMIZER_TENSORS_FILE,
    TrainerState,
    list_checkpoints,
    load_checkpoint,
    save_checkpoint,
)
from llmkit.train.distributed import Cluster
from llmkit.train.loop import TrainSettings, train
from llmkit.train.objectives import causal_lm_loss
from llmkit.train.optim import build_optimizer, build_scheduler
from tests.train_script import token_source

SOURCES = Path(__file__).resolve().parents[1] / "llmkit"
ADVICE = "delete that checkpoint directory"


class Payload:
    """A pickle that creates `marker` when unpickled: what a hostile checkpoint would carry."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):  # noqa: ANN204
        return Path.touch, (self.marker,)


def tiny_model(seed: int = 1) -> Decoder:
    torch.manual_seed(seed)
    return Decoder(Config.from_name("tiny-llama"))


def settings(**overrides) -> TrainSettings:
    values = dict(max_steps=4, batch_size=2, warmup_steps=1, eval_every=0, log_every=1, checkpoint_every=2, lr=3e-3,
                  keep_last=10)
    values.update(overrides)
    return TrainSettings(**values)


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory) -> Iterator[tuple[Path, list[float]]]:
    """A 4-step run with checkpoints at steps 2 and 4, and its losses."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    run_dir = tmp_path_factory.mktemp("run")
    yield run_dir, train(tiny_model(), causal_lm_loss, token_source(), settings(), run_dir).losses
    torch.set_num_threads(threads)


def copy_of_first_checkpoint(finished_run, tmp_path: Path) -> Path:
    """A run directory holding only the step-2 checkpoint of `finished_run` (so resuming continues from step 2)."""
    run_dir, _ = finished_run
    target = tmp_path / "run"
    shutil.copytree(list_checkpoints(run_dir)[0], target / "checkpoints" / list_checkpoints(run_dir)[0].name)
    return target


def restore(path: Path, model: torch.nn.Module | None = None) -> tuple[torch.nn.Module, torch.optim.Optimizer]:
    """Load a checkpoint into a fresh model, optimizer and scheduler, as a resuming run does."""
    model = model or tiny_model(seed=7)
    optimizer = build_optimizer(model, lr=3e-3)
    scheduler = build_scheduler(optimizer, "cosine", 1, 4)
    load_checkpoint(path, model, optimizer, scheduler, None, Cluster())
    return model, optimizer


def plant(path: Path, marker: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(pickle.dumps(Payload(marker)))


def test_the_payload_runs_when_unpickled(tmp_path):
    # The planted files below would fire: full unpicklers (pickle, dcp.load's .metadata reader) run this code.
    marker = tmp_path / "pwned"
    plant(tmp_path / "payload", marker)
    pickle.loads((tmp_path / "payload").read_bytes())
    assert marker.exists()


def test_a_pickle_planted_in_the_old_metadata_file_is_never_read_and_the_run_resumes(finished_run, tmp_path,
                                                                                      one_thread):
    # Issue 11: resuming used torch.distributed.checkpoint.load, which unpickled optimizer/.metadata.
    run_dir = copy_of_first_checkpoint(finished_run, tmp_path)
    marker = tmp_path / "pwned"
    plant(list_checkpoints(run_dir)[0] / LEGACY_OPTIMIZER_DIR / ".metadata", marker)
    resumed = train(tiny_model(), causal_lm_loss, token_source(), settings(), run_dir)
    assert not marker.exists()
    assert resumed.losses == finished_run[1][2:]


@pytest.mark.parametrize("name", [OPTIMIZER_STATE_FILE, OPTIMIZER_TENSORS_FILE, "trainer_state.json",
                                  "model.safetensors", "config.json", "rng-0.safetensors"])
def test_a_pickle_planted_in_any_checkpoint_file_is_refused_without_running(finished_run, tmp_path, name):
    checkpoint = list_checkpoints(copy_of_first_checkpoint(finished_run, tmp_path))[0]
    assert (checkpoint / name).is_file()
    marker = tmp_path / "pwned"
    plant(checkpoint / name, marker)
    with pytest.raises(LlmkitError) as error:
        restore(checkpoint)
    assert not marker.exists()
    assert name in str(error.value) and "\n" not in str(error.value)


def test_a_checkpoint_in_the_old_pickled_layout_is_refused_with_advice(finished_run, tmp_path):
    checkpoint = list_checkpoints(copy_of_first_checkpoint(finished_run, tmp_path))[0]
    (checkpoint / OPTIMIZER_STATE_FILE).unlink()
    (checkpoint / OPTIMIZER_TENSORS_FILE).unlink()
    marker = tmp_path / "pwned"
    plant(checkpoint / LEGACY_OPTIMIZER_DIR / ".metadata", marker)
    (checkpoint / LEGACY_OPTIMIZER_DIR / "__0_0.distcp").write_bytes(b"\0" * 64)
    with pytest.raises(LlmkitError, match=rf"keeps its optimizer state in optimizer/, the torch.distributed.checkpoint "
                                          rf"layout of older llmkit versions.*never read; {ADVICE}"):
        restore(checkpoint)
    assert not marker.exists()


def truncate(path: Path) -> None:
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


def drop_one_tensor(path: Path) -> None:
    tensors = load_file(str(path))
    tensors.pop(sorted(tensors)[0])
    save_file(tensors, str(path))


def drop_one_state(path: Path) -> None:
    document = json.loads(path.read_text())
    document["state"].pop("blocks.0.attn.q_proj.weight")
    path.write_text(json.dumps(document))


@pytest.mark.parametrize("name, damage, message", [
    (OPTIMIZER_TENSORS_FILE, Path.unlink, r"optimizer.safetensors is missing, so the optimizer state cannot be "
                                          "restored"),
    (OPTIMIZER_STATE_FILE, Path.unlink, r"optimizer.json is missing, so the optimizer state cannot be restored"),
    (OPTIMIZER_TENSORS_FILE, truncate, r"optimizer.safetensors is not a readable safetensors file"),
    (OPTIMIZER_STATE_FILE, truncate, r"optimizer.json is not valid JSON"),
    (OPTIMIZER_TENSORS_FILE, drop_one_tensor, r"optimizer.safetensors lacks the tensor 'state/.*' that optimizer.json "
                                              "refers to"),
    ("rng-0.safetensors", drop_one_tensor, r"rng-0.safetensors lacks the CPU generator state 'cpu'"),
    (OPTIMIZER_STATE_FILE, drop_one_state, r"optimizer.json lacks the optimizer state of blocks.0.attn.q_proj.weight "
                                           r"\(needs \['exp_avg', 'exp_avg_sq', 'step'\], has None\)"),
])
def test_a_missing_or_damaged_resume_state_is_one_readable_error(finished_run, tmp_path, name, damage, message):
    checkpoint = list_checkpoints(copy_of_first_checkpoint(finished_run, tmp_path))[0]
    damage(checkpoint / name)
    with pytest.raises(LlmkitError, match=rf"{message}.*; {ADVICE}") as error:
        restore(checkpoint)
    assert str(checkpoint) in str(error.value) and "\n" not in str(error.value)


def test_optimizer_state_for_other_parameters_is_refused(finished_run, tmp_path):
    checkpoint = list_checkpoints(finished_run[0])[0]
    model = tiny_model()
    model.blocks[0].requires_grad_(False)  # this run trains fewer parameters than the checkpointed one
    with pytest.raises(LlmkitError, match=rf"optimizer.json holds optimizer state for other parameters or groups than "
                                          rf"this run trains \(\d+ parameters in 2 groups, this run has \d+ in 2\); "
                                          rf"{ADVICE}"):
        restore(checkpoint, model)


def test_the_optimizer_state_round_trips_exactly(tmp_path, one_thread):
    model = tiny_model()
    optimizer = build_optimizer(model, lr=3e-3)
    scheduler = build_scheduler(optimizer, "cosine", 1, 4)
    batch = token_source()(0, 2, 0, 1)
    for _ in range(2):
        causal_lm_loss(model, batch).mean().backward()
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad()
    path = save_checkpoint(tmp_path, TrainerState(step=2), model, optimizer, scheduler, None, Cluster())
    assert not (path / LEGACY_OPTIMIZER_DIR).exists()
    document = json.loads((path / OPTIMIZER_STATE_FILE).read_text())
    assert document["param_groups"][0]["betas"] == {"__tuple__": [0.9, 0.95]}
    assert document["state"]["blocks.0.attn.q_proj.weight"]["exp_avg"] == {
        "__tensor__": "state/blocks.0.attn.q_proj.weight/exp_avg"}

    _, restored = restore(path)
    expected, got = optimizer.state_dict(), restored.state_dict()
    assert got["param_groups"] == expected["param_groups"]  # lr, betas (a tuple again), eps, initial_lr, ...
    assert got["state"].keys() == expected["state"].keys()
    for index, entries in expected["state"].items():
        assert got["state"][index].keys() == entries.keys()
        for key, value in entries.items():
            assert got["state"][index][key].dtype == value.dtype
            assert torch.equal(got["state"][index][key], value), (index, key)


def test_a_resumed_run_repeats_the_uninterrupted_losses_exactly(finished_run, tmp_path, one_thread):
    run_dir = copy_of_first_checkpoint(finished_run, tmp_path)
    resumed = train(tiny_model(), causal_lm_loss, token_source(), settings(), run_dir)
    assert resumed.losses == finished_run[1][2:]


# Source guard: nothing in llmkit/ reads a file with a full unpickler.
FORBIDDEN = {
    "pickle module": re.compile(r"^\s*(import|from)\s+(c?pickle|cloudpickle|dill|joblib)\b", re.MULTILINE),
    "pickle.load": re.compile(r"\bpickle\.loads?\("),
    "torch.distributed.checkpoint load": re.compile(r"\bdcp\.load\b|\bcheckpoint\.load\(|FileSystemReader|"
                                                    r"import torch\.distributed\.checkpoint( as|\s*$)|"
                                                    r"from torch\.distributed\.checkpoint import", re.MULTILINE),
    "allow_pickle=True": re.compile(r"allow_pickle\s*=\s*True"),
    "weights_only=False": re.compile(r"weights_only\s*=\s*False"),
}
TORCH_LOAD = re.compile(r"\btorch\.load\(")


def unpickling_calls(source: str) -> list[str]:
    """What in `source` could unpickle: forbidden patterns, and torch.load calls without weights_only=True."""
    found = [name for name, pattern in FORBIDDEN.items() if pattern.search(source)]
    for match in TORCH_LOAD.finditer(source):
        depth, end = 1, match.end()
        while depth and end < len(source):
            depth += {"(": 1, ")": -1}.get(source[end], 0)
            end += 1
        if not re.search(r"weights_only\s*=\s*True", source[match.end():end]):
            found.append(f"torch.load without weights_only=True: {source[match.start():end]}")
    return found


def test_the_source_guard_catches_unpickling_calls():
    assert unpickling_calls("state = torch.load(path, map_location='cpu')\n")
    assert not unpickling_calls("state = torch.load(path, map_location=device(x), weights_only=True)\n")
    assert unpickling_calls("import pickle\n") and unpickling_calls("dcp.load(state, checkpoint_id=d)\n")
    assert unpickling_calls("import torch.distributed.checkpoint as dcp\n")
    assert not unpickling_calls("from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict\n")


def test_no_source_file_of_llmkit_unpickles():
    offenders = {str(path.relative_to(SOURCES)): found for path in sorted(SOURCES.rglob("*.py"))
                 if (found := unpickling_calls(path.read_text(encoding="utf-8")))}
    assert offenders == {}


@pytest.mark.parametrize("strategy", ["ddp", "fsdp"])
def test_two_processes_resume_from_their_own_checkpoint_exactly(tmp_path, strategy):
    # Rank 0 wrote the whole optimizer state (FSDP2: gathered from both shards); both ranks read it back.
    from tests.test_train_distributed import run

    uninterrupted = run(tmp_path, processes=2, strategy=strategy)
    shutil.rmtree(list_checkpoints(tmp_path)[-1])  # steps 3 and 6 were saved: resume from step 3
    assert run(tmp_path, processes=2, strategy=strategy) == uninterrupted[3:]


def test_a_training_checkpoint_of_an_encoder_reloads_with_its_head(tmp_path):
    """A MaskedLM built from a config whose encoder_head is still "base" is checkpointed with its real head, so the
    checkpoint loads back as a MaskedLM (not a bare Encoder that drops the MLM head) and the run resumes from it."""
    from llmkit.checkpoints import load_model
    from llmkit.models.encoder import MaskedLM
    from llmkit.train.objectives import masked_lm_batch, masked_lm_loss

    config = Config.from_name("tiny-bert")
    assert config.encoder_head == "base"
    torch.manual_seed(0)

    def batches(position: int, batch_size: int, rank: int, world_size: int) -> dict[str, torch.Tensor]:
        tokens = torch.randint(5, config.vocab_size, (batch_size, 16), generator=torch.Generator().manual_seed(position))
        return masked_lm_batch(tokens, mask_id=4, vocab_size=config.vocab_size, special_ids=[0, 1, 2, 3],
                               generator=torch.Generator().manual_seed(position))

    train(MaskedLM(config), masked_lm_loss, batches, settings(max_steps=2), tmp_path)
    loaded = load_model(tmp_path / "checkpoints" / "step-00000002")
    assert isinstance(loaded, MaskedLM) and loaded.config.encoder_head == "masked_lm"
    result = train(MaskedLM(config), masked_lm_loss, batches, settings(max_steps=3), tmp_path)  # resumes: same config
    assert result.steps == 3
