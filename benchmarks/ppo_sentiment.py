"""PPO sentiment steering, the classic RLHF demo (issue 14): SmolLM2-135M-Instruct + LoRA continues the openings of
movie-review sentences and PPO pushes its continuations toward positive sentiment, judged by an SST-2 sentiment
reward model that llmkit trains first. Goal: mean reward up by >= 1.0 (logit units) over the reference policy at a
KL of <= 6 nats per sequence, as in the published GPT-2/IMDB runs (Ziegler et al. 2019; TRL's gpt2-sentiment).

    python benchmarks/ppo_sentiment.py                          # all stages, work in runs/ppo_sentiment
    python benchmarks/ppo_sentiment.py --ppo_steps 60 --json docs/ppo_sentiment.json --plot docs/ppo_sentiment.png
    python benchmarks/ppo_sentiment.py --quick                  # a minutes-long check of every stage

Stages (each is reused when its output already exists in --workdir, so an interrupted run goes on where it stopped):
1. Pairs: SST-2 training sentences of at least --min_words words (GLUE SST-2 in the shared data), a positive one
   paired with a negative one under a seed, with an empty prompt -> pairs.jsonl.
2. The sentiment reward model: `llmkit reward train` on those pairs (SmolLM2 backbone + LoRA + a scalar head,
   Bradley-Terry loss). Trained on (positive, negative) pairs, r(x) - r(y) is the log-odds that x reads more positive
   than y: the score is a sentiment logit up to a constant, which PPO never sees (advantages are differences).
   Reported on the SST-2 dev sentences (held out, never trained on): AUC (share of (positive, negative) pairs ranked
   right) and accuracy at a threshold fitted on unused training sentences (midpoint of the two class means).
3. PPO: `llmkit ppo` with that reward model on openings (first --prefix_words words) of SST-2 training sentences.
4. Evaluation on openings of SST-2 dev sentences (held out): the policy and the reference (the same base with the
   adapter disabled) each sample --eval_samples continuations per opening under the same seeds; mean reward of each,
   and the KL of the policy from the reference in nats per sequence, estimated on the policy's own samples as
   mean over samples of sum_t (log pi(y_t) - log pi_ref(y_t)) (unbiased for KL(pi || pi_ref)).
"""

from __future__ import annotations

import argparse
import csv
import dataclasses
import datetime
import json
import os
import random
import time
from contextlib import nullcontext
from pathlib import Path

import torch

from llmkit.align.rollout import sst2_prefixes
from llmkit.data.shared import shared_data_file
from llmkit.io import atomic_write_text

GOAL_REWARD_GAIN = 1.0  # logit units over the reference
GOAL_MAX_KL = 6.0  # nats per sequence
SST2_TRAIN, SST2_DEV = "sst2/train.tsv", "sst2/dev.tsv"


def sst2_sentences(split: str, min_words: int) -> list[tuple[str, int]]:
    """(sentence, label) of an SST-2 split with at least `min_words` words (the training split also holds phrases)."""
    with shared_data_file(split).open(encoding="utf-8", newline="") as file:
        rows = list(csv.DictReader(file, delimiter="\t", quoting=csv.QUOTE_NONE))
    return [(row["sentence"].strip(), int(row["label"])) for row in rows
            if len(row["sentence"].split()) >= min_words]


def write_pairs(path: Path, sentences: list[tuple[str, int]], n_pairs: int, seed: int) -> None:
    """n_pairs {"prompt": "", "chosen": positive, "rejected": negative} rows, drawn without replacement."""
    positives = [text for text, label in sentences if label == 1]
    negatives = [text for text, label in sentences if label == 0]
    rng = random.Random(seed)
    rng.shuffle(positives)
    rng.shuffle(negatives)
    rows = [{"prompt": "", "chosen": p, "rejected": n} for p, n in zip(positives[:n_pairs], negatives[:n_pairs])]
    atomic_write_text(path, "".join(json.dumps(row) + "\n" for row in rows))


def auc(positive: list[float], negative: list[float]) -> float:
    """Share of (positive, negative) pairs whose positive scores higher (a tie counts half)."""
    wins = sum((p > n) + 0.5 * (p == n) for p in positive for n in negative)
    return wins / (len(positive) * len(negative))


