"""`llmkit bench serve`: load-test an OpenAI-compatible server at several concurrency levels and report vLLM's
serving metrics (the load generator and the metric definitions are in llmkit/serve/loadtest.py)."""

from __future__ import annotations

import datetime
import itertools
import json
import math
from collections import Counter
from pathlib import Path
from typing import Any

from llmkit.errors import LlmkitError
from llmkit.io import atomic_write, atomic_write_text

BUILTIN_PROMPTS = {  # --data name -> (task loader name, row field, prompt template)
    "dialogsum": ("dialogsum", "dialogue", "Summarize the following dialogue.\n\n{}"),
    "sst2": ("sst2", "sentence", "Is the sentiment of this movie review positive or negative?\n\n{}"),
}
TABLE_FILE = "results.md"
JSON_FILE = "results.json"
PLOT_FILE = "results.png"


def bench_serve(
    url: str = "http://127.0.0.1:8000",
    concurrency: str = "1,4,16",
    num_requests: int = 32,
    request_rate: str = "inf",
    data: str = "dialogsum",
    text_field: str = "prompt",
    max_tokens: int = 128,
    endpoint: str = "/v1/chat/completions",
    model: str | None = None,
    api_key: str | None = None,
    temperature: float = 0.0,
    seed: int = 0,
    output: str = "runs/bench_serve",
) -> list[dict[str, Any]]:
    """Load-test a running OpenAI-compatible server (llmkit serve, vLLM, llama.cpp's server, ...) with streaming
    requests and report vLLM's serving metrics at each concurrency level.

    Example: llmkit serve &   then   llmkit bench serve --concurrency 1,4,16 --num_requests 32
             llmkit bench serve --url http://127.0.0.1:8080 --data prompts.jsonl --text_field prompt --request_rate 2

    Per level: requests/s, output tokens/s, and mean/median/p99 of TTFT (time to first token), TPOT (time per output
    token after the first), ITL (gap between streamed chunks) and end-to-end latency, in ms; failed requests (HTTP
    429, errors) are counted and their messages summarised. Requests arrive as a seeded Poisson process at
    --request_rate per second (inf: all at once), with at most CONCURRENCY in flight. Writes OUTPUT/results.md,
    results.json and results.png (throughput and TTFT against concurrency).

    Args:
        url: the server's base URL (the API is under /v1).
        concurrency: comma-separated numbers of requests in flight, one level each, e.g. 1,4,16.
        num_requests: requests per level (the prompts are reused in order when there are fewer).
        request_rate: mean arrivals per second of the Poisson process, e.g. 2.5; inf sends every request at once.
        data: prompts: dialogsum or sst2 (built-in, from the shared data), or a JSONL file with TEXT_FIELD per line.
        text_field: the field holding the prompt in a JSONL file.
        max_tokens: most tokens generated per request.
        endpoint: /v1/chat/completions (the prompt is one user message) or /v1/completions.
        model: model name sent with each request (default: the first of GET /v1/models).
        api_key: sent as "Authorization: Bearer API_KEY".
        temperature: sampling temperature of every request (0: greedy).
        seed: seed of the Poisson arrivals.
        output: directory for results.md, results.json and results.png.
    """
    from llmkit.serve.loadtest import level_dict, run_load_test

    levels = parse_concurrency(concurrency)
    rate = parse_rate(request_rate)
    if num_requests < 1:
        raise LlmkitError(f"--num_requests {num_requests} must be at least 1")
    if max_tokens < 1:
        raise LlmkitError(f"--max_tokens {max_tokens} must be at least 1")
    prompts = load_prompts(data, text_field, num_requests)
    started = datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")
    metrics = run_load_test(url, prompts, levels, rate, max_tokens, endpoint, model, temperature, seed, api_key)
    results = [level_dict(level) for level in metrics]
    setup = {"url": url, "endpoint": endpoint, "model": model, "data": data, "num_requests": num_requests,
             "request_rate": None if math.isinf(rate) else rate, "max_tokens": max_tokens,
             "temperature": temperature, "seed": seed, "started": started}
    output_dir = Path(output)
    table = markdown_table(results)
    atomic_write_text(output_dir / TABLE_FILE, table + "\n")
    atomic_write_text(output_dir / JSON_FILE, json.dumps({"setup": setup, "levels": results}, indent=2) + "\n")
    plot_levels(results, output_dir / PLOT_FILE, f"{url}: {num_requests} requests per level, {data}")
    print(table)
    return results


