"""Two CPU processes under torchrun (gloo): DDP and FSDP2 reproduce the single-process run with the same
global batch, token-weighted when ranks hold unequal numbers of label tokens, and FSDP2's sharded checkpoint loads
back into a single process."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from llmkit.checkpoints import load_model
from llmkit.config import Config
from llmkit.models.decoder import Decoder
from llmkit.train.checkpoint import list_checkpoints, load_checkpoint
from llmkit.train.distributed import Cluster
from llmkit.train.objectives import causal_lm_loss
from llmkit.train.optim import build_optimizer, build_scheduler
from tests.train_script import GRADIENTS_FILE, SFT_LABELS, sft_source

SCRIPT = Path(__file__).with_name("train_script.py")
REPO = Path(__file__).resolve().parents[1]
ENVIRONMENT = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}


def run(run_dir: Path, processes: int, strategy: str = "auto") -> list[float]:
    launcher = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(processes),
                "--standalone"] if processes > 1 else [sys.executable]
    done = subprocess.run([*launcher, str(SCRIPT), str(run_dir), "--strategy", strategy, "--max_steps", "6"],
                          env=ENVIRONMENT, capture_output=True, text=True, timeout=180)
    assert done.returncode == 0, done.stderr[-3000:]
    line = next(line for line in done.stdout.splitlines() if line.startswith("LOSSES "))
    return json.loads(line.removeprefix("LOSSES "))


@pytest.fixture(scope="module")
def single_process(tmp_path_factory) -> tuple[Path, list[float]]:
    run_dir = tmp_path_factory.mktemp("single")
    return run_dir, run(run_dir, processes=1)


@pytest.mark.parametrize("strategy", ["ddp", "fsdp"])
def test_two_processes_match_one_process_with_the_same_global_batch(tmp_path, single_process, strategy):
    single_dir, expected = single_process
    losses = run(tmp_path, processes=2, strategy=strategy)
    # Each rank averages half the batch and the gradients are averaged across ranks: the same mean in a
    # different float32 summation order, so the losses agree to rounding, not bit for bit.
    assert losses == pytest.approx(expected, abs=1e-4)
    merged = load_model(list_checkpoints(tmp_path)[-1])
    reference = load_model(list_checkpoints(single_dir)[-1])
    for (name, weight), other in zip(merged.named_parameters(), reference.parameters()):
        # Adam divides by sqrt(v): rounding differences in tiny gradients (rare embedding rows) move weights by up
        # to ~1e-4 after 6 steps of lr 3e-3, still 100x below the distance the weights travelled (~2e-2).
        torch.testing.assert_close(weight, other, atol=5e-4, rtol=0, msg=name)
    if strategy == "fsdp":
        assert_sharded_optimizer_loads_in_one_process(list_checkpoints(tmp_path)[-1], list_checkpoints(single_dir)[-1])


def assert_sharded_optimizer_loads_in_one_process(sharded: Path, single: Path) -> None:
    # Rank 0 gathered both ranks' shards into one file of whole tensors (no pickled torch.distributed.checkpoint files).
    assert not (sharded / "optimizer").exists()
    shapes = {name: list(weight.shape) for name, weight in load_model(sharded).named_parameters()}
    tensors = load_file(str(sharded / "optimizer.safetensors"))
    assert {name: list(tensors[f"state/{name}/exp_avg"].shape) for name in shapes} == shapes

    def restore(path: Path) -> torch.optim.Optimizer:
        model = load_model(path)
        optimizer = build_optimizer(model, lr=1e-3)
        scheduler = build_scheduler(optimizer, "cosine", 2, 6)
        state = load_checkpoint(path, model, optimizer, scheduler, None, Cluster())
        assert state.step == 6 and scheduler.last_epoch == 6
        return optimizer

    from_shards, from_single = restore(sharded), restore(single)
    for first, second in zip(from_shards.state.values(), from_single.state.values()):
        for key in ("exp_avg", "exp_avg_sq"):
            torch.testing.assert_close(first[key], second[key], atol=1e-6, rtol=1e-3)


def step_gradients(out_dir: Path, processes: int, accumulation_steps: int) -> tuple[dict[str, torch.Tensor], dict]:
    """One step's gradients (and reported loss) of train_script.py's SFT-style global batch of 4 samples."""
    launcher = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(processes),
                "--standalone"] if processes > 1 else [sys.executable]
    done = subprocess.run([*launcher, str(SCRIPT), str(out_dir), "--gradients", "--accumulation_steps",
                           str(accumulation_steps)], env=ENVIRONMENT, capture_output=True, text=True, timeout=180)
    assert done.returncode == 0, done.stderr[-3000:]
    line = next(line for line in done.stdout.splitlines() if line.startswith("LOSS "))
    return load_file(str(out_dir / GRADIENTS_FILE)), json.loads(line.removeprefix("LOSS "))


def test_ranks_with_unequal_label_counts_give_the_gradients_of_one_process_on_their_union(tmp_path):
    # Samples hold 3, 120, 40 and 7 label tokens. Two ranks x two micro-batches: rank 0 gets samples 0 and 2
    # (43 labels), rank 1 samples 1 and 3 (127); one process scores all four (170) in one batch.
    (tmp_path / "one").mkdir(), (tmp_path / "two").mkdir()
    expected, single = step_gradients(tmp_path / "one", processes=1, accumulation_steps=1)
    got, distributed = step_gradients(tmp_path / "two", processes=2, accumulation_steps=2)
    assert single["tokens"] == distributed["tokens"] == sum(SFT_LABELS)
    for name, gradient in got.items():
        # the same sum over 170 tokens, split four ways: float32 rounding only (gradients are up to ~5e-2)
        torch.testing.assert_close(gradient, expected[name], atol=1e-6, rtol=0, msg=name)
    assert distributed["loss"] == pytest.approx(single["loss"], abs=5e-6)

    # The test can tell: averaging the four micro-batch means (the loop before) gives other gradients.
    torch.manual_seed(1)
    model = Decoder(Config.from_name("tiny-llama"))
    samples = [sft_source()(position, 1, 0, 1) for position in range(4)]
    torch.stack([causal_lm_loss(model, batch).mean() for batch in samples]).mean().backward()
    assert max((p.grad - expected[name]).abs().max() for name, p in model.named_parameters()) > 1e-3
