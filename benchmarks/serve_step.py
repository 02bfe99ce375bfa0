"""What one serving-engine step costs, by part: SmolLM2-135M-Instruct (Q4_1 GGUF kept packed, as `llmkit serve` loads
it), B requests decoding together, ms per decode step; and the engine's prefill speed in tok/s.

Runs on the main thread (torch CPU ops from a worker thread ran ~3x slower here; llmkit/serve/engine.py `run`).
With --profile it prints torch.profiler's table of the timed steps (aten ops by self CPU time: the int4 kernel,
SDPA, copies, ...), which splits a step into the model's parts and what the engine does around the forward.

    python benchmarks/serve_step.py [--rows 1,8,16] [--steps 20] [--sampled] [--profile]   (THREADS=2 by default)

--sampled gives every request temperature 0.8, top_p 0.9, a seed, presence penalty 0.5 and logprobs 2 (the
per-request processors the engine runs); without it the requests are plain greedy.
"""

from __future__ import annotations

import argparse
import os
import statistics
import time

import torch

from llmkit.checkpoints import default_model_path
from llmkit.commands.common import load_decoder
from llmkit.generate import SamplingSettings
from llmkit.serve import Engine, Request

PROMPT = list(range(1000, 1064))  # 64 prompt tokens per request


def decode_requests(engine: Engine, rows: int, sampled: bool, max_new_tokens: int) -> None:
    """Submit `rows` requests and step until every one of them decodes."""
    for index in range(rows):
        if sampled:
            request = Request(PROMPT, max_new_tokens=max_new_tokens, presence_penalty=0.5, logprobs=2,
                              sampling=SamplingSettings(temperature=0.8, top_p=0.9, seed=index))
        else:
            request = Request(PROMPT, max_new_tokens=max_new_tokens)
        engine.submit(request)
    while engine.stats().waiting or any(seq.prefilling for seq in engine._running):
        engine.step()


def step_ms(engine: Engine, steps: int) -> list[float]:
    times = []
    for _ in range(steps):
        start = time.perf_counter()
        engine.step()
        times.append((time.perf_counter() - start) * 1e3)
    return times


def prefill_tok_s(model: torch.nn.Module, tokens: int, chunk: int) -> float:
    """Tokens per second of the engine prefilling one `tokens`-token prompt (`chunk` tokens per step)."""
    engine = Engine(model, max_batch_size=1, prefill_chunk=chunk, prefix_cache=False)
    engine.submit(Request(list(range(1000, 1000 + tokens)), max_new_tokens=1))
    start = time.perf_counter()
    while engine.stats().running or engine.stats().waiting:
        engine.step()
    return tokens / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", default="1,8,16")
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--sampled", action="store_true")
    parser.add_argument("--profile", action="store_true", help="print torch.profiler's table of the timed steps")
    parser.add_argument("--prefill", type=int, default=512, help="prompt tokens of the prefill figure (0: skip)")
    args = parser.parse_args()
    torch.set_num_threads(int(os.environ.get("THREADS", "2")))
    model = load_decoder(default_model_path())
    print(f"load average {os.getloadavg()[0]:.2f}, {torch.get_num_threads()} threads, torch {torch.__version__}")
    for rows in (int(n) for n in args.rows.split(",")):
        engine = Engine(model, max_batch_size=max(rows, 1), prefix_cache=False)
        decode_requests(engine, rows, args.sampled, max_new_tokens=4 * args.steps + 8)
        step_ms(engine, 3)  # warm-up
        if args.profile:
            with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as profiler:
                times = step_ms(engine, args.steps)
            print(profiler.key_averages().table(sort_by="self_cpu_time_total", row_limit=25))
        else:
            times = step_ms(engine, args.steps)
        print(f"{rows:>3} rows{' (sampled)' if args.sampled else ''}: decode step median {statistics.median(times):.1f} "
              f"ms, best {min(times):.1f} ms -> {rows * 1e3 / statistics.median(times):.1f} tok/s")
        engine.shutdown(cancel_running=True)
    if args.prefill:
        speed = prefill_tok_s(model, args.prefill, chunk=256)
        print(f"prefill of a {args.prefill}-token prompt (256 tokens per step): {speed:.0f} tok/s")


if __name__ == "__main__":
    main()