def classifier_report(reward_dir: Path, fit: list[tuple[str, int]], dev: list[tuple[str, int]]) -> dict:
    """The reward model as a sentiment classifier: dev AUC, and dev accuracy at the midpoint of the fit
    sentences' class means."""
    from llmkit.align.reward import load_reward_model, score
    from llmkit.checkpoints import load_tokenizer

    model, tokenizer = load_reward_model(reward_dir), load_tokenizer(reward_dir)
    fit_scores = score(model, tokenizer, [text for text, _ in fit], batch_size=16)
    dev_scores = score(model, tokenizer, [text for text, _ in dev], batch_size=16)

    def by_label(scores: list[float], rows: list[tuple[str, int]], label: int) -> list[float]:
        return [s for s, (_, y) in zip(scores, rows, strict=True) if y == label]

    threshold = (sum(by_label(fit_scores, fit, 1)) / max(1, len(by_label(fit_scores, fit, 1)))
                 + sum(by_label(fit_scores, fit, 0)) / max(1, len(by_label(fit_scores, fit, 0)))) / 2
    correct = sum((s > threshold) == (y == 1) for s, (_, y) in zip(dev_scores, dev, strict=True))
    return {"dev_sentences": len(dev), "dev_auc": auc(by_label(dev_scores, dev, 1), by_label(dev_scores, dev, 0)),
            "dev_accuracy": correct / len(dev), "threshold": threshold, "fit_sentences": len(fit),
            "dev_score_mean": sum(dev_scores) / len(dev),
            "dev_score_std": float(torch.tensor(dev_scores).std())}


@torch.no_grad()
def evaluate_policy(ppo_dir: Path, reward_dir: Path, prompts: list[str], samples: int, max_new_tokens: int,
                    seed: int) -> dict:
    """Mean reward of the policy and of the reference on the same prompts and seeds, and the policy's KL from the
    reference (nats per sequence) on its own samples."""
    from llmkit.align.ppo import response_logps_of
    from llmkit.align.reward import load_reward_model
    from llmkit.align.rollout import batch_tensors, reward_model_scorer, sample_responses
    from llmkit.align.runs import pad_id_of
    from llmkit.align.settings import PPOTrainSettings
    from llmkit.checkpoints import default_model_path, load_model, load_tokenizer
    from llmkit.generate.decode import tokenizer_stop_ids
    from llmkit.peft.lora import disable_adapters
    from llmkit.peft.registry import load_adapter

    path = default_model_path()
    tokenizer = load_tokenizer(path)
    policy = load_adapter(load_model(path, arch="decoder"), ppo_dir / "policy").eval()
    scorer = reward_model_scorer(load_reward_model(reward_dir), load_tokenizer(reward_dir), batch_size=16)
    stop_ids, pad_id = tokenizer_stop_ids(tokenizer), pad_id_of(tokenizer)
    sampling = PPOTrainSettings(max_new_tokens=max_new_tokens)  # temperature 1, no top-k/top-p: PPO's own sampling
    prompt_ids = [tokenizer.encode(prompt) for prompt in prompts]
    result: dict[str, list] = {"policy": [], "reference": [], "kl": [], "samples": []}
    for draw in range(samples):
        texts = {}
        for side in ("policy", "reference"):
            context = disable_adapters(policy) if side == "reference" else nullcontext()
            with context:
                response_ids, _ = sample_responses(policy, prompt_ids, stop_ids, pad_id, sampling, seed + draw)
            texts[side] = [tokenizer.decode([t for t in ids if t not in stop_ids]) for ids in response_ids]
            result[side] += scorer(prompts, texts[side])
            if side == "policy":
                input_ids, attention, mask, prompt_len = batch_tensors(prompt_ids, response_ids, pad_id,
                                                                       torch.device("cpu"))
                logps = response_logps_of(policy, input_ids, attention, prompt_len)
                with disable_adapters(policy):
                    ref_logps = response_logps_of(policy, input_ids, attention, prompt_len)
                result["kl"] += ((logps - ref_logps) * mask).sum(dim=1).tolist()
        if draw == 0:
            result["samples"] = [{"prompt": p, "reference": r, "policy": q}
                                 for p, r, q in zip(prompts, texts["reference"], texts["policy"])][:12]
    mean = {key: sum(result[key]) / len(result[key]) for key in ("policy", "reference", "kl")}
    return {"prompts": len(prompts), "samples_per_prompt": samples, "reward_reference": mean["reference"],
            "reward_policy": mean["policy"], "reward_gain": mean["policy"] - mean["reference"],
            "kl_nats_per_sequence": mean["kl"], "samples": result["samples"]}


