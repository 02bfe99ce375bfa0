"""Attention vs Hyena vs RetNet vs Mamba at one parameter budget: validation loss on Tiny Shakespeare, then decoding
speed and cache memory against the context length.

    python benchmarks/mixers.py                                  # 200 steps each, contexts 512..8192
    python benchmarks/mixers.py --steps 60 --batch_size 8 --seq_len 64 --ssm_state_dim 8 --plot docs/mixers \
        --json docs/mixers.json                                  # what docs/mixers.md ran (2 loaded cores)

Every model is the `mini` preset (d_model 256, 4 layers, 8 heads, tied 2,048-token BPE vocabulary) with only
`mixer` changed and its FFN width (d_ff) set so the total parameter count matches attention's within ~1%; same seed,
same data order (batch x seq_len tokens per step), same optimizer and schedule. Decoding: a prompt of L tokens of validation
text is prefilled, then `--decode_tokens` greedy tokens are timed one forward each (median tokens/s of the rounds);
memory is what the cache holds after them (attention: its keys and values, preallocated for L + new tokens; the
others: their mixer states).
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from llmkit.commands.prepare import prepare_data
from llmkit.config import Config
from llmkit.data.prepare import load_manifest
from llmkit.data.shards import SequenceStream, TokenShards, validation_batches
from llmkit.models.decoder import Decoder
from llmkit.nn.mixers import MixerCache
from llmkit.train.loop import TrainSettings, train
from llmkit.train.objectives import causal_lm_batch, causal_lm_loss

MIXERS = ("attention", "hyena", "retnet", "mamba")


def matched_config(mixer: str, budget: int | None, **fields) -> Config:  # noqa: ANN003
    """The `mini` preset with `mixer`, its d_ff chosen (a multiple of 8) so the model has ~`budget` parameters."""
    config = Config.from_name("mini", mixer=mixer, **fields)
    if budget is None:
        return config
    with torch.device("meta"):
        base = Decoder(config).num_parameters()
    per_unit = 3 * config.d_model * config.n_layers  # gate, up, down: parameters per unit of d_ff
    d_ff = max(8, round((config.d_ff + (budget - base) / per_unit) / 8) * 8)
    return Config.from_name("mini", mixer=mixer, d_ff=d_ff, **fields)


def train_model(config: Config, data_dir: Path, run_dir: Path, args: argparse.Namespace) -> tuple[Decoder, dict]:
    torch.manual_seed(0)
    model = Decoder(config)
    stream = SequenceStream(TokenShards(data_dir, "train"), args.seq_len, seed=0)
    validation = TokenShards(data_dir, "val")

    def eval_batches():  # noqa: ANN202
        for tokens in validation_batches(validation, args.seq_len, args.batch_size, max_batches=args.eval_batches):
            yield causal_lm_batch(tokens)  # the same windows at every evaluation

    settings = TrainSettings(max_steps=args.steps, batch_size=args.batch_size, lr=2e-3,
                             warmup_steps=max(1, args.steps // 10),
                             eval_every=args.eval_every, eval_batches=args.eval_batches, checkpoint_every=args.steps,
                             log_every=10, seed=0)
    started = time.perf_counter()
    train(model, causal_lm_loss, lambda p, b, r, w: causal_lm_batch(stream.batch(p, b, r, w)), settings, run_dir,
          eval_batches=eval_batches)
    seconds = time.perf_counter() - started
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    curve = [(row["step"], row["val_loss"]) for row in rows if row["kind"] == "eval"]
    return model.eval(), {"parameters": model.num_parameters(), "d_ff": config.d_ff, "train_seconds": seconds,
                          "train_tokens_per_s": args.steps * args.batch_size * args.seq_len / seconds, "val_curve": curve}


def cache_bytes(cache) -> int:  # noqa: ANN001
    """Bytes the cache holds: key/value buffers, or mixer states."""
    if isinstance(cache, MixerCache):
        return sum(cache.state_numel(layer) for layer in range(len(cache.states))) * 4
    return sum(k.numel() + v.numel() for k, v in zip(cache.keys, cache.values)) * cache.keys[0].element_size()


@torch.no_grad()
def decode_speed(model: Decoder, prompt: torch.Tensor, n_tokens: int, rounds: int) -> tuple[float, int]:
    """Median tokens/s of `rounds` runs of `n_tokens` greedy decode steps (after a warm-up run) that continue one
    prefill of `prompt` (1, L); the cache's bytes at the end."""
    cache = model.new_cache(1, prompt.shape[1] + (rounds + 1) * n_tokens)
    next_id = model(prompt, cache=cache, last_token_only=True)[:, -1].argmax(-1, keepdim=True)  # (1, 1)
    speeds = []
    for _ in range(rounds + 1):
        started = time.perf_counter()
        for _ in range(n_tokens):
            next_id = model(next_id, cache=cache)[:, -1].argmax(-1, keepdim=True)
        speeds.append(n_tokens / (time.perf_counter() - started))
    return statistics.median(speeds[1:]), cache_bytes(cache)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--seq_len", type=int, default=128)
    parser.add_argument("--batch_size", type=int, default=16)
    parser.add_argument("--ssm_state_dim", type=int, default=16, help="Mamba's N (its scan's cost is linear in it)")
    parser.add_argument("--eval_every", type=int, default=25)
    parser.add_argument("--eval_batches", type=int, default=8)
    parser.add_argument("--contexts", type=lambda text: [int(x) for x in text.split(",")],
                        default=[512, 1024, 2048, 4096, 8192])
    parser.add_argument("--decode_tokens", type=int, default=32)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--mixers", type=lambda text: text.split(","), default=list(MIXERS))
    parser.add_argument("--decode_only", action="store_true", help="skip training: decoding speed and memory only")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--plot", type=Path, default=None, help="path prefix: PREFIX_loss.png and PREFIX_decode.png")
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    work = Path(tempfile.mkdtemp(prefix="llmkit-mixers-"))
    prepare_data(output=str(work / "data"), vocab_size=2048, progress=False)
    manifest = load_manifest(work / "data")
    validation = TokenShards(work / "data", "val")
    text = validation.read(0, len(validation)).astype(np.int64)
    prompt_pool = torch.from_numpy(np.tile(text, max(args.contexts) // len(text) + 1))
    fields = dict(vocab_size=manifest["vocab_size"], eos_id=manifest["eos_id"],
                  max_seq_len=max(args.contexts) + (args.rounds + 1) * args.decode_tokens, ssm_state_dim=args.ssm_state_dim)
    budget = None
    results = {}
    for mixer in args.mixers:
        config = matched_config(mixer, budget, **fields)
        if args.decode_only:  # speed and memory do not depend on the weights: a seeded random init
            torch.manual_seed(0)
            model = Decoder(config).eval()
            result = {"parameters": model.num_parameters(), "d_ff": config.d_ff}
        else:
            model, result = train_model(config, work / "data", work / mixer, args)
        budget = budget or result["parameters"]
        result["decode"] = {}
        for length in args.contexts:
            speed, memory = decode_speed(model, prompt_pool[None, :length], args.decode_tokens, args.rounds)
            result["decode"][length] = {"tokens_per_s": speed, "cache_bytes": memory}
            print(f"{mixer}: context {length:,}: {speed:.1f} tok/s, cache {memory / 2**20:.2f} MiB", flush=True)
        results[mixer] = result
    if not args.decode_only:
        report(results, args)
    if args.json:
        args.json.write_text(json.dumps({"settings": vars(args) | {"plot": str(args.plot), "json": str(args.json)},
                                         "results": results}, indent=2))
    if args.plot:
        plot(results, args)


def report(results: dict, args: argparse.Namespace) -> None:
    machine = platform.processor() or platform.machine()
    print(f"\n{args.steps} steps x {args.batch_size} x {args.seq_len} tokens, Tiny Shakespeare ({machine}, "
          f"{args.threads} threads, {time.strftime('%Y-%m-%d')})")
    reference = results.get("attention")
    print("| mixer | parameters | d_ff | final val loss | vs attention | train tok/s | "
          + " | ".join(f"decode tok/s @{n}" for n in args.contexts) + f" | cache MiB @{args.contexts[-1]} |")
    print("|" + " --- |" * (6 + len(args.contexts) + 1))
    for mixer, result in results.items():
        loss = result["val_curve"][-1][1]
        ratio = f"{loss / reference['val_curve'][-1][1]:.3f}" if reference else "-"
        speeds = " | ".join(f"{result['decode'][n]['tokens_per_s']:.1f}" for n in args.contexts)
        memory = result["decode"][args.contexts[-1]]["cache_bytes"] / 2**20
        print(f"| {mixer} | {result['parameters']:,} | {result['d_ff']} | {loss:.3f} | {ratio} | "
              f"{result['train_tokens_per_s']:,.0f} | {speeds} | {memory:.2f} |")


def plot(results: dict, args: argparse.Namespace) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    if not args.decode_only:
        plot_losses(results, args, plt)
    plot_decoding(results, args, plt)
    print(f"plots: {args.plot}_loss.png, {args.plot}_decode.png")


def plot_losses(results: dict, args: argparse.Namespace, plt) -> None:  # noqa: ANN001
    figure, axes = plt.subplots(figsize=(6.5, 4))
    for mixer, result in results.items():
        steps, losses = zip(*result["val_curve"])
        axes.plot(steps, losses, "o-", label=f"{mixer} ({result['parameters'] / 1e6:.2f}M)")
    axes.set_xlabel(f"step ({args.batch_size} x {args.seq_len} tokens)")
    axes.set_ylabel("validation loss (nats/token)")
    axes.set_title("Tiny Shakespeare, equal parameters and tokens")
    axes.grid(alpha=0.3)
    axes.legend()
    figure.tight_layout()
    figure.savefig(f"{args.plot}_loss.png", dpi=110)


def plot_decoding(results: dict, args: argparse.Namespace, plt) -> None:  # noqa: ANN001
    figure, (speed_axes, memory_axes) = plt.subplots(1, 2, figsize=(10, 4))
    for mixer, result in results.items():
        speed_axes.plot(args.contexts, [result["decode"][n]["tokens_per_s"] for n in args.contexts], "o-", label=mixer)
        memory_axes.plot(args.contexts, [result["decode"][n]["cache_bytes"] / 2**20 for n in args.contexts], "o-",
                         label=mixer)
    for axis, label in ((speed_axes, "decode tokens/s (batch 1)"), (memory_axes, "cache MiB")):
        axis.set_xscale("log", base=2)
        axis.set_xlabel("context (tokens)")
        axis.set_ylabel(label)
        axis.grid(alpha=0.3)
        axis.legend()
    memory_axes.set_yscale("log")
    figure.tight_layout()
    figure.savefig(f"{args.plot}_decode.png", dpi=110)


if __name__ == "__main__":
    main()
