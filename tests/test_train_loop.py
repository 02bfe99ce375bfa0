"""The training loop: determinism, token-weighted accumulation, clipping, checkpoints, exact resume after SIGKILL,
a checkpoint on Ctrl-C / SIGTERM, errors."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from llmkit.config import Config
from llmkit.data.batch import IGNORE_INDEX
from llmkit.errors import LlmkitError
from llmkit.models.decoder import Decoder
from llmkit.train.checkpoint import list_checkpoints
from llmkit.train.distributed import Cluster
from llmkit.train.loop import (
    TrainingInterrupted,
    TrainSettings,
    accumulate_gradients,
    clip_gradients,
    peak_flops_of,
    reduce_step,
    train,
)
from llmkit.train.metrics import METRICS_FILE
from llmkit.train.objectives import TokenLoss, causal_lm_loss, token_cross_entropy
from llmkit.train.settings import check_settings
from tests.train_script import SFT_LABELS, sft_source, token_source

SCRIPT = Path(__file__).with_name("train_script.py")
REPO = Path(__file__).resolve().parents[1]


def tiny_model(seed: int = 1) -> Decoder:
    torch.manual_seed(seed)
    return Decoder(Config.from_name("tiny-llama"))


def quiet_settings(**overrides) -> TrainSettings:
    values = dict(max_steps=6, batch_size=4, warmup_steps=2, eval_every=0, log_every=1, checkpoint_every=100, lr=3e-3)
    values.update(overrides)
    return TrainSettings(**values)


def run_losses(run_dir: Path) -> dict[int, float]:
    rows = [json.loads(line) for line in (run_dir / METRICS_FILE).read_text().splitlines()]
    return {row["step"]: row["loss"] for row in rows if row["kind"] == "train"}


def test_loss_decreases_and_outputs_are_written(tmp_path, one_thread):
    result = train(tiny_model(), causal_lm_loss, token_source(), quiet_settings(max_steps=30), tmp_path)
    assert result.steps == 30 and result.tokens == 30 * 4 * 32
    # Random tokens over 64 symbols: ln(64) = 4.16 is the floor; the model starts near ln(vocab 256) = 5.55.
    assert result.losses[0] > 5.3 and result.losses[-1] < 4.6
    assert (tmp_path / "loss.png").stat().st_size > 1000
    assert (tmp_path / "metrics.csv").read_text().startswith("kind,step,loss")
    assert [path.name for path in list_checkpoints(tmp_path)] == ["step-00000030"]


def test_same_seed_gives_same_losses(tmp_path, one_thread):
    first = train(tiny_model(), causal_lm_loss, token_source(), quiet_settings(), tmp_path / "a").losses
    second = train(tiny_model(), causal_lm_loss, token_source(), quiet_settings(), tmp_path / "b").losses
    assert first == second


def test_accumulating_four_micro_batches_equals_one_four_times_larger_batch(tmp_path, one_thread):
    one_big = tiny_model()
    train(one_big, causal_lm_loss, token_source(), quiet_settings(max_steps=2, batch_size=8), tmp_path / "big")
    accumulated = tiny_model()
    settings = quiet_settings(max_steps=2, batch_size=2, accumulation_steps=4)
    train(accumulated, causal_lm_loss, token_source(), settings, tmp_path / "accumulated")
    for (name, big), small in zip(one_big.named_parameters(), accumulated.parameters()):
        # Same samples, same mean loss; only the float32 summation order differs, and Adam's division by
        # sqrt(v) magnifies that for near-zero gradients: 1e-5 is still 300x below one step's size (lr 3e-3).
        torch.testing.assert_close(big, small, atol=1e-5, rtol=0, msg=name)


def sft_rows(label_counts: list[int], length: int = 160, seed: int = 0) -> dict[str, torch.Tensor]:
    """Rows of random tokens whose labels are ignored but for the last `label_counts[row]` (an SFT completion)."""
    tokens = torch.randint(0, 256, (len(label_counts), length + 1), generator=torch.Generator().manual_seed(seed))
    labels = tokens[:, 1:].clone()
    for row, count in enumerate(label_counts):
        labels[row, :length - count] = IGNORE_INDEX
    return {"input_ids": tokens[:, :-1], "labels": labels}


def gradients_of(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {name: parameter.grad.clone() for name, parameter in model.named_parameters()}


def test_accumulated_gradients_weigh_every_label_token_equally(one_thread):
    few, many = sft_rows([2, 1], seed=0), sft_rows([150, 150], seed=1)  # 3 and 300 label tokens
    union = {name: torch.cat([few[name], many[name]]) for name in few}
    single = tiny_model()
    causal_lm_loss(single, union).mean().backward()  # one batch: the mean over its 303 label tokens
    expected = gradients_of(single)

    accumulated = tiny_model()
    sums = accumulate_gradients(accumulated, causal_lm_loss, [few, many], Cluster())
    assert sums.tokens == 303 and int(sums.counted) == 303
    for name, gradient in gradients_of(accumulated).items():
        torch.testing.assert_close(gradient, expected[name], atol=1e-6, rtol=0, msg=name)
    loss, stopping = reduce_step(sums, None, Cluster(), step=1)
    # Sums of ~300 float32 losses near 5.5 (~1,700) carry ~1e-4 of rounding, ~4e-7 once divided by 303 tokens.
    assert loss == pytest.approx(causal_lm_loss(single, union).mean().item(), abs=5e-6) and not stopping

    # What the loop did before: the mean of the two micro-batch means weighs each of the 3 tokens 50x more.
    per_batch_means = tiny_model()
    ((causal_lm_loss(per_batch_means, few).mean() + causal_lm_loss(per_batch_means, many).mean()) / 2).backward()
    differences = [(gradient - expected[name]).abs().max() for name, gradient in gradients_of(per_batch_means).items()]
    assert max(differences) > 1e-3


def test_the_reported_loss_is_the_token_weighted_mean_of_the_step(tmp_path, one_thread):
    # sft_source: samples hold 3, 120, 40 and 7 label tokens; 4 micro-batches of 1 against one batch of 4.
    settings = dict(max_steps=1, warmup_steps=0)
    big = train(tiny_model(), causal_lm_loss, sft_source(), quiet_settings(batch_size=4, **settings), tmp_path / "big")
    small = train(tiny_model(), causal_lm_loss, sft_source(), quiet_settings(batch_size=1, accumulation_steps=4,
                                                                           **settings), tmp_path / "small")
    assert small.losses[0] == pytest.approx(big.losses[0], abs=1e-6)
    rows = [sft_source()(position, 1, 0, 1) for position in range(4)]
    assert [int((row["labels"] != IGNORE_INDEX).sum()) for row in rows] == list(SFT_LABELS)
    model = tiny_model()
    with torch.no_grad():
        means = [causal_lm_loss(model, row).mean().item() for row in rows]
    token_weighted = sum(mean * count for mean, count in zip(means, SFT_LABELS)) / sum(SFT_LABELS)
    assert small.losses[0] == pytest.approx(token_weighted, abs=1e-5)


def test_a_step_without_label_tokens_is_refused(tmp_path, one_thread):
    def all_ignored(position, batch_size, rank, world_size):
        return sft_rows([0] * batch_size, length=16)

    with pytest.raises(LlmkitError, match="step 1 has no label tokens"):
        train(tiny_model(), causal_lm_loss, all_ignored, quiet_settings(), tmp_path)


def test_an_objective_that_counts_other_tokens_is_refused(tmp_path, one_thread):
    def miscounting(model, batch):
        terms = causal_lm_loss(model, batch)
        return TokenLoss(terms.total, terms.tokens + 1)

    with pytest.raises(LlmkitError, match="TokenLoss.tokens must count exactly those"):
        train(tiny_model(), miscounting, token_source(), quiet_settings(), tmp_path)


def test_clipping_scales_the_global_norm_to_the_limit():
    parameters = [torch.nn.Parameter(torch.ones(3)), torch.nn.Parameter(torch.ones(4))]
    parameters[0].grad, parameters[1].grad = torch.full((3,), 3.0), torch.full((4,), 4.0)
    before = clip_gradients(parameters, max_norm=1.0)
    assert before == pytest.approx((9 * 3 + 16 * 4) ** 0.5)
    after = torch.cat([p.grad for p in parameters]).norm()
    assert after.item() == pytest.approx(1.0, rel=1e-5)
    assert clip_gradients(parameters, max_norm=None) == pytest.approx(1.0, rel=1e-5)  # no clipping: norm unchanged


def test_ignored_labels_contribute_nothing():
    logits = torch.randn(1, 4, 10)
    labels = torch.tensor([[1, 2, IGNORE_INDEX, IGNORE_INDEX]])
    expected = torch.nn.functional.cross_entropy(logits[0, :2], labels[0, :2])
    torch.testing.assert_close(token_cross_entropy(logits, labels), expected)


ENVIRONMENT = {**os.environ, "PYTHONPATH": str(REPO)}


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory) -> Path:
    """The 8-step run of train_script.py, start to finish, that interrupted runs must reproduce."""
    run_dir = tmp_path_factory.mktemp("uninterrupted")
    subprocess.run([sys.executable, str(SCRIPT), str(run_dir)], check=True, env=ENVIRONMENT, capture_output=True,
                   timeout=120)
    return run_dir


def test_resume_after_sigkill_repeats_the_uninterrupted_losses_exactly(tmp_path, uninterrupted, one_thread):
    interrupted = tmp_path / "interrupted"
    process = subprocess.Popen([sys.executable, str(SCRIPT), str(interrupted), "--step_delay", "0.3"], env=ENVIRONMENT,
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 90
    # Kill once the step-3 checkpoint exists and step 4 has been logged: the dying run is past its checkpoint.
    while time.time() < deadline and not (list_checkpoints(interrupted) and 4 in _logged_steps(interrupted)):
        time.sleep(0.05)
    process.send_signal(signal.SIGKILL)
    process.wait()
    assert max(_logged_steps(interrupted)) < 8, "the run finished before it could be killed"
    assert [path.name for path in list_checkpoints(interrupted)] == ["step-00000003"]

    resumed = subprocess.run([sys.executable, str(SCRIPT), str(interrupted)], check=True, env=ENVIRONMENT,
                             capture_output=True, text=True, timeout=120)
    assert "resuming from" in resumed.stdout
    expected, got = run_losses(uninterrupted), run_losses(interrupted)
    assert sorted(got) == list(range(1, 9))
    assert got == expected  # bit-identical, step by step


@pytest.mark.parametrize(("signal_number", "status"), [(signal.SIGINT, 130), (signal.SIGTERM, 143)])
def test_an_interrupt_saves_the_last_step_and_resuming_continues_from_it(tmp_path, uninterrupted, one_thread,
                                                                          signal_number, status):
    process = subprocess.Popen([sys.executable, str(SCRIPT), str(tmp_path), "--step_delay", "0.3"], env=ENVIRONMENT,
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 90
    while time.time() < deadline and 4 not in _logged_steps(tmp_path):  # past the step-3 checkpoint
        time.sleep(0.05)
    process.send_signal(signal_number)
    _, stderr = process.communicate(timeout=60)
    assert process.returncode == status, stderr[-2000:]
    assert "Traceback" not in stderr
    stopped = max(_logged_steps(tmp_path))
    assert 4 <= stopped < 8, "the run finished before it could be interrupted"
    saved = list_checkpoints(tmp_path)[-1]
    assert saved.name == f"step-{stopped:08d}"  # the last completed step, not the step-3 checkpoint
    assert f"rerun the same command; it resumes from {saved}" in stderr
    if signal_number == signal.SIGTERM:
        return  # the same checkpoint as after Ctrl-C: resuming from it is checked once, below

    resumed = subprocess.run([sys.executable, str(SCRIPT), str(tmp_path)], check=True, env=ENVIRONMENT,
                             capture_output=True, text=True, timeout=120)
    assert f"resuming from {saved} (step {stopped})" in resumed.stdout
    expected, got = run_losses(uninterrupted), run_losses(tmp_path)
    assert sorted(got) == list(range(1, 9))
    assert got == expected  # the saved step carries the data position, optimizer and RNG: bit-identical


def test_the_cli_exits_with_the_interrupting_signals_status(monkeypatch, capsys, tmp_path):
    from llmkit import cli

    def stopped_by_sigterm() -> None:
        """A verb whose training run was stopped by SIGTERM (after saving a checkpoint)."""
        raise TrainingInterrupted("SIGTERM: stopped", signal.SIGTERM, tmp_path)

    monkeypatch.setattr(cli, "command", lambda target: stopped_by_sigterm)
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["info"])
    assert exit_info.value.code == 143


def _logged_steps(run_dir: Path) -> set[int]:
    path = run_dir / METRICS_FILE
    if not path.is_file():
        return set()
    lines = [line for line in path.read_text().splitlines() if line.endswith("}")]
    return {json.loads(line)["step"] for line in lines}


def test_checkpoints_keep_the_last_k_and_the_best(tmp_path, one_thread):
    scores = iter([1.0, 0.5, 0.9, 0.8, 0.7, 0.6])  # best at the second evaluation (step 2)

    def eval_batches():
        yield {"input_ids": torch.zeros(1, 2, dtype=torch.long), "labels": torch.zeros(1, 2, dtype=torch.long)}

    def fake_objective(model, batch):  # validation score from the list; training uses the real loss
        if model.training:
            return causal_lm_loss(model, batch)
        return TokenLoss(torch.tensor(next(scores)), torch.tensor(1))

    settings = quiet_settings(max_steps=6, eval_every=1, checkpoint_every=1, keep_last=2)
    result = train(tiny_model(), fake_objective, token_source(), settings, tmp_path, eval_batches=eval_batches)
    assert [path.name for path in list_checkpoints(tmp_path)] == ["step-00000002", "step-00000005", "step-00000006"]
    assert result.best_checkpoint.name == "step-00000002"


@pytest.mark.parametrize("label", [None, "Bradley-Terry loss (nats/pair)"])
def test_validation_perplexity_is_reported_only_for_cross_entropy(tmp_path, one_thread, label):
    def eval_batches():
        yield {"input_ids": torch.zeros(1, 2, dtype=torch.long), "labels": torch.zeros(1, 2, dtype=torch.long)}

    def objective(model, batch):
        return causal_lm_loss(model, batch)

    if label is not None:  # a pairwise objective names its loss: exp(loss) would be no perplexity
        objective.loss_label = label
    train(tiny_model(), objective, token_source(), quiet_settings(max_steps=2, eval_every=1), tmp_path,
          eval_batches=eval_batches)
    rows = [json.loads(line) for line in (tmp_path / METRICS_FILE).read_text().splitlines()]
    evals = [row for row in rows if row["kind"] == "eval"]
    assert len(evals) == 2 and all("val_loss" in row for row in evals)
    assert all(("val_perplexity" in row) == (label is None) for row in evals)


def test_a_finished_checkpoint_is_a_usable_model_directory(tmp_path, one_thread):
    from llmkit.checkpoints import load_model

    model = tiny_model()
    result = train(model, causal_lm_loss, token_source(), quiet_settings(max_steps=2), tmp_path)
    loaded = load_model(result.checkpoint)
    ids = torch.randint(0, 64, (1, 8))
    torch.testing.assert_close(loaded(ids), model.eval()(ids))


def test_existing_checkpoints_without_resume_are_refused(tmp_path, one_thread):
    train(tiny_model(), causal_lm_loss, token_source(), quiet_settings(max_steps=1, warmup_steps=0), tmp_path)
    with pytest.raises(LlmkitError, match="already holds checkpoints"):
        train(tiny_model(), causal_lm_loss, token_source(), quiet_settings(max_steps=2, resume="never"), tmp_path)


def test_a_checkpoint_of_another_model_is_refused(tmp_path, one_thread):
    train(tiny_model(), causal_lm_loss, token_source(), quiet_settings(max_steps=1, warmup_steps=0), tmp_path)
    other = Decoder(Config.from_name("tiny-llama", n_layers=3))
    with pytest.raises(LlmkitError, match="different config"):
        train(other, causal_lm_loss, token_source(), quiet_settings(max_steps=2), tmp_path)


@pytest.mark.parametrize(("field", "value", "message"), [
    ("batch_size", 0, "batch_size=0 must be at least 1"),
    ("lr", -1.0, "lr=-1.0 must be positive"),
    ("warmup_steps", 50, "warmup_steps=50 must be between 0 and max_steps=6"),
    ("precision", "fp8", "unknown precision 'fp8'"),
    ("betas", (1.5, 0.9), r"--train.betas=\[1.5, 0.9\] must be two numbers in \[0, 1\)"),
    ("betas", (0.9, -0.1), r"--train.betas=\[0.9, -0.1\] must be two numbers in \[0, 1\)"),
    ("min_lr_ratio", 5.0, r"--train.min_lr_ratio=5.0 must be in \[0, 1\].*above 1 it would rise"),
    ("weight_decay", -1.0, "--train.weight_decay=-1.0 must be at least 0"),
    ("lr", 0.0, "--train.lr=0.0 must be positive"),
    ("max_steps", 0, "--train.max_steps=0 must be at least 1"),
    ("batch_size", -2, "--train.batch_size=-2 must be at least 1"),
    ("accumulation_steps", 0, "--train.accumulation_steps=0 must be at least 1"),
    ("warmup_steps", -1, "--train.warmup_steps=-1 must be at least 0"),
    ("grad_clip", 0.0, r"--train.grad_clip=0.0 must be positive \(or null"),
    ("grad_clip", -1.0, r"--train.grad_clip=-1.0 must be positive \(or null"),
    ("keep_last", -1, "--train.keep_last=-1 must be at least 0"),
])
def test_impossible_settings_are_refused_before_training(tmp_path, field, value, message):
    with pytest.raises(LlmkitError, match=message):
        train(tiny_model(), causal_lm_loss, token_source(), quiet_settings(**{field: value}), tmp_path)
    assert not list_checkpoints(tmp_path)


@pytest.mark.parametrize(("field", "value"), [("keep_last", 0), ("grad_clip", None), ("warmup_steps", 0),
                                              ("min_lr_ratio", 0.0), ("min_lr_ratio", 1.0), ("betas", (0.0, 0.999)),
                                              ("weight_decay", 0.0)])
def test_settings_at_their_limits_are_accepted(field, value):
    check_settings(quiet_settings(**{field: value}))


def test_the_cli_refuses_bad_settings_in_one_line_before_any_work(tmp_path, capsys):
    from llmkit import cli

    with pytest.raises(SystemExit) as exit_info:
        cli.main(["pretrain", "--train.betas", "[1.5,0.9]", "--output", str(tmp_path / "run")])
    assert exit_info.value.code == 2
    error = capsys.readouterr().err.strip()
    assert error.startswith("error: --train.betas=[1.5, 0.9] must be two numbers in [0, 1)") and "\n" not in error
    assert not (tmp_path / "run").exists()  # nothing prepared, no model built


def test_a_diverging_loss_stops_with_advice(tmp_path, one_thread):
    def exploding(model, batch):
        terms = causal_lm_loss(model, batch)
        return TokenLoss(terms.total * float("inf"), terms.tokens)

    with pytest.raises(LlmkitError, match="loss became inf at step 1; lower --lr"):
        train(tiny_model(), exploding, token_source(), quiet_settings(), tmp_path)


@pytest.mark.parametrize("precision", ["bf16-mixed", "fp16-mixed"])
def test_mixed_precision_trains_with_float32_master_weights(tmp_path, one_thread, precision):
    model = tiny_model()
    result = train(model, causal_lm_loss, token_source(), quiet_settings(max_steps=20, precision=precision), tmp_path)
    assert result.losses[-1] < result.losses[0] - 0.5
    assert {p.dtype for p in model.parameters()} == {torch.float32}
    trainer_state = json.loads((result.checkpoint / "trainer_state.json").read_text())
    if precision == "fp16-mixed":  # the loss scale is part of the state, so a resumed run scales the same way
        assert trainer_state["scaler"]["scale"] > 1
    else:
        assert trainer_state["scaler"] is None


def test_activation_checkpointing_gives_the_same_losses(tmp_path, one_thread):
    plain = train(tiny_model(), causal_lm_loss, token_source(), quiet_settings(), tmp_path / "plain").losses
    recomputed = train(tiny_model(), causal_lm_loss, token_source(), quiet_settings(activation_checkpointing=True),
                       tmp_path / "recomputed").losses
    assert recomputed == pytest.approx(plain, abs=1e-6)


@pytest.mark.parametrize(("name", "tflops"), [
    ("NVIDIA H100 80GB HBM3", 989.0), ("NVIDIA H100 PCIe", 756.0), ("NVIDIA H200", 989.0),
    ("NVIDIA A100-SXM4-80GB", 312.0), ("NVIDIA L4", 121.0), ("NVIDIA GeForce RTX 4090", 165.0), ("NVIDIA L40S", None),
])
def test_mfu_uses_the_datasheet_peak_of_the_gpu_it_recognises(name, tflops):
    assert peak_flops_of(name) == (tflops * 1e12 if tflops else None)


def test_activation_checkpointing_covers_encoder_decoder_blocks():
    from llmkit.models.seq2seq import Seq2Seq
    from llmkit.train.recompute import enable_activation_checkpointing

    torch.manual_seed(0)
    model = Seq2Seq(Config.from_name("mini-t5", n_layers=2, n_decoder_layers=3))
    inputs, targets = torch.randint(0, 100, (2, 12)), torch.randint(0, 100, (2, 6))
    model(inputs, targets).sum().backward()
    expected = [p.grad.clone() for p in model.parameters()]
    model.zero_grad()
    assert enable_activation_checkpointing(model) == 5
    model(inputs, targets).sum().backward()
    for before, parameter in zip(expected, model.parameters()):
        torch.testing.assert_close(parameter.grad, before)


def test_a_partly_frozen_model_checkpoints_only_its_trained_part_and_resumes(tmp_path, one_thread):
    def half_frozen() -> Decoder:
        model = tiny_model()
        for name, parameter in model.named_parameters():
            parameter.requires_grad_(name.startswith("blocks.1."))
        return model

    uninterrupted = train(half_frozen(), causal_lm_loss, token_source(), quiet_settings(max_steps=6), tmp_path / "a")
    checkpoint = uninterrupted.checkpoint
    assert not (checkpoint / "model.safetensors").exists()
    from safetensors.torch import load_file

    assert all(name.startswith("blocks.1.") for name in load_file(str(checkpoint / "trainable.safetensors")))
    train(half_frozen(), causal_lm_loss, token_source(), quiet_settings(max_steps=6, checkpoint_every=3), tmp_path / "b")
    # Drop the last checkpoint: the next run resumes from step 3 and must repeat steps 4-6 exactly.
    import shutil

    shutil.rmtree(list_checkpoints(tmp_path / "b")[-1])
    resumed = train(half_frozen(), causal_lm_loss, token_source(), quiet_settings(max_steps=6, checkpoint_every=3),
                    tmp_path / "b")
    assert resumed.losses == uninterrupted.losses[3:]


@pytest.mark.parametrize("verb", ["pretrain", "finetune"])
def test_pretrain_and_finetune_shut_the_process_group_down_even_when_they_fail(monkeypatch, tmp_path, verb):
    from llmkit.commands.finetune import finetune
    from llmkit.commands.pretrain import pretrain
    from llmkit.train import distributed

    shut = []
    monkeypatch.setattr(distributed, "shut_down", shut.append)
    missing = str(tmp_path / "missing")
    with pytest.raises(LlmkitError):  # after joining the cluster: no prepared data / no model there
        if verb == "pretrain":
            pretrain(data=missing, output=str(tmp_path / "run"))
        else:
            finetune(model=missing, output=str(tmp_path / "run"))
    assert len(shut) == 1 and isinstance(shut[0], Cluster)


def test_mfu_flops_only_for_text_models_fed_token_ids():
    from llmkit.models.vision import build_vision_model, vit_config
    from llmkit.train.loop import counts_text_flops
    from tests.helpers import tiny_decoder

    tokens = {"input_ids": torch.zeros(2, 8, dtype=torch.long), "labels": torch.zeros(2, 8, dtype=torch.long)}
    assert counts_text_flops(tiny_decoder(), tokens)
    assert not counts_text_flops(tiny_decoder(), {**tokens, "pixel_values": torch.zeros(2, 1, 8, 8)})  # CLIP's batch
    vision = build_vision_model(vit_config(n_labels=10))
    assert not counts_text_flops(vision, {"pixel_values": torch.zeros(2, 1, 8, 8), "labels": torch.zeros(2)})
    assert not counts_text_flops(torch.nn.Linear(2, 2), tokens)  # no config at all