def plot(metrics_file: Path, evaluation: dict, output: Path) -> None:
    """Reward and KL per PPO step, with the held-out evaluation's reference and policy means marked."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [json.loads(line) for line in metrics_file.read_text().splitlines() if line.strip()]
    rows = [row for row in rows if row.get("kind") == "train"]
    steps = [row["step"] for row in rows]
    figure, (left, right) = plt.subplots(1, 2, figsize=(11, 4))
    left.plot(steps, [row["reward"] for row in rows], label="rollout mean reward")
    left.axhline(evaluation["reward_reference"], color="grey", linestyle="--", label="reference (held-out eval)")
    left.axhline(evaluation["reward_policy"], color="green", linestyle="--", label="policy (held-out eval)")
    left.set_xlabel("PPO step")
    left.set_ylabel("sentiment reward (logit units)")
    left.legend()
    right.plot(steps, [row["kl"] for row in rows], color="tab:red", label="KL (rollout, nats/sequence)")
    right.axhline(GOAL_MAX_KL, color="black", linestyle=":", label=f"goal bound {GOAL_MAX_KL:g}")
    right.set_xlabel("PPO step")
    right.legend()
    figure.suptitle("PPO sentiment steering: SmolLM2-135M-Instruct + LoRA, SST-2 reward model")
    figure.tight_layout()
    output.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(output, dpi=110)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workdir", default="runs/ppo_sentiment")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--min_words", type=int, default=6, help="shortest SST-2 sentence used for the reward model")
    parser.add_argument("--pairs", type=int, default=1200, help="(positive, negative) training pairs")
    parser.add_argument("--rm_steps", type=int, default=150)
    parser.add_argument("--rm_batch", type=int, default=8, help="pairs per reward-model step")
    parser.add_argument("--prefix_words", type=int, default=5)
    parser.add_argument("--ppo_steps", type=int, default=40)
    parser.add_argument("--rollout_batch", type=int, default=16)
    parser.add_argument("--max_new_tokens", type=int, default=16)
    parser.add_argument("--ppo_lr", type=float, default=2e-4)
    parser.add_argument("--kl_coef", type=float, default=0.05)
    parser.add_argument("--target_kl", type=float, default=None, help="adaptive KL controller's target (nats/seq)")
    parser.add_argument("--kl_horizon", type=int, default=10000)
    parser.add_argument("--dev_sentences", type=int, default=None, help="classifier check on the first N dev "
                        "sentences (default: all 872)")
    parser.add_argument("--eval_prompts", type=int, default=64)
    parser.add_argument("--eval_samples", type=int, default=2)
    parser.add_argument("--json", default=None)
    parser.add_argument("--plot", default=None)
    parser.add_argument("--quick", action="store_true", help="tiny stages, a check that everything runs")
    args = parser.parse_args()
    if args.quick:
        args.pairs, args.rm_steps, args.ppo_steps, args.rollout_batch = 64, 4, 2, 4
        args.eval_prompts, args.eval_samples, args.max_new_tokens, args.dev_sentences = 4, 1, 8, 32
    torch.set_num_threads(args.threads)
    os.environ.setdefault("MPLBACKEND", "Agg")
    work = Path(args.workdir)
    work.mkdir(parents=True, exist_ok=True)
    timings: dict[str, float] = {}

    train_sentences = sst2_sentences(SST2_TRAIN, args.min_words)
    dev = sst2_sentences(SST2_DEV, 1)[:args.dev_sentences]  # dev holds whole sentences only
    pairs_file = work / "pairs.jsonl"
    if not pairs_file.exists():
        write_pairs(pairs_file, train_sentences, args.pairs, args.seed)
    used = {json.loads(line)[key] for line in pairs_file.read_text().splitlines() for key in ("chosen", "rejected")}
    unused = [row for row in train_sentences if row[0] not in used]
    per_class = 100 if args.dev_sentences is None else max(4, args.dev_sentences // 2)
    fit = [row for row in unused if row[1] == 1][:per_class] + [row for row in unused if row[1] == 0][:per_class]

    reward_dir = work / "reward" / "reward_model"
    start = time.perf_counter()
    if not (reward_dir / "reward_model.json").exists():
        from llmkit.commands.reward import REWARD_DEFAULTS, reward_train

        settings = dataclasses.replace(REWARD_DEFAULTS, max_steps=args.rm_steps, batch_size=args.rm_batch,
                                       warmup_steps=min(10, args.rm_steps), log_every=10, seed=args.seed)
        reward_train(data=[str(pairs_file)], limit=None, held_out=0.1, max_length=64, max_prompt_length=8,
                     train=settings, output=str(work / "reward"))
    timings["reward_model_s"] = time.perf_counter() - start
    classifier = classifier_report(reward_dir, fit, dev)
    print(f"sentiment reward model: dev AUC {classifier['dev_auc']:.3f}, dev accuracy {classifier['dev_accuracy']:.3f}"
          f" on {classifier['dev_sentences']} SST-2 dev sentences", flush=True)

    ppo_dir = work / "ppo"
    start = time.perf_counter()
    if not (ppo_dir / "summary.json").exists():
        from llmkit.align.settings import PPOTrainSettings
        from llmkit.commands.ppo import ppo

        prompts_file = work / "prompts.jsonl"
        prompts = sst2_prefixes(10_000, args.prefix_words, SST2_TRAIN)
        atomic_write_text(prompts_file, "".join(json.dumps({"prompt": p}) + "\n" for p in prompts))
        train = PPOTrainSettings(steps=args.ppo_steps, rollout_batch=args.rollout_batch, lr=args.ppo_lr,
                                 max_new_tokens=args.max_new_tokens, seed=args.seed)
        ppo(reward=str(reward_dir), prompts=[str(prompts_file)], kl_coef=args.kl_coef, target_kl=args.target_kl,
            kl_horizon=args.kl_horizon, limit=None, train=train, output=str(ppo_dir))
    timings["ppo_s"] = time.perf_counter() - start

    start = time.perf_counter()
    evaluation = evaluate_policy(ppo_dir, reward_dir, sst2_prefixes(args.eval_prompts, args.prefix_words, SST2_DEV),
                                 args.eval_samples, args.max_new_tokens, args.seed + 1000)
    timings["evaluation_s"] = time.perf_counter() - start
    met = evaluation["reward_gain"] >= GOAL_REWARD_GAIN and evaluation["kl_nats_per_sequence"] <= GOAL_MAX_KL
    print("\n| | reference | PPO policy | gain | KL (nats/seq) | goal |\n| --- | --- | --- | --- | --- | --- |")
    print(f"| mean sentiment reward | {evaluation['reward_reference']:+.3f} | {evaluation['reward_policy']:+.3f} | "
          f"{evaluation['reward_gain']:+.3f} | {evaluation['kl_nats_per_sequence']:.2f} | gain >= "
          f"{GOAL_REWARD_GAIN:g} at KL <= {GOAL_MAX_KL:g}: {'met' if met else 'NOT met'} |")
    for sample in evaluation["samples"][:6]:
        print(f"- {sample['prompt']!r}\n    reference: {sample['reference']!r}\n    policy:    {sample['policy']!r}")
    report = {"date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="minutes"),
              "load_average": os.getloadavg(), "threads": args.threads, "settings": vars(args),
              "classifier": classifier, "ppo": json.loads((ppo_dir / "summary.json").read_text()),
              "evaluation": evaluation, "goal_met": met, "timings_s": timings}
    if args.json:
        atomic_write_text(Path(args.json), json.dumps(report, indent=2) + "\n")
    if args.plot:
        plot(ppo_dir / "metrics.jsonl", evaluation, Path(args.plot))


if __name__ == "__main__":
    main()
