"""A load generator for any OpenAI-compatible server (`llmkit bench serve`), measuring what vLLM's serving benchmark
measures, with the same definitions (vllm/benchmarks/serve.py, `calculate_metrics`):

- each request streams (SSE); a timestamp is taken when each chunk with text arrives, t_0 .. t_{n-1}, after the
  request was sent at s;
- TTFT (time to first token) = t_0 - s; E2EL (end-to-end latency) = t_{n-1} - s;
- ITL (inter-token latency) = every gap t_k - t_{k-1}, pooled over all requests;
- TPOT (time per output token, the first excluded) = (E2EL - TTFT) / (output_tokens - 1), per request with more than
  one output token (output_tokens from the server's `usage`, else the number of text chunks);
- each is reported as mean, median and p99 (numpy's linear-interpolated percentile) in milliseconds;
- request throughput = completed / duration, output throughput = output tokens / duration, where the duration runs
  from the first send to the last answer. Failed requests (HTTP errors such as 429, dropped connections, error
  events in the stream) are counted and their messages summarised; they add to no latency figure.

Arrivals follow a Poisson process at `request_rate` requests/s (exponential gaps of mean 1/rate from a seeded
generator; inf sends all at once), and at most `concurrency` requests are in flight: a request that arrives while
`concurrency` are running waits, and its TTFT starts when it is sent, as in vLLM.
"""

from __future__ import annotations

import asyncio
import json
import math
import time
from collections import Counter
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from typing import Any
from urllib.parse import urlsplit

import numpy as np

from llmkit.errors import LlmkitError

CHAT_PATH = "/v1/chat/completions"
COMPLETIONS_PATH = "/v1/completions"
ENDPOINTS = (CHAT_PATH, COMPLETIONS_PATH)
ERROR_CHARS = 200  # an error message is cut to this many characters before it is summarised
CONNECT_TIMEOUT_S = 10.0


@dataclass
class RequestResult:
    """One request's outcome: chunk arrival times relative to its send, or the error that ended it."""

    success: bool
    ttft: float = 0.0  # s
    latency: float = 0.0  # s, send to last chunk
    itl: list[float] = field(default_factory=list)  # s, gaps between chunks
    output_tokens: int = 0
    error: str = ""


@dataclass
class LevelMetrics:
    """vLLM's serving metrics for one concurrency level (latencies in ms: mean, median, p99)."""

    concurrency: int
    request_rate: float
    num_requests: int
    completed: int
    failed: int
    duration_s: float
    output_tokens: int
    request_throughput: float  # requests/s
    output_throughput: float  # output tokens/s
    ttft_ms: dict[str, float]
    tpot_ms: dict[str, float]
    itl_ms: dict[str, float]
    e2el_ms: dict[str, float]
    errors: dict[str, int] = field(default_factory=dict)  # message -> count


# ---- metric math ---------------------------------------------------------------------------------------------------


def summarize_ms(values_s: Sequence[float]) -> dict[str, float]:
    """mean, median and p99 of durations in seconds, in milliseconds (NaN when there are none)."""
    if not values_s:
        return {"mean": math.nan, "median": math.nan, "p99": math.nan}
    values = np.asarray(values_s, dtype=np.float64) * 1000
    return {"mean": float(values.mean()), "median": float(np.median(values)), "p99": float(np.percentile(values, 99))}


def timing_from_arrivals(sent: float, arrivals: Sequence[float], output_tokens: int | None = None) -> RequestResult:
    """A successful request's TTFT, E2EL and ITLs from its send time and its text chunks' arrival times."""
    if not arrivals:
        return RequestResult(False, error="the stream ended without any text")
    gaps = [later - earlier for earlier, later in zip(arrivals, arrivals[1:])]
    tokens = output_tokens if output_tokens is not None else len(arrivals)
    return RequestResult(True, ttft=arrivals[0] - sent, latency=arrivals[-1] - sent, itl=gaps, output_tokens=tokens)


