"""`llmkit ppo`: PPO with a KL penalty to the starting policy (RLHF's last stage), rewarded by an llmkit reward model
(or, for the demo, a toy built-in reward)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from llmkit.align.settings import AlignMethod, KLEstimator, PPOSettings, PPOTrainSettings
from llmkit.commands.common import as_paths
from llmkit.errors import LlmkitError
from llmkit.peft.settings import LoraSettings

POLICY_DIR = "policy"
VALUE_HEAD_FILE = "value_head.safetensors"
SUMMARY_FILE = "summary.json"
TOY_NAMES = ("toy_exclamation", "toy_brevity")  # keys of llmkit.align.rollout.TOY_REWARDS (a test keeps them equal)
DEMO_REWARD = "toy_brevity"
# SmolLM2-135M + LoRA, 16 prompts x 12 new tokens per step, 8 steps: 1.5 minutes at load 1-2 (docs/alignment.md).
PPO_DEFAULTS = PPOTrainSettings(steps=8, rollout_batch=16, lr=2e-4, max_new_tokens=12)


def ppo(
    policy: str | None = None,
    reward: str | None = None,
    prompts: list[str] | str | None = None,
    method: AlignMethod = "lora",
    lora: LoraSettings = LoraSettings(),  # noqa: B008 (frozen defaults: --lora.rank 16)
    kl_coef: float = 0.05,
    target_kl: float | None = None,
    kl_horizon: int = 10000,
    kl_estimator: KLEstimator = "k1",
    gamma: float = 1.0,
    lam: float = 0.95,
    clip_range: float = 0.2,
    vf_clip: float = 0.2,
    vf_coef: float = 0.1,
    ppo_epochs: int = 4,
    minibatch_size: int = 4,
    whiten_advantages: bool = True,
    missing_eos_penalty: float | None = None,
    limit: int | None = 64,
    train: PPOTrainSettings = PPO_DEFAULTS,
    output: str = "runs/ppo",
) -> dict[str, Any]:
    """Optimise a policy against a reward with PPO and a per-token KL penalty to the starting policy.

    Example: llmkit ppo                 (demo: SmolLM2-135M-Instruct + LoRA continues SST-2 openings; TOY reward)
             llmkit ppo --policy my_model/ --reward runs/reward/reward_model --prompts prompts.jsonl --output runs/ppo
             llmkit ppo --policy my_model/ --reward RM_DIR --prompts p.jsonl --target_kl 6 --kl_estimator k3
             llmkit chat --model my_model/ --adapter runs/ppo/policy

    Each step samples one response per prompt (--train.rollout_batch prompts, --train.max_new_tokens tokens),
    scores it, adds -kl_coef * KL to every token's reward (k1 or k3 estimate against the reference: with --method
    lora the base with the adapter disabled, one model in memory), computes GAE advantages with a value head on the
    policy, and runs --ppo_epochs passes of clipped updates over minibatches. Logs reward, KL (nats per sequence),
    kl_coef, entropy, value loss, policy loss, clip fraction and samples per step to OUTPUT/metrics.jsonl and plots
    OUTPUT/ppo.png; writes OUTPUT/policy/ (the LoRA adapter, or the whole model with --method full), the value head
    and summary.json. Checkpoints go to OUTPUT/checkpoints every --train.checkpoint_every steps and on Ctrl-C or
    SIGTERM; the same command again resumes from the latest (--train.resume never refuses instead). --train.device
    cuda and --train.precision bf16-mixed run it on a GPU. The demo is a smoke run of the machinery, not the sentiment
    benchmark: its reward is a toy.

    Args:
        policy: .gguf file, Hugging Face directory or llmkit directory (default, the demo: SmolLM2-135M-Instruct).
        reward: a reward model directory (`llmkit reward train`'s OUTPUT/reward_model), or a TOY built-in that
            measures nothing useful: toy_exclamation (count of '!', at most 3), toy_brevity (fewer words score
            higher). Required with --policy; the demo uses toy_brevity.
        prompts: JSONL files with a "prompt" field per line (default: openings of SST-2 movie-review sentences).
        method: lora (adapters on a frozen base; the reference is the base) or full (a frozen copy is the reference).
        lora: --method lora: rank, alpha, dropout, targets, ...
        kl_coef: beta of the per-token KL penalty (the starting value with --target_kl).
        target_kl: nats per sequence the adaptive controller steers toward (null: fixed --kl_coef).
        kl_horizon: the adaptive controller's horizon in sequences.
        kl_estimator: k1 (log p - log p_ref) or k3 ((r - 1) - log r, never negative).
        gamma: GAE discount.
        lam: GAE lambda.
        clip_range: PPO ratio clip epsilon.
        vf_clip: value clip (how far a value may move from the rollout's).
        vf_coef: weight of the value loss.
        ppo_epochs: passes over each rollout.
        minibatch_size: responses per gradient step.
        whiten_advantages: normalise advantages per rollout.
        missing_eos_penalty: subtracted from the score of a response cut off before EOS (null: none).
        limit: use at most this many prompts (null: all).
        train: steps, rollout batch, learning rate, sampling.
        output: run directory.
    """
    import torch

    from llmkit.align.ppo import PolicyWithValue
    from llmkit.align.ppo_train import train_ppo
    from llmkit.align.runs import apply_training_method, write_summary
    from llmkit.checkpoints import default_model_path, load_model, load_tokenizer, save_model
    from llmkit.io import atomic_write
    from llmkit.peft.core import save_adapter

    settings = PPOSettings(kl_coef, target_kl, kl_horizon, kl_estimator, gamma, lam, clip_range, vf_clip, vf_coef,
                           ppo_epochs, minibatch_size, whiten_advantages, missing_eos_penalty)
    if limit is not None and limit < 1:
        raise LlmkitError(f"--limit {limit} must be at least 1 prompt (null: all)")
    if policy is not None and reward is None:
        raise LlmkitError("--reward is required with --policy: a reward model directory (llmkit reward train) or a "
                          f"toy built-in ({', '.join(TOY_NAMES)})")
    path = Path(policy) if policy else default_model_path()
    tokenizer = load_tokenizer(path)
    reward_name = reward or DEMO_REWARD
    reward_fn = reward_function(reward_name, train.device)
    prompt_list = prompt_texts(as_paths(prompts), limit)
    print(f"{len(prompt_list):,} prompts; reward: {reward_name}; policy: {path} ({method})")
    torch.manual_seed(train.seed)
    network = load_model(path, arch="decoder")
    reference = None
    if method == "full":
        import copy

        reference = copy.deepcopy(network)
    model = PolicyWithValue(apply_training_method(network, method, lora))
    result = train_ppo(model, reference, tokenizer, prompt_list, reward_fn, settings, train, output)
    policy_dir = Path(output) / POLICY_DIR
    if method == "lora":
        save_adapter(model.policy, policy_dir, "lora", lora)
    else:
        save_model(model.policy, policy_dir, tokenizer=tokenizer)
    from safetensors.torch import save_file

    head = {name: tensor.detach().contiguous().cpu() for name, tensor in model.value_head.state_dict().items()}
    atomic_write(Path(output) / VALUE_HEAD_FILE, lambda tmp: save_file(head, str(tmp)))
    first, last = result.rows[0], result.rows[-1]
    summary = {"policy": str(path), "reward": reward_name, "method": method, "steps": len(result.rows),
               "reward_first": first["reward"], "reward_last": last["reward"], "kl_last": last["kl"],
               "kl_coef_last": last["kl_coef"], "trained": str(policy_dir),
               "plot": str(result.plot) if result.plot else None}
    write_summary(Path(output) / SUMMARY_FILE, summary)
    print(f"reward {first['reward']:+.3f} -> {last['reward']:+.3f}, KL {last['kl']:.3f} nats/sequence; "
          f"policy: {policy_dir}")
    return summary


def reward_function(reward: str, device: str = "cpu"):  # noqa: ANN201 (an llmkit.align.rollout.RewardFn)
    """A toy built-in by name, or the reward model in the directory `reward` (with its own tokenizer) on `device`."""
    from llmkit.align.reward import is_reward_model, load_reward_model
    from llmkit.align.rollout import TOY_REWARDS, reward_model_scorer
    from llmkit.checkpoints import load_tokenizer

    if reward in TOY_REWARDS:
        return TOY_REWARDS[reward]
    if not Path(reward).is_dir() or not is_reward_model(reward):
        raise LlmkitError(f"--reward {reward} is neither a reward model directory (the reward_model/ folder that "
                          f"`llmkit reward train` writes) nor a toy built-in ({', '.join(TOY_NAMES)})")
    from llmkit.device import resolve_device

    model = load_reward_model(reward, device=str(resolve_device(device)))
    return reward_model_scorer(model, load_tokenizer(reward))


def prompt_texts(paths: list[str], limit: int | None) -> list[str]:
    from llmkit.align.rollout import load_prompts, sst2_prefixes

    return load_prompts(paths, limit) if paths else sst2_prefixes(limit or 64)
