"""Decode speed of a GGUF loaded two ways: dequantized to fp32 at load (llmkit.checkpoints.load_model) and kept
quantized (llmkit.quant.load_gguf_quantized). 128 greedy tokens after a short prompt, 2 threads, best of 3 rounds,
the two paths interleaved in each round; prints tok/s, the ratio and the weights' bytes.

    python benchmarks/gguf_quantized.py [--model FILE.gguf] [--tokens 128] [--rounds 3] [--threads 2]
"""

from __future__ import annotations

import argparse
import os
import time

import torch

from llmkit.checkpoints import default_model_path, load_model, load_tokenizer
from llmkit.generate.decode import generate_tokens
from llmkit.generate.sampling import SamplingSettings
from llmkit.quant.gguf_load import load_gguf_quantized, weight_bytes

PROMPT = "The capital of France is"


def decode_tok_s(model: torch.nn.Module, prompt: list[int], tokens: int) -> float:
    """New tokens per second of one greedy generation (prefill excluded: timed from the first new token)."""
    with torch.no_grad():
        steps = generate_tokens(model, prompt, tokens, SamplingSettings(temperature=0.0))
        next(steps)
        start = time.perf_counter()
        count = sum(1 for _ in steps)
    return count / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=None)
    parser.add_argument("--tokens", type=int, default=128)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    path = args.model or default_model_path()
    prompt = load_tokenizer(path).encode(PROMPT)
    models = {"fp32 (dequantized at load)": load_model(path, arch="decoder"),
              "quantized (file's blocks)": load_gguf_quantized(path)}
    best = dict.fromkeys(models, 0.0)
    for _ in range(args.rounds):
        for name, model in models.items():
            best[name] = max(best[name], decode_tok_s(model, prompt, args.tokens))
    print(f"{os.path.basename(str(path))}, {args.tokens} tokens, {args.threads} threads, best of {args.rounds}; "
          f"load average {os.getloadavg()[0]:.2f}")
    print("| path | decode tok/s | weights MiB |\n| --- | --- | --- |")
    for name, model in models.items():
        print(f"| {name} | {best[name]:.1f} | {weight_bytes(model) / 2**20:.1f} |")
    first, second = best.values()
    print(f"ratio quantized / fp32: {second / first:.2f}")


if __name__ == "__main__":
    main()
