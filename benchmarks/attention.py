"""Attention variants, measured: (1) MHA vs GQA vs MQA at the same d_model: KV-cache memory and decode speed;
(2) the SDPA kernel (FlashAttention-style, memory linear in context) vs the written-out reference path
(materialises the T x T score matrix) at contexts 512 to 8192: time and peak memory of one causal attention.

    python benchmarks/attention.py                          # both studies, CPU, 2 threads
    python benchmarks/attention.py --contexts 512,1024,2048,4096,8192 --plot docs/attention.png

Every measurement runs in a fresh spawned child, so each peak RSS (VmHWM, reset before the measured call) is its
own. On CUDA (--device cuda) peak memory is torch.cuda.max_memory_allocated and SDPA picks FlashAttention.
"""

from __future__ import annotations

import argparse
import multiprocessing
import platform
import statistics
import time
from pathlib import Path

import torch

from llmkit.memory import proc_status_kib, reset_peak_rss

KV_VARIANTS = {"MHA": 9, "GQA (3 groups)": 3, "MQA": 1}  # n_kv_heads for SmolLM2-135M's 9 query heads


def _peak_reset(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.reset_peak_memory_stats()
    else:
        reset_peak_rss()  # VmHWM := current RSS


def _peak_bytes(device: str, baseline: int) -> int:
    if device.startswith("cuda"):
        return torch.cuda.max_memory_allocated()
    return proc_status_kib("VmHWM") * 1024 - baseline


def _rss_bytes() -> int:
    return proc_status_kib("VmRSS") * 1024


def attention_child(kernel: str, context: int, heads: int, head_dim: int, threads: int, device: str, queue) -> None:  # noqa: ANN001
    from llmkit.nn.attention import reference_attention, sdpa_attention

    torch.set_num_threads(threads)
    generator = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(1, heads, context, head_dim, generator=generator).to(device) for _ in range(3))
    function = sdpa_attention if kernel == "sdpa" else reference_attention
    with torch.no_grad():
        function(q[:, :, :64], k[:, :, :64], v[:, :, :64], None, True)  # load kernels outside the measurement
        baseline = _rss_bytes()
        _peak_reset(device)
        times = []
        for _ in range(3):
            started = time.perf_counter()
            function(q, k, v, None, True)
            if device.startswith("cuda"):
                torch.cuda.synchronize()
            times.append(time.perf_counter() - started)
        queue.put({"seconds": statistics.median(times), "peak_bytes": _peak_bytes(device, baseline)})


def decode_child(n_kv_heads: int, context: int, n_new: int, threads: int, device: str, queue) -> None:  # noqa: ANN001
    from llmkit.config import Config
    from llmkit.estimate import kv_cache_bytes
    from llmkit.generate import generate_tokens
    from llmkit.models.decoder import Decoder
    from llmkit.nn.linear import use_column_major_weights

    torch.set_num_threads(threads)
    torch.manual_seed(0)
    config = Config.from_name("smollm2-135m", n_kv_heads=n_kv_heads)
    model = Decoder(config).eval().to(device)
    if device == "cpu":
        use_column_major_weights(model)
    prompt = torch.randint(0, config.vocab_size, (context,), generator=torch.Generator().manual_seed(0)).tolist()
    steps = iter(generate_tokens(model, prompt, max_new_tokens=n_new + 1))
    next(steps)  # the prefill and the first token
    started = time.perf_counter()
    produced = sum(1 for _ in steps)
    seconds = time.perf_counter() - started
    queue.put({"parameters": model.num_parameters(), "tokens_per_s": produced / seconds,
               "kv_bytes": kv_cache_bytes(config, 1, context + n_new, bytes_per_value=4)})


def in_child(target, *args) -> dict:  # noqa: ANN001
    context = multiprocessing.get_context("spawn")
    queue = context.Queue()
    process = context.Process(target=target, args=(*args, queue))
    process.start()
    result = queue.get()
    process.join()
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--contexts", type=lambda text: [int(x) for x in text.split(",")],
                        default=[512, 1024, 2048, 4096, 8192])
    parser.add_argument("--decode_context", type=int, default=1024)
    parser.add_argument("--new_tokens", type=int, default=32)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--plot", type=Path, default=None)
    args = parser.parse_args()
    processor = platform.processor() or platform.machine()
    machine = f"{processor}, {args.device}, {args.threads} threads, {time.strftime('%Y-%m-%d')}"

    print(f"KV cache and decode speed at the same d_model (SmolLM2-135M shape, random weights, fp32, prompt "
          f"{args.decode_context} tokens; {machine})")
    print("| attention | n_kv_heads | parameters | KV cache (fp32) | decode tok/s | vs MHA |\n"
          "| --- | --- | --- | --- | --- | --- |")
    decode = {name: in_child(decode_child, heads, args.decode_context, args.new_tokens, args.threads, args.device)
              for name, heads in KV_VARIANTS.items()}
    for name, result in decode.items():
        speedup = result["tokens_per_s"] / decode["MHA"]["tokens_per_s"]
        print(f"| {name} | {KV_VARIANTS[name]} | {result['parameters'] / 1e6:.1f}M | "
              f"{result['kv_bytes'] / 2**20:,.1f} MiB | {result['tokens_per_s']:.1f} | {speedup:.2f}x |")

    print(f"\none causal attention (1 x 9 heads x T x 64), SDPA vs reference ({machine})")
    print("| context | SDPA ms | reference ms | SDPA peak MiB | reference peak MiB | T x T scores MiB |\n"
          "| --- | --- | --- | --- | --- | --- |")
    kernels = {}
    for context in args.contexts:
        sdpa = in_child(attention_child, "sdpa", context, 9, 64, args.threads, args.device)
        reference = in_child(attention_child, "reference", context, 9, 64, args.threads, args.device)
        kernels[context] = (sdpa, reference)
        scores = 9 * context * context * 4 / 2**20
        print(f"| {context} | {sdpa['seconds'] * 1e3:,.1f} | {reference['seconds'] * 1e3:,.1f} | "
              f"{sdpa['peak_bytes'] / 2**20:,.1f} | {reference['peak_bytes'] / 2**20:,.1f} | {scores:,.0f} |")
    if args.plot:
        plot(kernels, args)


def plot(kernels: dict, args: argparse.Namespace) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    contexts = list(kernels)
    figure, (memory, speed) = plt.subplots(1, 2, figsize=(10, 4))
    for index, label in enumerate(("SDPA", "reference")):
        memory.plot(contexts, [kernels[c][index]["peak_bytes"] / 2**20 for c in contexts], "o-", label=label)
        speed.plot(contexts, [kernels[c][index]["seconds"] * 1e3 for c in contexts], "o-", label=label)
    for axes, ylabel in ((memory, "peak memory (MiB)"), (speed, "time (ms)")):
        axes.set_xscale("log", base=2)
        axes.set_yscale("log")
        axes.set_xlabel("context (tokens)")
        axes.set_ylabel(ylabel)
        axes.grid(alpha=0.3)
        axes.legend()
    figure.suptitle(f"Causal attention, 9 heads x 64 ({args.device}, {args.threads} threads)")
    figure.tight_layout()
    figure.savefig(args.plot, dpi=110)
    print(f"plot: {args.plot}")


if __name__ == "__main__":
    main()
