"""DPO on models: response log-probs against a brute-force sum, the LoRA reference is the adapter-disabled base
exactly, a zero learning rate leaves the policy and its rewards at 0, a tiny model learns a toy preference through
the loop, the CLI end to end; slow: a few steps on real HH-RLHF pairs with SmolLM2 move rewards/margins above 0."""

from __future__ import annotations

import copy
import json
import random

import pytest
import torch

from llmkit.align.dpo import cache_reference_logps, dpo_objective, pair_logps, preference_metrics, response_logps
from llmkit.align.preference import PairBatches, TokenizedPair, held_out_batches, pair_batch
from llmkit.align.settings import DPOSettings
from llmkit.peft.lora import apply_lora, disable_adapters
from llmkit.peft.settings import LoraSettings
from llmkit.train.settings import TrainSettings
from tests.helpers import byte_tokenizer, cli_status, run_cli, tiny_decoder, write_jsonl

pytestmark = pytest.mark.usefixtures("one_thread")
EOS = PAD = 256
GOOD, BAD = 257, 258
VOCAB = 260
LORA = LoraSettings(rank=4, alpha=8, targets=("q_proj", "v_proj", "up_proj", "down_proj"))


def toy_pairs(count: int, seed: int) -> list[TokenizedPair]:
    rng = random.Random(seed)
    letters = lambda low, high: [rng.randrange(97, 123) for _ in range(rng.randint(low, high))]  # noqa: E731
    return [TokenizedPair([*letters(2, 6), EOS, 65, 58], [*letters(1, 3), GOOD, EOS], [*letters(1, 3), BAD, EOS])
            for _ in range(count)]


def test_response_logps_equal_a_brute_force_sum_over_response_tokens():
    model = tiny_decoder(vocab_size=VOCAB)
    batch = pair_batch(toy_pairs(3, seed=0), PAD)
    with torch.no_grad():
        sums, counts = response_logps(model, batch)
        logits = model(batch["input_ids"], attention_mask=batch["attention_mask"]).log_softmax(-1)  # (R, T, V)
    for row in range(6):
        positions = batch["response_mask"][row].nonzero().squeeze(1).tolist()
        expected = sum(float(logits[row, t - 1, batch["input_ids"][row, t]]) for t in positions)
        assert float(sums[row]) == pytest.approx(expected, abs=1e-4)
        assert int(counts[row]) == len(positions)


def trained_looking_lora(seed: int = 0) -> tuple[torch.nn.Module, torch.nn.Module]:
    """(base copy, the same base with LoRA adapters whose B is not zero, as after training)."""
    base = tiny_decoder(vocab_size=VOCAB, seed=seed)
    policy = apply_lora(copy.deepcopy(base), LORA)
    for name, parameter in policy.named_parameters():
        if "lora_B" in name:
            torch.nn.init.normal_(parameter, std=0.3)
    return base, policy


def test_lora_reference_is_the_adapter_disabled_base_exactly():
    base, policy = trained_looking_lora()
    pairs = toy_pairs(4, seed=3)
    cache_reference_logps(policy, pairs, PAD, batch_size=4)
    with torch.no_grad():
        expected = pair_logps(base, pair_batch(pairs, PAD))
        adapted = pair_logps(policy, pair_batch(pairs, PAD))
    assert [pair.ref_chosen_logp for pair in pairs] == expected.chosen.tolist()
    assert [pair.ref_rejected_logp for pair in pairs] == expected.rejected.tolist()
    assert not torch.allclose(adapted.chosen, expected.chosen)  # the adapter does change the policy
    with disable_adapters(policy):  # and the adapters are back on afterwards
        pass
    assert torch.equal(pair_logps(policy, pair_batch(pairs, PAD)).chosen.detach(), adapted.chosen)


def test_zero_learning_rate_leaves_the_policy_and_its_rewards_at_zero():
    torch.manual_seed(0)
    policy = apply_lora(tiny_decoder(vocab_size=VOCAB), LORA)
    pairs = toy_pairs(6, seed=4)
    cache_reference_logps(policy, pairs, PAD, batch_size=6)
    before = {name: tensor.clone() for name, tensor in policy.state_dict().items()}
    optimizer = torch.optim.AdamW([p for p in policy.parameters() if p.requires_grad], lr=0.0)
    objective, batch = dpo_objective(DPOSettings(beta=0.1)), pair_batch(pairs, PAD)
    policy.train()
    for _ in range(3):
        terms = objective(policy, batch)
        (terms.total / terms.tokens).backward()
        assert any(p.grad is not None and bool(p.grad.abs().sum() > 0) for p in policy.parameters() if p.requires_grad)
        optimizer.step()
        optimizer.zero_grad()
        for name in ("rewards/chosen", "rewards/rejected", "rewards/margins", "rewards/accuracies"):
            assert float(terms.metrics[name]) == 0.0, name
        assert float(terms.total.detach() / terms.tokens) == pytest.approx(0.6931471805599453)  # -log sigmoid(0)
    assert all(torch.equal(before[name], tensor) for name, tensor in policy.state_dict().items())


