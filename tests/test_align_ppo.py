"""PPO: GAE against a written-out loop, whitening, k1/k3 against the exact KL, the adaptive controller's rule, the
clipped losses against hand-computed values, a zero learning rate leaves the policy unchanged at KL 0, the LoRA
reference is the adapter-disabled base exactly, a tiny model learns a learnable reward under a KL bound, and the CLI
end to end with a bad-input case."""

from __future__ import annotations

import copy
import json
import math
import random

import pytest
import torch

from llmkit.align.ppo import (
    KLController,
    PolicyWithValue,
    clipped_policy_loss,
    clipped_value_loss,
    gae,
    kl_estimate,
    response_logps_of,
    token_rewards,
    whiten,
)
from llmkit.align.ppo_train import train_ppo
from llmkit.align.rollout import TOY_REWARDS, collect_rollout
from llmkit.align.settings import PPOSettings, PPOTrainSettings
from llmkit.commands.ppo import TOY_NAMES
from llmkit.errors import LlmkitError
from llmkit.peft.lora import apply_lora
from llmkit.peft.settings import LoraSettings
from tests.helpers import byte_tokenizer, cli_status, run_cli, tiny_decoder, write_jsonl

pytestmark = pytest.mark.usefixtures("one_thread")
EOS = 256
VOCAB = 260
LORA = LoraSettings(rank=4, alpha=8, targets=("q_proj", "v_proj", "up_proj", "down_proj"))
LETTERS = "abcdefghijklmnopqrstuvwxyz"


def tokenizer():  # noqa: ANN201
    return byte_tokenizer(specials=["<eos>", "<x>", "<y>", "<z>"], eos_id=EOS, pad_id=EOS)  # ids 256..259 = VOCAB


def toy_prompts(count: int = 32, seed: int = 0) -> list[str]:
    rng = random.Random(seed)
    return ["".join(rng.choice("abcdefgh") for _ in range(rng.randint(3, 8))) for _ in range(count)]


def letter_share(prompts: list[str], responses: list[str]) -> list[float]:
    """The learnable reward: the share of the response's characters that are lowercase letters (about 0.1 at random)."""
    return [sum(char in LETTERS for char in response) / max(len(response), 1) for response in responses]


