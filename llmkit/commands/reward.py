"""`llmkit reward train` and `llmkit reward score`: a reward model (decoder backbone + scalar head, Bradley-Terry
loss) trained on preference pairs through the one training loop, and the scores it gives."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from llmkit.align.settings import AlignMethod
from llmkit.commands.common import as_paths
from llmkit.errors import LlmkitError
from llmkit.peft.settings import LoraSettings
from llmkit.train.settings import TrainSettings, check_settings

REWARD_MODEL_DIR = "reward_model"
SUMMARY_FILE = "summary.json"
PLOT_FILE = "reward.png"
DEFAULT_RUN = "runs/reward"
# A few minutes on 2 idle CPU cores with SmolLM2-135M and HH-RLHF pairs cut to 128 tokens.
REWARD_DEFAULTS = TrainSettings(max_steps=30, batch_size=4, lr=1e-4, warmup_steps=4, eval_every=0, eval_batches=5,
                                checkpoint_every=1000, log_every=2, weight_decay=0.0, schedule="constant")


def reward_train(
    model: str | None = None,
    data: list[str] | str | None = None,
    method: AlignMethod = "lora",
    lora: LoraSettings = LoraSettings(),  # noqa: B008 (frozen defaults: --lora.rank 16)
    margin: float = 0.0,
    limit: int | None = 300,
    held_out: float = 0.2,
    max_length: int = 128,
    max_prompt_length: int = 64,
    skip_bad_rows: bool = False,
    train: TrainSettings = REWARD_DEFAULTS,
    output: str = DEFAULT_RUN,
) -> dict[str, Any]:
    """Train a reward model on preference pairs: a decoder backbone plus a scalar head read at the last real token.

    Example: llmkit reward train                            (SmolLM2-135M-Instruct + LoRA on HH-RLHF pairs)
             llmkit reward train --model my_model/ --data pairs.jsonl --margin 0.5 --output runs/rm
             llmkit reward train --method full --train.max_steps 200 --train.lr 1e-5
             llmkit reward score --model runs/reward/reward_model --data texts.jsonl

    Rows are {"prompt", "chosen", "rejected"} or whole {"chosen", "rejected"} transcripts, split at their common
    prefix up to its last "Assistant:". Loss: -log sigmoid(r_chosen - r_rejected - margin). A seeded share of the
    pairs (--held_out) is kept out of training; their pairwise accuracy (a tie counts half) is printed and saved.
    Writes OUTPUT/reward_model/ (the backbone with LoRA merged, reward_head.safetensors, reward_model.json),
    OUTPUT/summary.json, metrics.jsonl, checkpoints and OUTPUT/reward.png (loss, accuracy, margin per step).

    Args:
        model: .gguf file, Hugging Face directory or llmkit directory of the backbone (default: SmolLM2-135M-Instruct).
        data: JSONL files of preference pairs (default: Anthropic HH-RLHF harmless-base, 2,312 pairs).
        method: lora (adapters on a frozen backbone, plus the head) or full (every parameter).
        lora: --method lora: rank, alpha, dropout, targets, ...
        margin: a constant margin the chosen reward must exceed the rejected one by (0: plain Bradley-Terry).
        limit: use at most this many pairs (null: all).
        held_out: share of the pairs held out to measure accuracy.
        max_length: longest prompt + response in tokens (rules in llmkit.align.preference).
        max_prompt_length: prompts keep their last this many tokens.
        skip_bad_rows: skip malformed rows (counted) instead of stopping at the first.
        train: the training loop's settings.
        output: run directory.
    """
    import torch

    from llmkit.align.preference import PairBatches, held_out_batches
    from llmkit.align.reward import RewardModel, pairwise_accuracy, reward_objective, save_reward_model
    from llmkit.align.runs import plot_metrics, start_preference_run, write_summary
    from llmkit.train.loop import train as train_loop
    from llmkit.train.metrics import METRICS_FILE

    check_settings(train)
    run = start_preference_run(model, as_paths(data), limit, held_out, train.seed, max_length, max_prompt_length,
                               skip_bad_rows, method, lora)
    path, tokenizer, pairs, pad_id, network = run.path, run.tokenizer, run.pairs, run.pad_id, run.network
    reward_model = RewardModel(network)
    evals = held_out_batches(pairs.held_out, train.batch_size, pad_id)

    def on_eval(trained: torch.nn.Module, step: int) -> dict[str, float]:
        return {key: value for key, value in pairwise_accuracy(trained, evals[:train.eval_batches]).items()
                if key in ("accuracy", "margin")}

    result = train_loop(reward_model, reward_objective(margin), PairBatches(pairs.train, pad_id, seed=train.seed),
                        train, output, eval_batches=lambda: evals, on_eval=on_eval, tokenizer=tokenizer)
    held = pairwise_accuracy(reward_model, evals)
    print(f"held-out pairwise accuracy {held['accuracy']:.3f} on {held['pairs']} pairs (chance 0.5), mean margin "
          f"{held['margin']:+.3f}")
    saved = save_reward_model(reward_model, Path(output) / REWARD_MODEL_DIR, tokenizer,
                              extra={"held_out_accuracy": held["accuracy"], "held_out_pairs": held["pairs"]})
    plot = plot_metrics(Path(output) / METRICS_FILE, ["loss", "accuracy", "margin"], Path(output) / PLOT_FILE,
                        f"reward model on {path.name}: Bradley-Terry loss")
    summary = {"model": str(path), "method": method, "steps": result.steps, "train_loss": result.train_loss,
               "held_out": held, "reward_model": str(saved), "plot": str(plot) if plot else None}
    write_summary(Path(output) / SUMMARY_FILE, summary)
    print(f"reward model: {saved}  (llmkit reward score --model {saved} --data FILE)")
    return summary


def reward_score(
    model: str | None = None,
    data: str | None = None,
    field: str = "text",
    limit: int | None = 20,
    batch_size: int = 8,
) -> dict[str, Any]:
    """Score texts, or preference pairs, with a trained reward model.

    Example: llmkit reward score                              (runs/reward/reward_model on 20 HH-RLHF pairs)
             llmkit reward score --model runs/rm/reward_model --data texts.jsonl --field text
             llmkit reward score --model runs/rm/reward_model --data pairs.jsonl --limit null

    A JSONL row with `chosen` and `rejected` is a pair: both are scored (prompt + response as one text) and the
    pairwise accuracy printed; any other row is scored by its FIELD text.

    Args:
        model: a reward model directory written by `llmkit reward train` (default: runs/reward/reward_model).
        data: a JSONL file (default: the first LIMIT pairs of HH-RLHF harmless-base).
        field: the field holding the text of rows that are not pairs.
        limit: score at most this many rows (null: all).
        batch_size: texts per forward pass.
    """
    from llmkit.align.preference import builtin_hh_rlhf, parse_pair
    from llmkit.align.reward import load_reward_model, score
    from llmkit.checkpoints import load_tokenizer
    from llmkit.data.jsonl import parse_object, read_lines

    path = Path(model) if model else Path(DEFAULT_RUN) / REWARD_MODEL_DIR
    if model is None and not path.is_dir():
        raise LlmkitError(f"no --model given and {path} does not exist; train one first with `llmkit reward train`")
    if limit is not None and limit < 1:
        raise LlmkitError(f"--limit {limit} must be at least 1 (null scores every row)")
    reward_model, tokenizer = load_reward_model(path), load_tokenizer(path)
    rows: list[Any] = []
    if data is None:
        rows = builtin_hh_rlhf(limit)
    else:
        for number, line in read_lines(data):
            if limit is not None and len(rows) >= limit:
                break
            origin = f"{data}, line {number}"
            row = parse_object(line, origin)
            rows.append(parse_pair(row, origin) if "chosen" in row or "rejected" in row else
                        parse_object(line, origin, [field], "pass --field with the field that holds the text"))
    pairs = [row for row in rows if not isinstance(row, dict)]
    texts = [row[field] for row in rows if isinstance(row, dict)]
    result: dict[str, Any] = {"model": str(path)}
    if texts:
        result["scores"] = score(reward_model, tokenizer, texts, batch_size)
        for text, value in zip(texts, result["scores"], strict=True):
            print(f"{value:+8.3f}  {text[:100]!r}")
    if pairs:
        chosen = score(reward_model, tokenizer, [pair.prompt + pair.chosen for pair in pairs], batch_size)
        rejected = score(reward_model, tokenizer, [pair.prompt + pair.rejected for pair in pairs], batch_size)
        wins = sum(1.0 if c > r else 0.5 if c == r else 0.0 for c, r in zip(chosen, rejected, strict=True))
        result.update(chosen=chosen, rejected=rejected, accuracy=wins / len(pairs))
        for c, r in zip(chosen, rejected, strict=True):
            print(f"chosen {c:+8.3f}  rejected {r:+8.3f}  {'ok' if c > r else 'WRONG'}")
        print(f"pairwise accuracy {result['accuracy']:.3f} on {len(pairs)} pairs")
    return result