@pytest.mark.parametrize("loss", ["sigmoid", "ipo", "simpo"])
def test_tiny_model_learns_a_toy_preference_through_the_loop(tmp_path, loss):
    from llmkit.train.loop import train

    torch.manual_seed(0)
    policy = apply_lora(tiny_decoder(vocab_size=VOCAB), LORA)
    settings = DPOSettings(loss=loss, beta=2.0 if loss == "simpo" else 0.5)
    pairs, held = toy_pairs(96, seed=5), toy_pairs(32, seed=6)
    if not settings.reference_free:
        cache_reference_logps(policy, pairs + held, PAD)
    train_settings = TrainSettings(max_steps=25, batch_size=8, lr=1e-2, warmup_steps=0, eval_every=0, log_every=5,
                                   checkpoint_every=1000, device="cpu", schedule="constant", weight_decay=0.0)
    train(policy, dpo_objective(settings), PairBatches(pairs, PAD), train_settings, tmp_path)
    rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert rows[-1]["rewards/margins"] > rows[0]["rewards/margins"] and rows[-1]["rewards/margins"] > 0
    metrics = preference_metrics(policy, held_out_batches(held, 8, PAD), settings)
    assert metrics["rewards/accuracies"] > 0.9 and metrics["rewards/margins"] > 0


@pytest.fixture(scope="module")
def tiny_model_dir(tmp_path_factory):
    from llmkit.checkpoints import save_model

    directory = tmp_path_factory.mktemp("tiny")
    save_model(tiny_decoder(vocab_size=VOCAB), directory, tokenizer=byte_tokenizer(specials=["<eos>"], eos_id=EOS))
    return directory


def test_dpo_cli_end_to_end_on_a_tiny_model(capsys, tmp_path, tiny_model_dir):
    rows = [{"prompt": f"Q{i}: ", "chosen": "yes" * (1 + i % 3), "rejected": "no"} for i in range(12)]
    data = write_jsonl(tmp_path / "pairs.jsonl", rows)
    code, out, err = run_cli(capsys, "dpo", "--model", str(tiny_model_dir), "--data", str(data), "--loss", "ipo",
                             "--output", str(tmp_path / "run"), "--train.max_steps", "3", "--train.warmup_steps", "0",
                             "--train.device", "cpu", "--lora.rank", "2", "--held_out", "0.25",
                             "--train.eval_every", "2")
    assert code == 0, err
    rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert {"rewards/margins", "rewards/accuracies"} <= set(next(row for row in rows if row["kind"] == "eval"))
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["loss"] == "ipo" and summary["steps"] == 3 and "rewards/accuracies" in summary["held_out"]
    assert (tmp_path / "run" / "policy" / "adapter.safetensors").is_file() and (tmp_path / "run" / "dpo.png").is_file()
    assert "held-out (3 pairs)" in out


@pytest.mark.parametrize(("argv", "message"), [
    (["--loss", "conservative"], "--loss conservative needs --label_smoothing above 0"),
    (["--beta", "-1"], "--beta -1.0 must be positive"),
    (["--max_prompt_length", "300", "--max_length", "200"], "--max_prompt_length 300 must be"),
])
def test_dpo_cli_errors(capsys, tmp_path, tiny_model_dir, argv, message):
    data = write_jsonl(tmp_path / "pairs.jsonl", [{"prompt": "Q", "chosen": "a", "rejected": "b"}] * 4)
    code, err = cli_status(capsys, "dpo", "--model", str(tiny_model_dir), "--data", str(data), *argv)
    assert code == 2 and message in err and "Traceback" not in err


# ---- real weights ----------------------------------------------------------------------------------------------------


@pytest.mark.slow
def test_a_few_dpo_steps_on_real_pairs_move_smollm2_margins_above_zero():
    from llmkit.align.preference import builtin_hh_rlhf, tokenize_pairs
    from llmkit.checkpoints import default_model_path, load_model, load_tokenizer

    path = default_model_path()
    tokenizer = load_tokenizer(path)
    pairs, _ = tokenize_pairs(builtin_hh_rlhf(limit=2), tokenizer, max_length=64, max_prompt_length=32)
    torch.manual_seed(0)
    policy = apply_lora(load_model(path, arch="decoder"), LoraSettings(rank=8, targets=("q_proj", "v_proj")))
    cache_reference_logps(policy, pairs, tokenizer.pad_id)
    batch = pair_batch(pairs, tokenizer.pad_id)
    objective = dpo_objective(DPOSettings(beta=0.1))
    optimizer = torch.optim.AdamW([p for p in policy.parameters() if p.requires_grad], lr=1e-3)
    policy.train()
    for _ in range(3):
        terms = objective(policy, batch)
        (terms.total / terms.tokens).backward()
        optimizer.step()
        optimizer.zero_grad()
    after = preference_metrics(policy, [batch], DPOSettings(beta=0.1))
    assert after["rewards/margins"] > 0 and after["loss"] < 0.6931  # below -log sigmoid(0), where it started
