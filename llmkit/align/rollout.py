"""PPO rollouts: sample responses to a batch of prompts through llmkit.generate (KV cache; temperature, top-k,
top-p), score them, and record what the update needs: per response token the policy's log-prob (the "old" one),
the frozen reference's log-prob and the value of the state before it.

With LoRA the reference is the policy's own base with the adapter disabled (llmkit.peft.lora.disable_adapters), so
one model is in memory; with full fine-tuning it is a frozen copy taken before training.

A reward function maps (prompts, responses) to one float per response: an llmkit reward model
(`reward_model_scorer`, which scores prompt + response as the model was trained to), or any callable. The built-in
ones in TOY_REWARDS are toys that show the loop works; they measure nothing anyone wants.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from contextlib import nullcontext
from dataclasses import dataclass

import torch
from torch import nn

from llmkit.align.ppo import PolicyWithValue, response_logps_of
from llmkit.align.runs import pad_id_of
from llmkit.align.settings import PPOSettings, PPOTrainSettings
from llmkit.errors import LlmkitError
from llmkit.generate.decode import generate_tokens, tokenizer_stop_ids
from llmkit.generate.sampling import SamplingSettings
from llmkit.peft.lora import disable_adapters, lora_layers
from llmkit.tokenizer import Tokenizer

RewardFn = Callable[[Sequence[str], Sequence[str]], Sequence[float]]  # (prompts, responses) -> one score each


@dataclass
class Rollout:
    """B responses to B prompts. Token tensors are (B, P + L): prompts left-padded to P tokens, responses
    right-padded to L; per-token tensors are (B, L), `mask` marking each row's response tokens (the stop token
    included: ending is an action too)."""

    prompts: list[str]
    responses: list[str]
    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    prompt_len: int
    mask: torch.Tensor
    logps: torch.Tensor
    ref_logps: torch.Tensor
    values: torch.Tensor
    scores: torch.Tensor  # (B,) the reward function's, less the missing-EOS penalty
    ended: torch.Tensor  # (B,) bool: the response stopped at a stop id (EOS) before max_new_tokens


def sample_responses(policy: nn.Module, prompt_ids: Sequence[list[int]], stop_ids: frozenset[int], pad_id: int,
                     train: PPOTrainSettings, seed: int) -> tuple[list[list[int]], list[bool]]:
    """Each prompt's sampled response ids (the stop token kept last when one was sampled) and whether it stopped."""
    sampling = SamplingSettings(temperature=train.temperature, top_k=train.top_k, top_p=train.top_p, seed=seed)
    responses: list[list[int]] = [[] for _ in prompt_ids]
    ended = [False] * len(prompt_ids)
    for tokens in generate_tokens(policy, list(prompt_ids), train.max_new_tokens, sampling, stop_ids, pad_id):
        for row, token in enumerate(tokens):
            if token is not None:
                responses[row].append(token)
                ended[row] = ended[row] or token in stop_ids
    return responses, ended


def batch_tensors(prompt_ids: Sequence[list[int]], response_ids: Sequence[list[int]], pad_id: int, device: torch.device
                  ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, int]:
    """(input_ids (B, P + L), attention_mask (B, P + L), response mask (B, L), P): prompts left-padded, responses
    right-padded, as `PolicyWithValue.score_responses` reads them."""
    prompt_len = max(map(len, prompt_ids))
    length = max(map(len, response_ids))
    ids, attention, mask = [], [], []
    for prompt, response in zip(prompt_ids, response_ids, strict=True):
        left, right = prompt_len - len(prompt), length - len(response)
        ids.append([pad_id] * left + list(prompt) + list(response) + [pad_id] * right)
        attention.append([0] * left + [1] * (len(prompt) + len(response)) + [0] * right)
        mask.append([1.0] * len(response) + [0.0] * right)
    return (torch.tensor(ids, device=device), torch.tensor(attention, device=device),
            torch.tensor(mask, device=device), prompt_len)


@torch.no_grad()
def reference_logps(model: PolicyWithValue, reference: nn.Module | None, input_ids: torch.Tensor,
                    attention_mask: torch.Tensor, prompt_len: int) -> torch.Tensor:
    """Log-probs (B, L) of the responses under the reference: `reference` when given (full fine-tuning), else the
    policy with its LoRA adapters disabled."""
    if reference is None and not lora_layers(model.policy):
        raise LlmkitError("a policy without LoRA adapters needs a frozen reference model (pass reference=...)")
    context = disable_adapters(model.policy) if reference is None else nullcontext()
    with context:
        return response_logps_of(reference or model.policy, input_ids, attention_mask, prompt_len)