def random_episode(seed: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    rewards, values = torch.randn(3, 6, generator=generator), torch.randn(3, 6, generator=generator)
    mask = torch.tensor([[1.0] * 6, [1.0] * 4 + [0.0] * 2, [1.0] + [0.0] * 5])
    return rewards * mask, values, mask


# ---- the math --------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize(("gamma", "lam"), [(1.0, 0.95), (0.9, 0.8), (0.99, 1.0)])
def test_gae_matches_a_written_out_loop(gamma, lam):
    rewards, values, mask = random_episode(seed=1)
    advantages, returns = gae(rewards, values, mask, gamma, lam)
    for row in range(3):
        length = int(mask[row].sum())
        for t in range(length):
            expected = 0.0
            for k in range(t, length):  # A_t = sum_k (gamma lam)^(k-t) delta_k, V = 0 after the last token
                next_value = float(values[row, k + 1]) if k + 1 < length else 0.0
                delta = float(rewards[row, k]) + gamma * next_value - float(values[row, k])
                expected += (gamma * lam) ** (k - t) * delta
            assert float(advantages[row, t]) == pytest.approx(expected, abs=1e-6)
            assert float(returns[row, t]) == pytest.approx(expected + float(values[row, t]), abs=1e-6)
        assert advantages[row, length:].abs().sum() == 0 and returns[row, length:].abs().sum() == 0


def test_whitening_gives_mean_zero_unit_variance_over_response_tokens_only():
    rewards, values, mask = random_episode(seed=2)
    advantages, _ = gae(rewards, values, mask, 1.0, 0.95)
    white = whiten(advantages * 3 + 5, mask)
    real = white[mask.bool()]
    assert float(real.mean()) == pytest.approx(0.0, abs=1e-6)
    assert float(real.var(unbiased=False)) == pytest.approx(1.0, abs=1e-5)
    assert white[~mask.bool()].abs().sum() == 0


def test_token_rewards_put_the_score_on_the_last_response_token_and_the_penalty_everywhere():
    logps = torch.tensor([[-1.0, -2.0, -3.0], [-0.5, -0.7, 0.0]])
    ref = torch.tensor([[-1.5, -1.0, -3.0], [-0.5, -1.7, 0.0]])
    mask = torch.tensor([[1.0, 1.0, 1.0], [1.0, 1.0, 0.0]])
    rewards, kl = token_rewards(torch.tensor([2.0, -1.0]), logps, ref, mask, kl_coef=0.1, estimator="k1")
    assert torch.allclose(kl, torch.tensor([[0.5, -1.0, 0.0], [0.0, 1.0, 0.0]]))
    assert torch.allclose(rewards, torch.tensor([[-0.05, 0.1, 2.0], [0.0, -0.1 - 1.0, 0.0]]))


def test_kl_estimators_are_unbiased_for_the_exact_kl_and_k3_is_never_negative():
    p = torch.tensor([0.5, 0.2, 0.15, 0.1, 0.05], dtype=torch.float64)
    q = torch.tensor([0.3, 0.3, 0.2, 0.1, 0.1], dtype=torch.float64)
    exact = float((p * (p / q).log()).sum())
    logp, logq = p.log(), q.log()
    # The expectations under p, summed exactly over the 5 outcomes: both equal KL(p || q) (k3: sum q - 1 = 0).
    for estimator in ("k1", "k3"):
        assert float((p * kl_estimate(logp, logq, estimator)).sum()) == pytest.approx(exact, abs=1e-12)
    # Monte Carlo: 200,000 draws from p; each mean within 5 standard errors (and 0.01 nats) of the exact KL.
    draws = torch.multinomial(p, 200_000, replacement=True, generator=torch.Generator().manual_seed(0))
    for estimator in ("k1", "k3"):
        samples = kl_estimate(logp[draws], logq[draws], estimator)
        error = 5 * float(samples.std()) / math.sqrt(len(samples))
        assert abs(float(samples.mean()) - exact) < min(error, 0.01)
    k3 = kl_estimate(logp[draws], logq[draws], "k3")
    assert float(k3.min()) >= 0 and float(kl_estimate(logp[draws], logq[draws], "k1").min()) < 0
    assert float(k3.var()) < float(kl_estimate(logp[draws], logq[draws], "k1").var())  # why k3 exists


def test_adaptive_controller_follows_ziegler_et_al():
    controller = KLController(0.1, target=6.0, horizon=100)
    assert controller.update(kl=9.0, n=8) == pytest.approx(0.1 * (1 + 0.2 * 8 / 100))  # 9/6 - 1 = 0.5, clipped to 0.2
    assert controller.update(kl=5.4, n=8) == pytest.approx(0.1 * 1.016 * (1 - 0.1 * 8 / 100))  # 5.4/6 - 1 = -0.1
    assert controller.update(kl=0.0, n=50) == pytest.approx(0.1 * 1.016 * 0.992 * (1 - 0.2 * 50 / 100))
    fixed = KLController(0.05)
    assert fixed.update(kl=100.0, n=8) == 0.05 and fixed.coef == 0.05


def test_clipped_policy_loss_against_hand_computed_values():
    old = torch.zeros(1, 5)
    ratios = torch.tensor([[1.1, 1.5, 0.5, 0.5, 3.0]])
    advantages = torch.tensor([[1.0, 1.0, 1.0, -1.0, 7.0]])
    mask = torch.tensor([[1.0, 1.0, 1.0, 1.0, 0.0]])  # the last token is padding: ignored
    out = clipped_policy_loss(ratios.log(), old, advantages, mask, clip_range=0.2)
    # inside the clip: -1.1; above with A > 0: clipped to -1.2; below with A > 0: the unclipped -0.5 (pessimistic);
    # below with A < 0: the clipped 0.8
    assert float(out.loss) == pytest.approx((-1.1 - 1.2 - 0.5 + 0.8) / 4, abs=1e-6)
    assert float(out.clip_fraction) == pytest.approx(3 / 4)
    assert float(out.approx_kl) == pytest.approx(float((0.5 * ratios[0, :4].log() ** 2).mean()), abs=1e-6)


def test_clipped_value_loss_against_hand_computed_values():
    values = torch.tensor([[0.5, 0.1, -0.5, 9.0]])
    old = torch.zeros(1, 4)
    returns = torch.tensor([[1.0, 1.0, -1.0, 0.0]])
    mask = torch.tensor([[1.0, 1.0, 1.0, 0.0]])
    # 0.5: clipped to 0.2 -> (0.8)^2 > (0.5)^2; 0.1: inside, 0.81; -0.5: clipped to -0.2 -> 0.64 > 0.25
    expected = 0.5 * (0.64 + 0.81 + 0.64) / 3
    assert float(clipped_value_loss(values, old, returns, mask, vf_clip=0.2)) == pytest.approx(expected, abs=1e-6)


def test_settings_reject_bad_values_with_the_flag_name():
    with pytest.raises(LlmkitError, match="--kl_coef"):
        PPOSettings(kl_coef=-1)
    with pytest.raises(LlmkitError, match="--target_kl"):
        PPOSettings(target_kl=0)
    with pytest.raises(LlmkitError, match="--kl_estimator"):
        PPOSettings(kl_estimator="k2")
    with pytest.raises(LlmkitError, match="--train.temperature"):
        PPOTrainSettings(temperature=0)


def test_toy_reward_names_in_the_cli_are_the_built_ins():
    assert set(TOY_NAMES) == set(TOY_REWARDS)


# ---- on a tiny model -------------------------------------------------------------------------------------------------

def small_train(**overrides) -> PPOTrainSettings:  # noqa: ANN003
    return PPOTrainSettings(**{"steps": 2, "rollout_batch": 8, "lr": 3e-3, "max_new_tokens": 8, **overrides})


@pytest.mark.parametrize("method", ["full", "lora"])
def test_zero_learning_rate_leaves_the_policy_unchanged_and_the_kl_exactly_zero(method):
    network = tiny_decoder(vocab_size=VOCAB)
    reference = copy.deepcopy(network) if method == "full" else None
    if method == "lora":
        network = apply_lora(network, LORA)  # B = 0: the adapted policy starts as the base
    model = PolicyWithValue(network)
    before = {name: tensor.clone() for name, tensor in model.state_dict().items()}
    result = train_ppo(model, reference, tokenizer(), toy_prompts(), letter_share, PPOSettings(kl_estimator="k3"),
                       small_train(lr=0.0))
    for name, tensor in model.state_dict().items():
        assert torch.equal(tensor, before[name]), name
    for row in result.rows:
        assert row["kl"] == 0.0 and row["clip_fraction"] == 0.0 and row["approx_kl"] == 0.0


def test_lora_reference_is_the_adapter_disabled_base_exactly():
    base = tiny_decoder(vocab_size=VOCAB)
    network = apply_lora(copy.deepcopy(base), LORA)
    for name, parameter in network.named_parameters():
        if "lora_B" in name:
            torch.nn.init.normal_(parameter, std=0.3)  # as after training
    model = PolicyWithValue(network)
    rollout = collect_rollout(model, None, tokenizer(), toy_prompts(6), letter_share, PPOSettings(), small_train(), 1)
    with torch.no_grad():
        expected = response_logps_of(base, rollout.input_ids, rollout.attention_mask, rollout.prompt_len)
    assert torch.equal(rollout.ref_logps, expected * rollout.mask)
    assert not torch.allclose(rollout.logps, rollout.ref_logps)  # the adapter does change the policy
    # the old log-probs are the policy's own at sampling time: re-scoring gives them again
    logps, _, _ = model.score_responses(rollout.input_ids, rollout.attention_mask, rollout.prompt_len)
    assert torch.allclose(logps * rollout.mask, rollout.logps, atol=1e-5)


def test_missing_eos_penalty_lowers_the_score_of_cut_off_responses():
    model = PolicyWithValue(tiny_decoder(vocab_size=VOCAB))
    reference = copy.deepcopy(model.policy)
    prompts = toy_prompts(8)
    plain = collect_rollout(model, reference, tokenizer(), prompts, letter_share, PPOSettings(), small_train(), 1)
    penalised = collect_rollout(model, reference, tokenizer(), prompts, letter_share,
                                PPOSettings(missing_eos_penalty=2.0), small_train(), 1)
    assert not bool(plain.ended.all())  # a random tiny model rarely samples EOS within 8 tokens
    assert torch.allclose(penalised.scores, plain.scores - 2.0 * (~plain.ended).float())


def test_mean_reward_rises_on_a_learnable_reward_while_the_kl_stays_bounded():
    model = PolicyWithValue(tiny_decoder(vocab_size=VOCAB))
    reference = copy.deepcopy(model.policy)
    train = PPOTrainSettings(steps=30, rollout_batch=16, lr=3e-3, max_new_tokens=8)
    result = train_ppo(model, reference, tokenizer(), toy_prompts(), letter_share,
                       PPOSettings(kl_coef=0.05, minibatch_size=8), train)
    rewards = [row["reward"] for row in result.rows]
    first, last = sum(rewards[:5]) / 5, sum(rewards[-5:]) / 5
    assert last > first + 0.1, rewards  # from about 0.1 (random letters) upward
    assert max(row["kl"] for row in result.rows) < 8.0  # nats per 8-token response; the penalty holds it


def lora_policy(seed: int = 0) -> PolicyWithValue:
    torch.manual_seed(seed)
    return PolicyWithValue(apply_lora(tiny_decoder(vocab_size=VOCAB), LORA))


def trained_tensors(model: PolicyWithValue) -> dict[str, torch.Tensor]:
    return {name: p.detach().clone() for name, p in model.named_parameters() if p.requires_grad}


def test_a_run_resumed_from_its_checkpoint_repeats_an_unbroken_run_exactly(tmp_path):
    settings = PPOSettings(target_kl=1.0, minibatch_size=4)  # adaptive: the KL coefficient must be restored too
    whole = lora_policy()
    unbroken = train_ppo(whole, None, tokenizer(), toy_prompts(), letter_share, settings,
                         small_train(steps=4, checkpoint_every=2), tmp_path / "whole")
    first = lora_policy()
    train_ppo(first, None, tokenizer(), toy_prompts(), letter_share, settings, small_train(steps=2, checkpoint_every=2),
              tmp_path / "parts")
    second = lora_policy(seed=1)  # other starting weights: the checkpoint must overwrite them
    resumed = train_ppo(second, None, tokenizer(), toy_prompts(), letter_share, settings,
                        small_train(steps=4, checkpoint_every=2), tmp_path / "parts")
    assert [row["step"] for row in resumed.rows] == [1, 2, 3, 4]
    for a, b in zip(unbroken.rows, resumed.rows):
        assert a["reward"] == b["reward"] and a["kl"] == b["kl"] and a["kl_coef"] == b["kl_coef"], (a, b)
    assert unbroken.rows[2]["kl_coef"] != settings.kl_coef  # the controller had moved before the break
    expected, got = trained_tensors(whole), trained_tensors(second)
    assert expected.keys() == got.keys()
    for name in expected:
        assert torch.equal(expected[name], got[name]), name
    metrics = [json.loads(line) for line in (tmp_path / "parts" / "metrics.jsonl").read_text().splitlines()]
    assert [row["step"] for row in metrics] == [1, 2, 3, 4]


def test_resume_never_refuses_a_run_directory_with_checkpoints(tmp_path):
    train_ppo(lora_policy(), None, tokenizer(), toy_prompts(), letter_share, PPOSettings(),
              small_train(steps=1), tmp_path)
    with pytest.raises(LlmkitError, match="--train.resume auto"):
        train_ppo(lora_policy(), None, tokenizer(), toy_prompts(), letter_share, PPOSettings(),
                  small_train(steps=2, resume="never"), tmp_path)


def test_bf16_mixed_precision_rolls_out_and_updates_under_autocast():
    model = lora_policy()
    before = trained_tensors(model)
    result = train_ppo(model, None, tokenizer(), toy_prompts(), letter_share, PPOSettings(),
                       small_train(precision="bf16-mixed"))
    assert all(math.isfinite(row["kl"]) and math.isfinite(row["value_loss"]) for row in result.rows)
    after = trained_tensors(model)
    assert all(after[name].dtype == torch.float32 for name in after)  # master weights stay fp32
    assert any(not torch.equal(before[name], after[name]) for name in before)


def test_train_settings_reject_fp16_and_bad_checkpoint_settings():
    with pytest.raises(LlmkitError, match="--train.precision fp16-mixed"):
        PPOTrainSettings(precision="fp16-mixed")
    with pytest.raises(LlmkitError, match="--train.checkpoint_every"):
        PPOTrainSettings(checkpoint_every=0)
    with pytest.raises(LlmkitError, match="unknown device 'banana'"):
        train_ppo(lora_policy(), None, tokenizer(), toy_prompts(), letter_share, PPOSettings(),
                  small_train(device="banana"))


# ---- the CLI ---------------------------------------------------------------------------------------------------------

def test_cli_end_to_end_on_a_tiny_model(tmp_path, capsys):
    from llmkit.checkpoints import save_model

    policy_dir = tmp_path / "policy"
    save_model(tiny_decoder(vocab_size=VOCAB), policy_dir, tokenizer=tokenizer())
    prompts = write_jsonl(tmp_path / "prompts.jsonl", [{"prompt": prompt} for prompt in toy_prompts(8)])
    output = tmp_path / "run"
    code, out, err = run_cli(capsys, "ppo", "--policy", str(policy_dir), "--reward", "toy_brevity", "--prompts",
                             str(prompts), "--method", "lora", "--lora.rank", "4", "--target_kl", "2",
                             "--train.steps", "2", "--train.rollout_batch", "4", "--train.max_new_tokens", "6",
                             "--output", str(output))
    assert code == 0, err
    rows = [json.loads(line) for line in (output / "metrics.jsonl").read_text().splitlines()]
    assert [row["step"] for row in rows] == [1, 2]
    for key in ("reward", "kl", "kl_coef", "entropy", "value_loss", "policy_loss", "clip_fraction", "samples"):
        assert key in rows[0]
    assert rows[0]["kl_coef"] == 0.05 and rows[1]["kl_coef"] != 0.05  # the adaptive controller moved it
    assert (output / "ppo.png").stat().st_size > 0 and (output / "value_head.safetensors").is_file()
    summary = json.loads((output / "summary.json").read_text())
    assert summary["steps"] == 2 and (output / "policy").is_dir()


def test_cli_bad_reward_is_one_line_with_exit_2(tmp_path, capsys):
    from llmkit.checkpoints import save_model

    policy_dir = tmp_path / "policy"
    save_model(tiny_decoder(vocab_size=VOCAB), policy_dir, tokenizer=tokenizer())
    code, err = cli_status(capsys, "ppo", "--policy", str(policy_dir), "--reward", str(tmp_path / "nowhere"),
                           "--output", str(tmp_path / "run"))
    assert code == 2
    assert err.startswith("error: --reward") and "toy_exclamation" in err and len(err.strip().splitlines()) == 1
    code, err = cli_status(capsys, "ppo", "--policy", str(policy_dir), "--output", str(tmp_path / "run"))
    assert code == 2 and "--reward is required" in err


# ---- real weights ----------------------------------------------------------------------------------------------------

@pytest.mark.slow
def test_two_ppo_steps_on_smollm2_with_lora_start_at_kl_zero_and_move_the_adapter():
    from llmkit.align.rollout import sst2_prefixes
    from llmkit.checkpoints import default_model_path, load_model, load_tokenizer

    path = default_model_path()
    torch.manual_seed(0)
    model = PolicyWithValue(apply_lora(load_model(path, arch="decoder"), LoraSettings(rank=8, targets=("q_proj", "v_proj"))))
    before = {name: p.detach().clone() for name, p in model.named_parameters() if p.requires_grad}
    train = PPOTrainSettings(steps=2, rollout_batch=4, lr=1e-3, max_new_tokens=6)
    result = train_ppo(model, None, load_tokenizer(path), sst2_prefixes(4), TOY_REWARDS["toy_brevity"],
                       PPOSettings(ppo_epochs=1, minibatch_size=4), train)
    first, second = result.rows
    assert first["kl"] == 0.0  # B = 0: the adapted policy is its base, the reference, exactly
    assert first["approx_kl"] < 1e-8  # the first minibatch re-scores the rollout: ratio 1
    assert second["kl"] != 0.0 and all(isinstance(text, str) and "->" in text for text in second["samples"])
    moved = [name for name, p in model.named_parameters() if p.requires_grad and not torch.equal(p, before[name])]
    assert any("lora_B" in name for name in moved) and any("value_head" in name for name in moved)