def compute_metrics(results: Sequence[RequestResult], duration_s: float, concurrency: int,
                    request_rate: float) -> LevelMetrics:
    """The level's figures from its requests, as vLLM's calculate_metrics computes them."""
    done = [result for result in results if result.success]
    tpots = [(r.latency - r.ttft) / (r.output_tokens - 1) for r in done if r.output_tokens > 1]
    output_tokens = sum(result.output_tokens for result in done)
    errors = Counter(result.error[:ERROR_CHARS] for result in results if not result.success)
    return LevelMetrics(
        concurrency=concurrency, request_rate=request_rate, num_requests=len(results), completed=len(done),
        failed=len(results) - len(done), duration_s=duration_s, output_tokens=output_tokens,
        request_throughput=len(done) / duration_s if duration_s > 0 else math.nan,
        output_throughput=output_tokens / duration_s if duration_s > 0 else math.nan,
        ttft_ms=summarize_ms([r.ttft for r in done]), tpot_ms=summarize_ms(tpots),
        itl_ms=summarize_ms([gap for r in done for gap in r.itl]), e2el_ms=summarize_ms([r.latency for r in done]),
        errors=dict(errors.most_common()),
    )


def poisson_arrivals(num_requests: int, request_rate: float, seed: int) -> list[float]:
    """Send times (s from the start) of a Poisson process at `request_rate`/s: cumulative exponential gaps of mean
    1/rate from a seeded generator; all zeros when the rate is infinite."""
    if math.isinf(request_rate):
        return [0.0] * num_requests
    gaps = np.random.default_rng(seed).exponential(1.0 / request_rate, num_requests)
    return np.cumsum(gaps).tolist()


# ---- the client ----------------------------------------------------------------------------------------------------


def request_body(endpoint: str, model: str, prompt: str, max_tokens: int, temperature: float) -> dict[str, Any]:
    """A streaming request that asks for the usage counts in the last chunk (`stream_options.include_usage`)."""
    body: dict[str, Any] = {"model": model, "max_tokens": max_tokens, "temperature": temperature, "stream": True,
                            "stream_options": {"include_usage": True}}
    if endpoint == CHAT_PATH:
        body["messages"] = [{"role": "user", "content": prompt}]
    else:
        body["prompt"] = prompt
    return body


def chunk_text(chunk: dict[str, Any]) -> str:
    """The text a chat (delta.content) or completions (text) stream chunk carries."""
    texts = []
    for choice in chunk.get("choices") or []:
        delta = choice.get("delta") or {}
        texts.append(delta.get("content") or choice.get("text") or "")
    return "".join(texts)


async def send_request(session: Any, url: str, body: dict[str, Any], headers: dict[str, str]) -> RequestResult:
    """POST one streaming request and time its text chunks; any failure is a RequestResult with its message."""
    import aiohttp

    sent = time.perf_counter()
    arrivals: list[float] = []
    usage_tokens = None
    try:
        async with session.post(url, json=body, headers=headers) as response:
            if response.status != 200:
                return RequestResult(False, error=f"HTTP {response.status}: {error_message(await response.text())}")
            async for raw_line in response.content:
                line = raw_line.decode("utf-8", errors="replace").strip()
                if not line.startswith("data:"):
                    continue
                data = line[len("data:"):].strip()
                if data == "[DONE]":
                    break
                chunk = json.loads(data)
                if "error" in chunk:
                    return RequestResult(False, error=f"stream error: {error_message(data)}")
                if chunk_text(chunk):
                    arrivals.append(time.perf_counter())
                if chunk.get("usage"):
                    usage_tokens = chunk["usage"].get("completion_tokens")
    except (aiohttp.ClientError, asyncio.TimeoutError, ValueError) as error:
        return RequestResult(False, error=f"{type(error).__name__}: {error}".strip())
    return timing_from_arrivals(sent, arrivals, usage_tokens)


def error_message(text: str) -> str:
    """The message of an OpenAI error envelope {"error": {"message": ...}}, else the text itself, on one line."""
    try:
        error = json.loads(text).get("error")
        message = error.get("message") if isinstance(error, dict) else error
    except (ValueError, AttributeError):
        message = None
    return " ".join(str(message or text).split())[:ERROR_CHARS]


# ---- running a level -----------------------------------------------------------------------------------------------