def collect_rollout(model: PolicyWithValue, reference: nn.Module | None, tokenizer: Tokenizer, prompts: Sequence[str],
                    reward_fn: RewardFn, settings: PPOSettings, train: PPOTrainSettings, seed: int) -> Rollout:
    """Sample, decode and score responses to `prompts`, with old log-probs, reference log-probs and values."""
    stop_ids = tokenizer_stop_ids(tokenizer)
    pad_id = pad_id_of(tokenizer)
    prompt_ids = [tokenizer.encode(prompt) for prompt in prompts]
    was_training = model.training
    model.eval()
    response_ids, ended = sample_responses(model.policy, prompt_ids, stop_ids, pad_id, train, seed)
    device = next(model.parameters()).device
    input_ids, attention_mask, mask, prompt_len = batch_tensors(prompt_ids, response_ids, pad_id, device)
    with torch.no_grad():
        logps, values, _ = model.score_responses(input_ids, attention_mask, prompt_len)
    ref_logps = reference_logps(model, reference, input_ids, attention_mask, prompt_len)
    model.train(was_training)
    responses = [tokenizer.decode([t for t in ids if t not in stop_ids]) for ids in response_ids]
    scores = [float(value) for value in reward_fn(list(prompts), responses)]
    if len(scores) != len(prompts):
        raise LlmkitError(f"the reward function returned {len(scores)} scores for {len(prompts)} responses; it must "
                          "return one per response")
    ended_tensor = torch.tensor(ended, device=device)
    score_tensor = torch.tensor(scores, device=device, dtype=torch.float32)
    if settings.missing_eos_penalty is not None:
        score_tensor = score_tensor - settings.missing_eos_penalty * (~ended_tensor).float()
    return Rollout(list(prompts), responses, input_ids, attention_mask, prompt_len, mask, logps * mask,
                   ref_logps * mask, values * mask, score_tensor, ended_tensor)


# ---- reward functions ------------------------------------------------------------------------------------------------

def reward_model_scorer(reward_model: nn.Module, tokenizer: Tokenizer, batch_size: int = 8) -> RewardFn:
    """Scores prompt + response with an llmkit reward model (llmkit.align.reward.score: the head read at EOS)."""
    from llmkit.align.reward import score

    def scorer(prompts: Sequence[str], responses: Sequence[str]) -> list[float]:
        return score(reward_model, tokenizer, [p + r for p, r in zip(prompts, responses, strict=True)], batch_size)

    return scorer


def exclamation_reward(prompts: Sequence[str], responses: Sequence[str]) -> list[float]:
    """TOY: the number of '!' in the response, at most 3. Learnable and easy to check by eye; means nothing."""
    return [float(min(response.count("!"), 3)) for response in responses]


def brevity_reward(prompts: Sequence[str], responses: Sequence[str]) -> list[float]:
    """TOY: 1 - words / 20 (at least -1): shorter responses score higher, so the policy learns to stop early."""
    return [max(1.0 - len(response.split()) / 20, -1.0) for response in responses]


TOY_REWARDS: dict[str, RewardFn] = {"toy_exclamation": exclamation_reward, "toy_brevity": brevity_reward}


# ---- prompts ---------------------------------------------------------------------------------------------------------

SST2_TRAIN = "sst2/train.tsv"


def load_prompts(paths: Sequence[str], limit: int | None = None) -> list[str]:
    """The "prompt" field of every line of the JSONL files `paths` (at most `limit`)."""
    from llmkit.data.jsonl import read_jsonl

    prompts: list[str] = []
    for path in paths:
        for _, row in read_jsonl(path, fields=("prompt",), hint='each line must be {"prompt": "..."}'):
            prompts.append(row["prompt"])
            if limit is not None and len(prompts) >= limit:
                return prompts
    if not prompts:
        raise LlmkitError(f"--prompts {', '.join(paths)} holds no prompts; add lines like {{\"prompt\": \"...\"}}")
    return prompts


def sst2_prefixes(limit: int, words: int = 5, split: str = SST2_TRAIN) -> list[str]:
    """The first `words` words of SST-2 sentences (the `split` file, training by default) that have at least twice
    as many (GLUE SST-2 in the shared data): movie-review openings for the policy to continue, as in the classic
    sentiment-steering demo."""
    from llmkit.data.shared import shared_data_file

    prefixes: list[str] = []
    for line in shared_data_file(split).read_text(encoding="utf-8").splitlines()[1:]:
        sentence = line.rsplit("\t", 1)[0].split()
        if len(sentence) >= 2 * words:
            prefixes.append(" ".join(sentence[:words]))
            if len(prefixes) >= limit:
                break
    return prefixes
