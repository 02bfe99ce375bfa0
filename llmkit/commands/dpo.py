"""`llmkit dpo`: direct preference optimisation (and its family of losses) of a policy on preference pairs, through
the one training loop; reference log-probs are computed once, before training."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from llmkit.align.settings import AlignMethod, DPOSettings, PreferenceLoss
from llmkit.commands.common import as_paths
from llmkit.peft.settings import LoraSettings
from llmkit.train.settings import TrainSettings, check_settings

POLICY_DIR = "policy"
SUMMARY_FILE = "summary.json"
PLOT_FILE = "dpo.png"
PLOTTED = ["loss", "rewards/margins", "rewards/accuracies", "rewards/chosen", "rewards/rejected"]
# A few minutes on 2 idle CPU cores with SmolLM2-135M, LoRA and HH-RLHF pairs cut to 128 tokens.
DPO_DEFAULTS = TrainSettings(max_steps=20, batch_size=2, lr=5e-4, warmup_steps=3, eval_every=0, eval_batches=5,
                             checkpoint_every=1000, log_every=2, weight_decay=0.0, schedule="constant")


def dpo(
    model: str | None = None,
    data: list[str] | str | None = None,
    loss: PreferenceLoss = "sigmoid",
    beta: float = 0.1,
    label_smoothing: float = 0.0,
    simpo_gamma: float = 0.5,
    discopop_tau: float = 0.05,
    method: AlignMethod = "lora",
    lora: LoraSettings = LoraSettings(),  # noqa: B008 (frozen defaults: --lora.rank 16)
    limit: int | None = 60,
    held_out: float = 0.2,
    max_length: int = 128,
    max_prompt_length: int = 64,
    skip_bad_rows: bool = False,
    train: TrainSettings = DPO_DEFAULTS,
    output: str = "runs/dpo",
) -> dict[str, Any]:
    """Align a policy to preference pairs with DPO or one of its variants (no reward model, no sampling).

    Example: llmkit dpo                                    (SmolLM2-135M-Instruct + LoRA on HH-RLHF pairs)
             llmkit dpo --model my_model/ --data pairs.jsonl --loss ipo --beta 0.1 --output runs/ipo
             llmkit dpo --loss simpo --beta 2.0 --simpo_gamma 0.5          (reference-free)
             llmkit dpo --method full --train.lr 5e-7 --train.max_steps 200
             llmkit chat --adapter runs/dpo/policy

    Rows are {"prompt", "chosen", "rejected"} or whole {"chosen", "rejected"} transcripts. The reference is the
    model before training: its log-probs of every pair are computed once and cached (with --method lora, as the
    base with the adapter disabled: one model in memory). Logs rewards/chosen, rewards/rejected, rewards/margins
    and rewards/accuracies as TRL does, on the training batches and once on the held-out pairs at the end.
    Writes OUTPUT/policy/ (the LoRA adapter, or the whole model with --method full), summary.json, metrics.jsonl,
    checkpoints and OUTPUT/dpo.png.

    Args:
        model: .gguf file, Hugging Face directory or llmkit directory (default: SmolLM2-135M-Instruct).
        data: JSONL files of preference pairs (default: Anthropic HH-RLHF harmless-base).
        loss: sigmoid (DPO), conservative, robust, hinge (SLiC), ipo, sigmoid_norm, exo_pair, nca_pair, bco_pair,
            sppo_hard, aot, aot_unpaired, apo_zero, apo_down, discopop, simpo (reference-free).
        beta: the implicit reward's scale (IPO's tau; SimPO's beta, about 2).
        label_smoothing: share of labels assumed flipped (conservative, robust, exo_pair, aot, simpo).
        simpo_gamma: SimPO's target margin.
        discopop_tau: DiscoPOP's temperature.
        method: lora (adapters on a frozen base) or full (every parameter).
        lora: --method lora: rank, alpha, dropout, targets, ...
        limit: use at most this many pairs (null: all).
        held_out: share of the pairs held out for the final metrics.
        max_length: longest prompt + response in tokens (rules in llmkit.align.preference).
        max_prompt_length: prompts keep their last this many tokens.
        skip_bad_rows: skip malformed rows (counted) instead of stopping at the first.
        train: the training loop's settings.
        output: run directory.
    """
    import torch

    from llmkit.align.dpo import cache_reference_logps, dpo_objective, preference_metrics
    from llmkit.align.preference import PairBatches, held_out_batches
    from llmkit.align.runs import plot_metrics, start_preference_run, write_summary
    from llmkit.checkpoints import save_model
    from llmkit.peft.core import save_adapter
    from llmkit.train.loop import train as train_loop
    from llmkit.train.metrics import METRICS_FILE

    settings = DPOSettings(loss, beta, label_smoothing, simpo_gamma, discopop_tau)
    check_settings(train)
    run = start_preference_run(model, as_paths(data), limit, held_out, train.seed, max_length, max_prompt_length,
                               skip_bad_rows, method, lora)
    path, tokenizer, pairs, pad_id, policy = run.path, run.tokenizer, run.pairs, run.pad_id, run.network
    if not settings.reference_free:
        print(f"reference log-probs of {len(pairs.train) + len(pairs.held_out):,} pairs (computed once)")
        cache_reference_logps(policy, pairs.train + pairs.held_out, pad_id, batch_size=train.batch_size)
    evals = held_out_batches(pairs.held_out, train.batch_size, pad_id)

    def on_eval(trained: torch.nn.Module, step: int) -> dict[str, float]:
        return preference_metrics(trained, evals[:train.eval_batches], settings)

    result = train_loop(policy, dpo_objective(settings), PairBatches(pairs.train, pad_id, seed=train.seed), train,
                        output, eval_batches=lambda: evals, on_eval=on_eval, tokenizer=tokenizer)
    held = preference_metrics(policy, evals, settings)
    print(f"held-out ({len(pairs.held_out)} pairs): rewards/accuracies {held['rewards/accuracies']:.3f}, "
          f"rewards/margins {held['rewards/margins']:+.4f}, loss {held['loss']:.4f}")
    policy_dir = Path(output) / POLICY_DIR
    if method == "lora":
        save_adapter(policy, policy_dir, "lora", lora)
    else:
        save_model(policy, policy_dir, tokenizer=tokenizer)
    plot = plot_metrics(Path(output) / METRICS_FILE, PLOTTED, Path(output) / PLOT_FILE,
                        f"{loss} on {path.name} (beta {beta})")
    summary = {"model": str(path), "loss": loss, "beta": beta, "method": method, "steps": result.steps,
               "train_loss": result.train_loss, "held_out": held, "policy": str(policy_dir),
               "plot": str(plot) if plot else None}
    write_summary(Path(output) / SUMMARY_FILE, summary)
    print(f"policy: {policy_dir}" + (f"  (llmkit chat --model {path} --adapter {policy_dir})" if method == "lora" else ""))
    return summary