async def run_level(url: str, endpoint: str, model: str, prompts: Sequence[str], concurrency: int,
                    request_rate: float, max_tokens: int, temperature: float = 0.0, seed: int = 0,
                    api_key: str | None = None, progress: Any = None) -> LevelMetrics:
    """Send one request per prompt (Poisson arrivals, at most `concurrency` in flight) and measure them."""
    import aiohttp

    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    arrivals = poisson_arrivals(len(prompts), request_rate, seed)
    limit = asyncio.Semaphore(concurrency)
    connector = aiohttp.TCPConnector(limit=concurrency)
    timeout = aiohttp.ClientTimeout(total=None, sock_connect=CONNECT_TIMEOUT_S)

    async with aiohttp.ClientSession(connector=connector, timeout=timeout) as session:
        start = time.perf_counter()

        async def one(prompt: str, at: float) -> RequestResult:
            await asyncio.sleep(max(0.0, start + at - time.perf_counter()))
            async with limit:
                body = request_body(endpoint, model, prompt, max_tokens, temperature)
                result = await send_request(session, url.rstrip("/") + endpoint, body, headers)
            if progress is not None:
                progress.update(1)
            return result

        results = await asyncio.gather(*(one(prompt, at) for prompt, at in zip(prompts, arrivals)))
        duration = time.perf_counter() - start
    return compute_metrics(results, duration, concurrency, request_rate)


def check_url(url: str) -> str:
    """The base URL without a trailing slash; LlmkitError naming --url for anything but http(s)://host[:port]."""
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise LlmkitError(f"--url {url!r} is not an http(s) URL; give the server's base URL, e.g. "
                          "http://127.0.0.1:8000")
    try:
        parts.port  # noqa: B018 (raises ValueError for a bad port)
    except ValueError as error:
        raise LlmkitError(f"--url {url!r} has a bad port ({error}); e.g. http://127.0.0.1:8000") from None
    return url.rstrip("/")


async def served_model(url: str, api_key: str | None) -> str:
    """The first model id of GET /v1/models; LlmkitError (one line) when the server cannot be reached."""
    import aiohttp

    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    timeout = aiohttp.ClientTimeout(total=CONNECT_TIMEOUT_S)
    try:
        async with aiohttp.ClientSession(timeout=timeout) as session, \
                session.get(f"{url}/v1/models", headers=headers) as response:
            text = await response.text()
            if response.status != 200:
                raise LlmkitError(f"GET {url}/v1/models answered HTTP {response.status} ({error_message(text)}); "
                                  "check --url and --api_key, or pass --model")
            models = json.loads(text).get("data") or []
    except (aiohttp.ClientError, asyncio.TimeoutError, OSError) as error:
        raise LlmkitError(f"cannot reach the server at --url {url} ({type(error).__name__}); start it (llmkit serve) "
                          "or fix --url") from None
    except ValueError:
        raise LlmkitError(f"GET {url}/v1/models did not answer JSON; is --url an OpenAI-compatible server?") from None
    if not models:
        raise LlmkitError(f"the server at --url {url} lists no models; pass --model")
    return str(models[0]["id"])


def level_dict(level: LevelMetrics) -> dict[str, Any]:
    """The level as plain JSON values (NaN becomes null)."""
    def clean(value: Any) -> Any:
        if isinstance(value, dict):
            return {key: clean(item) for key, item in value.items()}
        return None if isinstance(value, float) and math.isnan(value) else value

    return clean(asdict(level))


def run_load_test(url: str, prompts: Sequence[str], concurrencies: Sequence[int], request_rate: float = math.inf,
                  max_tokens: int = 128, endpoint: str = CHAT_PATH, model: str | None = None,
                  temperature: float = 0.0, seed: int = 0, api_key: str | None = None,
                  show_progress: bool = True) -> list[LevelMetrics]:
    """One level per concurrency, each sending every prompt once; the model defaults to the server's first."""
    from tqdm import tqdm

    url = check_url(url)
    if endpoint not in ENDPOINTS:
        raise LlmkitError(f"--endpoint {endpoint!r} must be one of {', '.join(ENDPOINTS)}")
    if not prompts:
        raise LlmkitError("no prompts to send; check --data and --num_requests")
    if not concurrencies or min(concurrencies) < 1:
        raise LlmkitError(f"--concurrency {list(concurrencies)} must list integers >= 1, e.g. 1,4,16")
    if not request_rate > 0:
        raise LlmkitError(f"--request_rate {request_rate} must be > 0 requests/s (inf sends all at once)")
    model = model or asyncio.run(served_model(url, api_key))
    levels = []
    for concurrency in concurrencies:
        with tqdm(total=len(prompts), desc=f"concurrency {concurrency}", unit="req",
                  disable=not show_progress) as progress:
            levels.append(asyncio.run(run_level(url, endpoint, model, prompts, concurrency, request_rate, max_tokens,
                                                temperature, seed, api_key, progress)))
    return levels
