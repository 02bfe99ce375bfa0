"""Multi-LoRA decode throughput: one batch of B rows on SmolLM2-135M-Instruct (fp32, dequantized from the GGUF) where
the rows use 1, 4 or 16 distinct LoRA adapters (rank 8 and 16 alternating, on q,k,v,o, random non-zero B), against
the base model alone; side by side with the real alternative a user has, peft's mixed-batch inference in
transformers (`model.generate(..., adapter_names=[...])`) on the same weights and adapters.

    python benchmarks/multi_lora.py --json docs/multi_lora.json          (THREADS=2 by default)
    python benchmarks/multi_lora.py --new_tokens 6 --rounds 1 --no-json  (a quick check that it runs)

Decode tok/s = B x (N - 1) / (time from the first new token to the last), so the prompt's prefill is not counted
(transformers: timed with a streamer); the median of --rounds rounds. llmkit runs `generate_tokens` inside
`batch_adapters` (llmkit.peft.multi_lora); its "base" row is the model as `load_decoder` gives it (fused q/k/v, no
LoRA layers); the "adapters loaded, unused" row runs the base through the LoRA-wrapped layers (q/k/v no longer
fused: three products instead of one, see llmkit/nn/fused.py), which splits the loss into that part and the
updates' own. Before timing, the mixed batch's logits are compared with peft's (max |difference| is printed and
recorded).
The issue's goal: <= 20% throughput loss at 4 adapters against the base model.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import statistics
import tempfile
import time
from pathlib import Path

import torch
from streamer_clock import FirstTokenClock

from llmkit.checkpoints import default_model_path, load_tokenizer
from llmkit.commands.common import load_decoder
from llmkit.generate import generate_tokens
from llmkit.io import atomic_write_text
from llmkit.peft.core import save_adapter
from llmkit.peft.hf_peft import export_peft_lora
from llmkit.peft.lora import LoraSettings, add_adapter, apply_lora, lora_layers, set_adapter
from llmkit.peft.multi_lora import batch_adapters, load_lora_adapter, remove_lora_adapter

TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj")
N_ADAPTERS = 16
PROMPT = "Summarize the following conversation between two friends planning a trip to the mountains next weekend:"


def make_adapters(model: torch.nn.Module, root: Path) -> list[tuple[str, Path, Path]]:
    """N_ADAPTERS random LoRA adapters of `model`, each saved as an llmkit directory and a PEFT directory, then taken
    off the model again: (name, llmkit dir, peft dir)."""
    made = []
    for index in range(N_ADAPTERS):
        name = f"a{index}"
        settings = LoraSettings(rank=8 if index % 2 == 0 else 16, alpha=16.0, targets=TARGETS, adapter_name=name)
        (add_adapter if lora_layers(model) else apply_lora)(model, settings)
        set_adapter(model, name)
        generator = torch.Generator().manual_seed(index)
        with torch.no_grad():
            for layer in lora_layers(model).values():
                for table in (layer.lora_A, layer.lora_B):
                    table[name].copy_(torch.randn(table[name].shape, generator=generator) * 0.02)
        save_adapter(model, root / name / "llmkit", "lora", settings)
        export_peft_lora(model, root / name / "peft", adapter_name=name)
        remove_lora_adapter(model, name)
        made.append((name, root / name / "llmkit", root / name / "peft"))
    return made


def row_names(rows: int, distinct: int) -> list[str | None]:
    """Adapter per row: `distinct` adapters round-robin over the rows (0 or -1: none, the base model)."""
    return [None if distinct <= 0 else f"a{row % distinct}" for row in range(rows)]


def prompt_batch(tokenizer, rows: int) -> torch.Tensor:  # noqa: ANN001
    """(rows, T) ids: the same prompt with a different leading word per row, all of one length (no padding)."""
    ids = tokenizer.encode(PROMPT)
    return torch.tensor([[ids[0] + row] + ids[1:] for row in range(rows)])


def llmkit_decode_seconds(model: torch.nn.Module, ids: torch.Tensor, names: list[str | None], new_tokens: int) -> float:
    """Seconds from the first new token (prefill done) to the last."""
    with batch_adapters(model, names):
        steps = generate_tokens(model, ids.tolist(), new_tokens)
        next(steps)
        start = time.perf_counter()
        for _ in steps:
            pass
    return time.perf_counter() - start


def peft_decode_seconds(model, ids: torch.Tensor, names: list[str | None], new_tokens: int) -> float:  # noqa: ANN001
    """Seconds from the first new token to the last, in peft's mixed-batch generate."""
    clock = FirstTokenClock()
    with torch.inference_mode():
        model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=new_tokens,
                       min_new_tokens=new_tokens, do_sample=False, pad_token_id=0, streamer=clock,
                       adapter_names=[name or "__base__" for name in names])
    return time.perf_counter() - clock.first


