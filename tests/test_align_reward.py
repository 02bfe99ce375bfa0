"""Reward model: the score is read at the last real token whatever the padding side and with pad == eos; on a toy
preference a tiny model learns to ~1 held-out accuracy while Hugging Face's "token before the first pad id" rule,
with SmolLM2's pad == eos, stays at chance; save / load / score round trip; the CLI's errors."""

from __future__ import annotations

import json
import random

import pytest
import torch

from llmkit.align.preference import TokenizedPair, held_out_batches, pair_batch
from llmkit.align.reward import (
    RewardModel,
    bradley_terry_loss,
    last_real_index,
    load_reward_model,
    pairwise_accuracy,
    reward_objective,
    save_reward_model,
    score,
)
from llmkit.errors import LlmkitError
from llmkit.train.settings import TrainSettings
from tests.helpers import byte_tokenizer, cli_status, run_cli, tiny_decoder, write_jsonl

pytestmark = pytest.mark.usefixtures("one_thread")
EOS = PAD = 256  # SmolLM2's pad id is its EOS id, which also ends every chat turn inside the prompt
GOOD, BAD = 257, 258
VOCAB = 260


def test_last_real_index_with_right_and_left_padding():
    right = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]])
    left = torch.tensor([[0, 0, 1, 1, 1], [0, 1, 1, 1, 1]])
    assert last_real_index(right, right.shape).tolist() == [2, 4]
    assert last_real_index(left, left.shape).tolist() == [4, 4]
    assert last_real_index(None, torch.Size((3, 7))).tolist() == [6, 6, 6]
    with pytest.raises(LlmkitError, match="no real token"):
        last_real_index(torch.tensor([[0, 0], [1, 0]]), torch.Size((2, 2)))


def toy_pairs(count: int, seed: int) -> list[TokenizedPair]:
    """Prompt: random letters, EOS (end of a turn, as in a chat template), "A:"; chosen ends with GOOD, rejected with
    BAD, each then EOS; lengths vary so batches are padded."""
    rng = random.Random(seed)
    letters = lambda low, high: [rng.randrange(97, 123) for _ in range(rng.randint(low, high))]  # noqa: E731
    return [TokenizedPair([*letters(2, 6), EOS, 65, 58], [*letters(1, 5), GOOD, EOS], [*letters(1, 5), BAD, EOS])
            for _ in range(count)]


def test_rewards_do_not_depend_on_padding_side_or_pad_values():
    model = RewardModel(tiny_decoder(vocab_size=VOCAB)).eval()
    pairs = toy_pairs(4, seed=0)
    right, left = pair_batch(pairs, PAD, "right"), pair_batch(pairs, PAD, "left")
    with torch.no_grad():
        expected = torch.stack([model(row[mask.bool()][None]) for row, mask in
                                zip(right["input_ids"], right["attention_mask"], strict=True)]).squeeze(1)
        from_right = model(right["input_ids"], attention_mask=right["attention_mask"])
        from_left = model(left["input_ids"], attention_mask=left["attention_mask"])
        noisy = right["input_ids"].masked_fill(right["attention_mask"] == 0, 7)  # other pad ids: same rewards
        from_noisy = model(noisy, attention_mask=right["attention_mask"])
    assert torch.allclose(from_right, expected, atol=1e-5)
    assert torch.allclose(from_left, expected, atol=1e-5)  # positions count from the first real token
    assert torch.allclose(from_noisy, expected, atol=1e-5)


class FirstPadIndexRewardModel(RewardModel):
    """The regression to guard against: Hugging Face's sequence-classification rule, the token before the first
    pad id. With pad == eos and EOS ending the prompt's turns, it reads inside the prompt, which both rows share."""

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        hidden = self.backbone.hidden_states(input_ids, attention_mask=attention_mask)
        last = (input_ids == PAD).int().argmax(dim=1) - 1
        final = hidden[torch.arange(len(last)), last]
        return self.score(self.backbone.final_norm(final)).squeeze(-1).float()


def train_toy(model_class: type, tmp_path) -> float:
    from llmkit.align.preference import PairBatches
    from llmkit.train.loop import train

    torch.manual_seed(0)
    model = model_class(tiny_decoder(vocab_size=VOCAB))
    settings = TrainSettings(max_steps=40, batch_size=8, lr=3e-3, warmup_steps=0, eval_every=0, log_every=10,
                             checkpoint_every=1000, device="cpu", schedule="constant", weight_decay=0.0)
    result = train(model, reward_objective(), PairBatches(toy_pairs(160, seed=1), PAD), settings, tmp_path)
    rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert "accuracy" in rows[-1] and "margin" in rows[-1] and result.steps == 40
    return pairwise_accuracy(model, held_out_batches(toy_pairs(64, seed=2), 16, PAD))["accuracy"]


def test_toy_preference_is_learned_at_the_last_real_token_and_not_by_the_first_pad_rule(tmp_path):
    assert train_toy(RewardModel, tmp_path / "right") > 0.95
    assert train_toy(FirstPadIndexRewardModel, tmp_path / "broken") == pytest.approx(0.5, abs=0.05)


