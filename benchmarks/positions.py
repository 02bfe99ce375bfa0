"""Length extrapolation: train the same small model with learned positions, RoPE and ALiBi at a short context,
then measure validation perplexity at longer contexts than it was trained on.

    python benchmarks/positions.py                       # 400 steps each at context 128 on Tiny Shakespeare
    python benchmarks/positions.py --steps 800 --plot docs/positions.png --json docs/positions.json

The ALiBi paper (Press et al., 2022) claims ALiBi extrapolates and the others do not. Each model is the
`mini` preset (3.4M parameters) with only `position` changed, the same seed, data order and optimizer.
Learned positions get a table as long as the longest evaluation; rows past the training context are never
trained, which is exactly why learned positions cannot extrapolate.
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from llmkit.commands.prepare import prepare_data
from llmkit.config import Config
from llmkit.data.prepare import load_manifest
from llmkit.data.shards import SequenceStream, TokenShards
from llmkit.models.decoder import Decoder
from llmkit.train.loop import TrainSettings, train
from llmkit.train.objectives import causal_lm_batch, causal_lm_loss, token_cross_entropy

POSITIONS = ("learned", "rope", "alibi")


def train_model(position: str, data_dir: Path, run_dir: Path, args: argparse.Namespace) -> tuple[Decoder, float]:
    manifest = load_manifest(data_dir)
    config = Config.from_name("mini", position=position, max_seq_len=max(args.eval_lens), vocab_size=manifest["vocab_size"],
                              eos_id=manifest["eos_id"])
    torch.manual_seed(0)
    model = Decoder(config)
    stream = SequenceStream(TokenShards(data_dir, "train"), args.train_len, seed=0)
    settings = TrainSettings(max_steps=args.steps, batch_size=16, lr=2e-3, warmup_steps=max(1, args.steps // 10),
                             eval_every=0, checkpoint_every=args.steps, log_every=50, seed=0)
    started = time.perf_counter()
    train(model, causal_lm_loss, lambda p, b, r, w: causal_lm_batch(stream.batch(p, b, r, w)), settings, run_dir)
    return model.eval(), time.perf_counter() - started


@torch.no_grad()
def validation_perplexity(model: Decoder, tokens: np.ndarray, length: int, batch_size: int = 4) -> float:
    """Perplexity over non-overlapping windows of `length` tokens (every token scored with up to `length` context)."""
    n_windows = (len(tokens) - 1) // length
    windows = torch.from_numpy(tokens[: n_windows * length + 1].astype(np.int64))
    total, count = 0.0, 0
    for start in range(0, n_windows, batch_size):
        rows = [windows[i * length: i * length + length + 1] for i in range(start, min(n_windows, start + batch_size))]
        batch = causal_lm_batch(torch.stack(rows))
        loss = token_cross_entropy(model(batch["input_ids"]), batch["labels"])
        total += loss.item() * len(rows)
        count += len(rows)
    return math.exp(total / count)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=400)
    parser.add_argument("--train_len", type=int, default=128)
    parser.add_argument("--eval_lens", type=lambda text: [int(x) for x in text.split(",")], default=[128, 256, 512, 1024])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--plot", type=Path, default=None)
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    work = Path(tempfile.mkdtemp(prefix="llmkit-positions-"))
    prepare_data(output=str(work / "data"), vocab_size=2048, progress=False)
    validation = TokenShards(work / "data", "val").read(0, len(TokenShards(work / "data", "val")))
    results = {}
    for position in POSITIONS:
        model, seconds = train_model(position, work / "data", work / position, args)
        results[position] = {"train_seconds": seconds,
                             "perplexity": {length: validation_perplexity(model, validation, length)
                                            for length in args.eval_lens}}

    print(f"\nvalidation perplexity, trained at context {args.train_len} for {args.steps} steps "
          f"({platform.processor() or platform.machine()}, {args.threads} threads, {time.strftime('%Y-%m-%d')})")
    header = "| position | " + " | ".join(f"ctx {length}" for length in args.eval_lens) + " | ratio last/first |"
    print(header + "\n|" + " --- |" * (len(args.eval_lens) + 2))
    for position, result in results.items():
        values = [result["perplexity"][length] for length in args.eval_lens]
        cells = " | ".join(f"{value:,.1f}" for value in values)
        print(f"| {position} | {cells} | {values[-1] / values[0]:.2f}x |")
    if args.json:
        args.json.write_text(json.dumps({"train_len": args.train_len, "steps": args.steps, "results": results}, indent=2))
    if args.plot:
        plot(results, args)


def plot(results: dict, args: argparse.Namespace) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(figsize=(6.5, 4))
    for position, result in results.items():
        axes.plot(args.eval_lens, [result["perplexity"][length] for length in args.eval_lens], "o-", label=position)
    axes.axvline(args.train_len, color="grey", linestyle=":", label="training context")
    axes.set_xscale("log", base=2)
    axes.set_yscale("log")
    axes.set_xlabel("evaluation context (tokens)")
    axes.set_ylabel("validation perplexity")
    axes.set_title(f"Length extrapolation (trained at {args.train_len} tokens)")
    axes.grid(alpha=0.3)
    axes.legend()
    figure.tight_layout()
    figure.savefig(args.plot, dpi=110)
    print(f"plot: {args.plot}")


if __name__ == "__main__":
    main()