def parse_concurrency(text: str | int) -> list[int]:
    """'1,4,16' -> [1, 4, 16]; LlmkitError naming --concurrency otherwise."""
    try:
        levels = [int(part) for part in str(text).replace(" ", "").split(",") if part]
    except ValueError:
        levels = []
    if not levels or min(levels) < 1:
        raise LlmkitError(f"--concurrency {text!r} must be comma-separated integers >= 1, e.g. 1,4,16")
    return levels


def parse_rate(text: str | float) -> float:
    """'2.5' -> 2.5, 'inf' -> math.inf; LlmkitError naming --request_rate for anything not > 0."""
    try:
        rate = float(text)
    except ValueError:
        rate = math.nan
    if not rate > 0:
        raise LlmkitError(f"--request_rate {text!r} must be a number > 0 (requests/s), or inf to send all at once")
    return rate


def load_prompts(data: str, text_field: str, num_requests: int) -> list[str]:
    """`num_requests` prompt texts from a built-in data set or a JSONL file, reused in order when there are fewer."""
    if data in BUILTIN_PROMPTS:
        from llmkit.eval import builtin

        loader, field, template = BUILTIN_PROMPTS[data]
        texts = [template.format(row.fields[field]) for row in getattr(builtin, loader)().rows]
    else:
        from llmkit.data.jsonl import read_jsonl

        path = Path(data)
        if not path.is_file():
            raise LlmkitError(f"--data {data!r} is neither a file nor a built-in set ({', '.join(BUILTIN_PROMPTS)})")
        texts = []
        for number, record in read_jsonl(path, fields=[text_field], hint="pass --text_field"):
            if not isinstance(record[text_field], str) or not record[text_field]:
                raise LlmkitError(f"{path}, line {number}: {text_field!r} must be a non-empty string")
            texts.append(record[text_field])
        if not texts:
            raise LlmkitError(f"--data {path} holds no prompts; give a JSONL file with one {{\"{text_field}\": ...}} "
                              "per line")
    return list(itertools.islice(itertools.cycle(texts), num_requests))


def markdown_table(levels: list[dict[str, Any]]) -> str:
    """One row per concurrency level; latencies in ms as mean / median / p99."""
    def triple(stats: dict[str, float | None]) -> str:
        return " / ".join("-" if stats[key] is None else f"{stats[key]:.1f}" for key in ("mean", "median", "p99"))

    lines = ["| concurrency | done | failed | req/s | output tok/s | TTFT ms | TPOT ms | ITL ms | E2E latency ms |",
             "| --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    for level in levels:
        lines.append(f"| {level['concurrency']} | {level['completed']} | {level['failed']} | "
                     f"{level['request_throughput'] or 0:.2f} | {level['output_throughput'] or 0:.1f} | "
                     f"{triple(level['ttft_ms'])} | {triple(level['tpot_ms'])} | {triple(level['itl_ms'])} | "
                     f"{triple(level['e2el_ms'])} |")
    lines.append("\nlatencies: mean / median / p99")
    errors = sum((Counter(level["errors"]) for level in levels), Counter())
    lines += [f"- failed {count}x: {message}" for message, count in errors.most_common()]
    return "\n".join(lines)


def plot_levels(levels: list[dict[str, Any]], path: Path, title: str) -> None:
    """Two panels against concurrency: output tokens/s, and TTFT median and p99."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    x = [level["concurrency"] for level in levels]
    figure, (left, right) = plt.subplots(1, 2, figsize=(11, 4))
    left.plot(x, [level["output_throughput"] for level in levels], marker="o")
    left.set_title("output tokens/s")
    for key in ("median", "p99"):
        right.plot(x, [level["ttft_ms"][key] for level in levels], marker="o", label=f"TTFT {key}")
    right.set_title("time to first token (ms)")
    right.legend()
    for axis in (left, right):
        axis.set_xscale("log", base=2)
        axis.set_xticks(x, [str(value) for value in x])
        axis.set_xlabel("concurrent requests")
        axis.grid(alpha=0.3)
    figure.suptitle(title, fontsize=10)
    figure.tight_layout()
    atomic_write(path, lambda tmp: figure.savefig(tmp, dpi=100, format="png"))
    plt.close(figure)
