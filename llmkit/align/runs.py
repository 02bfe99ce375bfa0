"""What the reward-model and DPO recipes share: preference data in (file or built-in HH-RLHF, split, tokenized),
the training method applied (LoRA or full), and the metrics PNG out."""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from torch import nn

from llmkit.align.preference import (
    PairReport,
    TokenizedPair,
    builtin_hh_rlhf,
    load_pairs,
    split_held_out,
    tokenize_pairs,
)
from llmkit.align.settings import ALIGN_METHODS, AlignMethod
from llmkit.errors import LlmkitError
from llmkit.io import atomic_write, atomic_write_text
from llmkit.peft.settings import LoraSettings
from llmkit.tokenizer import Tokenizer


@dataclass
class PreferenceData:
    train: list[TokenizedPair]
    held_out: list[TokenizedPair]
    report: PairReport


def preference_data(
    data: Sequence[str], tokenizer: Tokenizer, limit: int | None, held_out: float, seed: int, max_length: int,
    max_prompt_length: int, skip_bad_rows: bool = False,
) -> PreferenceData:
    """Pairs from the JSONL files `data` (or, with none, HH-RLHF harmless-base), split with a seeded shuffle into
    training and held-out pairs, and tokenized."""
    if limit is not None and limit < 2:
        raise LlmkitError(f"--limit {limit} must be at least 2 (pairs to train and hold out); --limit null uses all")
    if data:
        pairs, report = load_pairs(list(data), limit=limit, skip_bad_rows=skip_bad_rows)
    else:
        pairs, report = builtin_hh_rlhf(limit), PairReport()
        report.rows = len(pairs)
    train_pairs, held_pairs = split_held_out(pairs, held_out, seed)
    train_ids, report = tokenize_pairs(train_pairs, tokenizer, max_length, max_prompt_length, report)
    held_ids, report = tokenize_pairs(held_pairs, tokenizer, max_length, max_prompt_length, report)
    return PreferenceData(train_ids, held_ids, report)


def pad_id_of(tokenizer: Tokenizer) -> int:
    """The pad id batches are filled with (the attention mask, not this id, says what is real; SmolLM2's is EOS)."""
    for token_id in (tokenizer.pad_id, tokenizer.eos_id):
        if token_id is not None:
            return token_id
    return 0


def apply_training_method(network: nn.Module, method: AlignMethod, lora: LoraSettings) -> nn.Module:
    """LoRA adapters on a frozen base, or every parameter trained (full)."""
    from llmkit.peft.core import unfreeze
    from llmkit.peft.registry import apply_method

    if method not in ALIGN_METHODS:
        raise LlmkitError(f"--method {method} is not one of {', '.join(ALIGN_METHODS)}")
    if method == "lora":
        return apply_method(network, "lora", lora)
    unfreeze(network)
    return network


def plot_metrics(metrics_file: Path, keys: Sequence[str], path: Path, title: str) -> Path | None:
    """One panel per key: its training rows (per logged step) and its held-out rows ("eval" rows) against steps."""
    rows = [json.loads(line) for line in Path(metrics_file).read_text().splitlines() if line.strip()]
    panels = [key for key in keys if any(key in row for row in rows)]
    if not panels:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(1, len(panels), figsize=(3.6 * len(panels), 3.2), squeeze=False)
    for axis, key in zip(axes[0], panels, strict=True):
        for kind, style in (("train", "-"), ("eval", "o-")):
            points = [(row["step"], row[key]) for row in rows if row.get("kind") == kind and key in row]
            if points:
                axis.plot(*zip(*points), style, label="held-out" if kind == "eval" else kind, linewidth=1,
                          markersize=4)
        axis.set_title(key, fontsize=9)
        axis.set_xlabel("step")
        axis.grid(alpha=0.3)
        axis.legend(fontsize=7)
    figure.suptitle(title, fontsize=10)
    figure.tight_layout()
    atomic_write(path, lambda tmp: figure.savefig(tmp, dpi=100, format="png"))
    plt.close(figure)
    return path


def write_summary(path: Path, summary: dict) -> None:
    atomic_write_text(path, json.dumps(summary, indent=2) + "\n")