def test_bradley_terry_loss_and_objective_by_hand():
    chosen, rejected = torch.tensor([2.0, -1.0]), torch.tensor([1.0, 1.0])
    expected = [-torch.log(torch.sigmoid(torch.tensor(0.5))), -torch.log(torch.sigmoid(torch.tensor(-2.5)))]
    assert torch.allclose(bradley_terry_loss(chosen, rejected, margin=0.5), torch.stack(expected))

    class Fixed(torch.nn.Module):
        def forward(self, input_ids, attention_mask=None):
            return torch.tensor([2.0, -1.0, 1.0, 1.0])

    terms = reward_objective()(Fixed(), pair_batch(toy_pairs(2, seed=0), PAD))
    assert int(terms.tokens) == 2 and float(terms.metrics["accuracy"]) == 1.0 and float(terms.metrics["margin"]) == -1.0
    assert float(terms.total) == pytest.approx(float(bradley_terry_loss(chosen, rejected).sum()))


def test_save_load_and_score_round_trip_with_lora_merged(tmp_path):
    from llmkit.peft.lora import apply_lora
    from llmkit.peft.settings import LoraSettings

    tokenizer = byte_tokenizer(specials=["<eos>"], eos_id=EOS, pad_id=EOS)
    backbone = apply_lora(tiny_decoder(vocab_size=VOCAB), LoraSettings(rank=2, targets=("q_proj", "v_proj")))
    for name, parameter in backbone.named_parameters():
        if "lora_B" in name:
            torch.nn.init.normal_(parameter, std=0.5)  # a trained-looking adapter: merging must keep it
    model = RewardModel(backbone).eval()
    texts = ["Human: hi A: hello", "Human: hi A: go away, now"]
    before = score(model, tokenizer, texts)
    directory = save_reward_model(model, tmp_path / "rm", tokenizer, extra={"held_out_accuracy": 0.7})
    loaded = load_reward_model(directory)
    assert score(loaded, tokenizer, texts) == pytest.approx(before, abs=1e-5)
    with torch.no_grad():
        single = [float(model(torch.tensor([tokenizer.encode(text) + [EOS]]))) for text in texts]
    assert before == pytest.approx(single, abs=1e-5)  # batched (padded) = one at a time
    assert json.loads((directory / "reward_model.json").read_text())["held_out_accuracy"] == 0.7
    with pytest.raises(LlmkitError, match="not a reward model"):
        load_reward_model(tmp_path)


def test_reward_cli_errors(capsys, tmp_path):
    bad = write_jsonl(tmp_path / "bad.jsonl", [{"prompt": "Q", "chosen": "a"}])
    model = tmp_path / "m"
    from llmkit.checkpoints import save_model

    save_model(tiny_decoder(vocab_size=VOCAB), model, tokenizer=byte_tokenizer(specials=["<eos>"], eos_id=EOS))
    code, err = cli_status(capsys, "reward", "train", "--model", str(model), "--data", str(bad), "--output",
                           str(tmp_path / "run"))
    assert code == 2 and f"{bad}, line 1: no field 'rejected'" in err and "Traceback" not in err
    code, err = cli_status(capsys, "reward", "score", "--model", str(model))
    assert code == 2 and "is not a reward model" in err
    good = write_jsonl(tmp_path / "good.jsonl", [{"prompt": "Q", "chosen": "a", "rejected": "b"}] * 4)
    code, err = cli_status(capsys, "reward", "train", "--model", str(model), "--data", str(good), "--held_out", "2")
    assert code == 2 and "--held_out 2.0 must be a fraction in (0, 1)" in err


def test_reward_train_and_score_end_to_end_on_a_tiny_model(capsys, tmp_path):
    from llmkit.checkpoints import save_model

    model = tmp_path / "m"
    save_model(tiny_decoder(vocab_size=VOCAB), model, tokenizer=byte_tokenizer(specials=["<eos>"], eos_id=EOS))
    rows = [{"prompt": f"Q{i}: ", "chosen": "yes" * (1 + i % 3), "rejected": "no"} for i in range(12)]
    data = write_jsonl(tmp_path / "pairs.jsonl", rows)
    code, out, err = run_cli(capsys, "reward", "train", "--model", str(model), "--data", str(data), "--output",
                             str(tmp_path / "run"), "--train.max_steps", "3", "--train.warmup_steps", "0",
                             "--train.device", "cpu", "--train.eval_every", "2", "--held_out", "0.25", "--margin", "0.5")
    assert code == 0, err
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["steps"] == 3 and summary["held_out"]["pairs"] == 3 and (tmp_path / "run" / "reward.png").is_file()
    assert f"held-out pairwise accuracy {summary['held_out']['accuracy']:.3f} on 3 pairs" in out
    eval_row = next(json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()
                    if json.loads(line)["kind"] == "eval")
    assert {"accuracy", "margin"} <= set(eval_row)
    texts = write_jsonl(tmp_path / "texts.jsonl", [{"text": "Q1: yes"}, {"text": "Q1: no"}, rows[0]])
    code, out, err = run_cli(capsys, "reward", "score", "--model", summary["reward_model"], "--data", str(texts))
    assert code == 0, err
    assert "pairwise accuracy" in out and out.count("'Q1: ") == 2