def decode_tok_s(seconds, ids: torch.Tensor, names, new_tokens: int, rounds: int) -> float:  # noqa: ANN001
    """B (N - 1) tokens over the time from the first new token to the last, median over rounds (after a warm-up)."""
    seconds(ids, names, 3)
    return statistics.median(ids.shape[0] * (new_tokens - 1) / seconds(ids, names, new_tokens) for _ in range(rounds))


def parity(model, peft_model, ids: torch.Tensor, names: list[str | None]) -> float:  # noqa: ANN001
    with torch.no_grad():
        with batch_adapters(model, names):
            ours = model(ids)
        theirs = peft_model(input_ids=ids, adapter_names=[name or "__base__" for name in names]).logits
    return (ours - theirs).abs().max().item()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", type=int, default=16, help="batch rows B")
    parser.add_argument("--distinct", default="0,-1,1,4,16",
                        help="distinct adapters in the batch (0: the base model as loaded; -1: the model with the "
                             "adapters loaded but every row on the base, which shows the cost of unfused q/k/v)")
    parser.add_argument("--new_tokens", type=int, default=32)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--json", default="docs/multi_lora.json")
    parser.add_argument("--no-json", dest="json", action="store_const", const=None)
    args = parser.parse_args()
    torch.set_num_threads(int(os.environ.get("THREADS", "2")))
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    path = default_model_path()
    base = load_decoder(path, weights="float")
    tokenizer = load_tokenizer(path)
    ids = prompt_batch(tokenizer, args.rows)
    with tempfile.TemporaryDirectory() as folder:
        adapted = copy.deepcopy(base)
        made = make_adapters(adapted, Path(folder))
        for name, llmkit_dir, _ in made:
            load_lora_adapter(adapted, name, llmkit_dir)
        hf_model = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=torch.float32).eval()
        peft_model = PeftModel.from_pretrained(hf_model, made[0][2], adapter_name=made[0][0])
        for name, _, peft_dir in made[1:]:
            peft_model.load_adapter(peft_dir, adapter_name=name)
        peft_model.eval()
        difference = parity(adapted, peft_model, ids, row_names(args.rows, min(4, N_ADAPTERS)))
    load = os.getloadavg()[0]
    print(f"SmolLM2-135M fp32, B={args.rows}, {args.new_tokens} new tokens, {torch.get_num_threads()} threads, "
          f"load average {load:.2f}; mixed-batch logits vs peft: max |diff| {difference:.2e}")
    results = []
    for distinct in (int(n) for n in args.distinct.split(",")):
        names = row_names(args.rows, distinct)
        ours_model = base if distinct == 0 else adapted
        ours = decode_tok_s(lambda i, n, t, m=ours_model: llmkit_decode_seconds(m, i, n, t), ids, names,
                            args.new_tokens, args.rounds)
        theirs = decode_tok_s(lambda i, n, t: peft_decode_seconds(peft_model, i, n, t), ids, names, args.new_tokens,
                              args.rounds)
        results.append({"distinct_adapters": distinct, "llmkit_tok_s": round(ours, 2), "peft_tok_s": round(theirs, 2)})
    base_ours, base_theirs = results[0]["llmkit_tok_s"], results[0]["peft_tok_s"]
    print("| adapters in batch | llmkit tok/s | vs base | peft tok/s | vs base | llmkit / peft |")
    print("| --- | --- | --- | --- | --- | --- |")
    for row in results:
        row["llmkit_vs_base"] = round(row["llmkit_tok_s"] / base_ours, 3)
        row["peft_vs_base"] = round(row["peft_tok_s"] / base_theirs, 3)
        label = {0: "base model", -1: "0 (adapters loaded, unused)"}.get(row["distinct_adapters"],
                                                                          str(row["distinct_adapters"]))
        print(f"| {label} | {row['llmkit_tok_s']:.1f} | {row['llmkit_vs_base']:.2f} | {row['peft_tok_s']:.1f} | "
              f"{row['peft_vs_base']:.2f} | {row['llmkit_tok_s'] / row['peft_tok_s']:.2f} |")
    if args.json:
        record = {"model": "SmolLM2-135M-Instruct (GGUF Q4_1 dequantized to fp32)", "rows": args.rows,
                  "new_tokens": args.new_tokens, "rounds": args.rounds, "threads": torch.get_num_threads(),
                  "load_average": round(load, 2), "adapters": {"count": N_ADAPTERS, "ranks": [8, 16],
                                                               "targets": list(TARGETS)},
                  "parity_max_abs_logit_diff_vs_peft": difference, "date": time.strftime("%Y-%m-%d"),
                  "results": results}
        atomic_write_text(Path(args.json), json.dumps(record, indent=2) + "\n")
        print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
