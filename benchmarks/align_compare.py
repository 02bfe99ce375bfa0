"""DPO vs reward-model best-of-n vs the base model on held-out HH-RLHF prompts, all scored by one trained reward model.

The three ways to make a model's answers score higher under a learned preference, side by side on the same prompts:
- base: one sampled answer of the base model (SmolLM2-135M-Instruct);
- best-of-n: n sampled answers of the base model, the reward model keeps the highest (Nakano et al. 2021, WebGPT;
  Stiennon et al. 2020): no training, n times the generation and a reward-model pass per answer at inference;
- DPO: one sampled answer of the base with the DPO-trained LoRA adapter (`llmkit dpo`): one training run, then the
  base's cost per answer.

Prompts are the held-out split that `llmkit reward train` and `llmkit dpo` keep out of training when both run on the
whole file (`--limit null`, same seed and --held_out), cut to their last `--max_prompt_length` tokens as in training.
The table has each method's mean reward, its win rate against the base answer to the same prompt (a tie counts
half), the wall time per prompt and the weights each method holds in memory. The reward model that judges is also the
one best-of-n selects with, so best-of-n is scored by its own selector: an upper bound on what it gains in the eyes
of a different judge (Gao et al. 2023 on reward over-optimisation).

    llmkit reward train --limit null --output runs/reward
    llmkit dpo --limit null --output runs/dpo
    python benchmarks/align_compare.py --reward runs/reward/reward_model --dpo runs/dpo/policy --json docs/align_compare.json
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from llmkit.align.preference import builtin_hh_rlhf, split_held_out
from llmkit.align.reward import load_reward_model, score
from llmkit.checkpoints import default_model_path, load_model, load_tokenizer
from llmkit.generate.decode import generate_tokens
from llmkit.generate.sampling import SamplingSettings
from llmkit.peft.registry import load_adapter


def held_out_prompts(count: int, held_out: float, seed: int) -> list[str]:
    """The first `count` held-out HH-RLHF prompts of the split `llmkit reward train` / `llmkit dpo` make."""
    _, held = split_held_out(builtin_hh_rlhf(None), held_out, seed)
    return [pair.prompt for pair in held[:count]]


def sample_answers(model: torch.nn.Module, prompt_ids: list[list[int]], settings: SamplingSettings, max_new_tokens: int,
                   eos_id: int, batch_size: int) -> list[list[int]]:
    """One sampled answer (ids, EOS dropped) per prompt, in batches of `batch_size` left-padded prompts."""
    answers: list[list[int]] = []
    for start in range(0, len(prompt_ids), batch_size):
        rows = prompt_ids[start:start + batch_size]
        out: list[list[int]] = [[] for _ in rows]
        done = [False] * len(rows)
        for step in generate_tokens(model, rows, max_new_tokens, settings, stop_ids={eos_id}, pad_id=eos_id):
            for row, token in enumerate(step):
                if token is None or done[row]:
                    continue
                if token == eos_id:
                    done[row] = True
                else:
                    out[row].append(token)
        answers.extend(out)
    return answers


def win_rate(scores: list[float], base: list[float]) -> float:
    return sum(1.0 if a > b else 0.5 if a == b else 0.0 for a, b in zip(scores, base)) / len(base)


def weight_bytes(*models: torch.nn.Module) -> int:
    return sum(p.numel() * p.element_size() for model in models for p in model.parameters())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--reward", required=True, help="reward model directory (llmkit reward train's OUTPUT/reward_model)")
    parser.add_argument("--dpo", default=None, help="DPO policy adapter (llmkit dpo's OUTPUT/policy); omit to skip DPO")
    parser.add_argument("--prompts", type=int, default=48, help="held-out prompts")
    parser.add_argument("--n", type=int, default=4, help="answers best-of-n picks from")
    parser.add_argument("--max_new_tokens", type=int, default=48)
    parser.add_argument("--max_prompt_length", type=int, default=64, help="prompts keep their last this many tokens")
    parser.add_argument("--held_out", type=float, default=0.2, help="as given to reward train / dpo")
    parser.add_argument("--temperature", type=float, default=0.7)
    parser.add_argument("--top_p", type=float, default=0.9)
    parser.add_argument("--batch_size", type=int, default=8)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", default=None)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    path = default_model_path()
    tokenizer = load_tokenizer(path)
    prompts = held_out_prompts(args.prompts, args.held_out, args.seed)
    prompt_ids = [tokenizer.encode(prompt)[-args.max_prompt_length:] for prompt in prompts]
    prompt_texts = [tokenizer.decode(ids) for ids in prompt_ids]  # what the models saw, for the judge
    base = load_model(path, arch="decoder").eval()
    judge = load_reward_model(args.reward)

    def sampled(model: torch.nn.Module, seed: int) -> tuple[list[list[int]], list[float]]:
        settings = SamplingSettings(temperature=args.temperature, top_p=args.top_p, seed=seed)
        answers = sample_answers(model, prompt_ids, settings, args.max_new_tokens, tokenizer.eos_id, args.batch_size)
        texts = [prompt + tokenizer.decode(answer) for prompt, answer in zip(prompt_texts, answers)]
        return answers, score(judge, tokenizer, texts, batch_size=args.batch_size)

    rows: dict[str, dict] = {}
    samples: dict[str, list[str]] = {}
    started = time.perf_counter()
    answers, base_scores = sampled(base, args.seed)
    rows["base"] = {"seconds": time.perf_counter() - started, "scores": base_scores, "weights": weight_bytes(base)}
    samples["base"] = [tokenizer.decode(a) for a in answers[:3]]

    started = time.perf_counter()
    candidates = [sampled(base, args.seed + 1 + k) for k in range(args.n)]  # n x (answers, scores)
    best = [max(range(args.n), key=lambda k, i=i: candidates[k][1][i]) for i in range(len(prompts))]
    rows[f"best-of-{args.n}"] = {"seconds": time.perf_counter() - started,
                                 "scores": [candidates[k][1][i] for i, k in enumerate(best)],
                                 "weights": weight_bytes(base, judge)}
    samples[f"best-of-{args.n}"] = [tokenizer.decode(candidates[k][0][i]) for i, k in enumerate(best[:3])]

    if args.dpo:
        policy = load_adapter(load_model(path, arch="decoder"), args.dpo, tokenizer=tokenizer).eval()
        started = time.perf_counter()
        answers, dpo_scores = sampled(policy, args.seed)
        rows["dpo"] = {"seconds": time.perf_counter() - started, "scores": dpo_scores, "weights": weight_bytes(policy)}
        samples["dpo"] = [tokenizer.decode(a) for a in answers[:3]]

    print(f"{len(prompts)} held-out HH-RLHF prompts, {args.max_new_tokens} new tokens, temperature "
          f"{args.temperature}, top_p {args.top_p}, {args.threads} threads; judge: {args.reward}")
    print(f"{'method':<12} {'mean reward':>12} {'win vs base':>12} {'s / prompt':>11} {'weights MB':>11}")
    report = {"prompts": len(prompts), "settings": vars(args), "methods": {}}
    for name, row in rows.items():
        mean = sum(row["scores"]) / len(row["scores"])
        wins = win_rate(row["scores"], base_scores)
        per_prompt = row["seconds"] / len(prompts)
        print(f"{name:<12} {mean:>12.3f} {wins:>12.3f} {per_prompt:>11.2f} {row['weights'] / 1e6:>11.0f}")
        report["methods"][name] = {"mean_reward": mean, "win_rate_vs_base": wins, "seconds_per_prompt": per_prompt,
                                   "weight_bytes": row["weights"], "samples": samples[name]}
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=2) + "\n")


if __name__ == "__main__":
    main()
