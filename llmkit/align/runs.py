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


@dataclass
class PreferenceRun:
    """What a preference recipe (reward train, dpo) starts from: the model's path, its tokenizer, the tokenized pairs,
    the pad id and the network with its training method applied."""

    path: Path
    tokenizer: Tokenizer
    pairs: PreferenceData
    pad_id: int
    network: nn.Module


def start_preference_run(
    model: str | None, data: Sequence[str], limit: int | None, held_out: float, seed: int, max_length: int,
    max_prompt_length: int, skip_bad_rows: bool, method: AlignMethod, lora: LoraSettings,
) -> PreferenceRun:
    """Load the tokenizer of `model` (default SmolLM2-135M-Instruct), read and split the pairs (printing how many),
    seed torch, load the decoder and apply LoRA or full training."""
    import torch

    from llmkit.checkpoints import default_model_path, load_model, load_tokenizer

    path = Path(model) if model else default_model_path()
    tokenizer = load_tokenizer(path)
    pairs = preference_data(data, tokenizer, limit, held_out, seed, max_length, max_prompt_length, skip_bad_rows)
    print(f"{len(pairs.train):,} training pairs, {len(pairs.held_out):,} held out; {pairs.report.summary()}")
    torch.manual_seed(seed)
    network = apply_training_method(load_model(path, arch="decoder"), method, lora)
    return PreferenceRun(path, tokenizer, pairs, pad_id_of(tokenizer), network)


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
