"""`llmkit bench serve`: vLLM's serving metrics on hand-made timestamps, seeded Poisson arrivals, and the client
against a small OpenAI-style streaming server run in the test (FastAPI + uvicorn on a loopback port)."""

from __future__ import annotations

import asyncio
import json
import math
import socket
import threading
import time
from collections import Counter

import numpy as np
import pytest
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, StreamingResponse

from llmkit import LlmkitError
from llmkit.serve.loadtest import (
    RequestResult,
    compute_metrics,
    poisson_arrivals,
    run_load_test,
    timing_from_arrivals,
)
from tests.helpers import run_cli, write_jsonl

# ---- metric math -------------------------------------------------------------------------------------------------


def test_metrics_follow_vllm_definitions_on_hand_made_timestamps():
    a = timing_from_arrivals(0.0, [0.10, 0.15, 0.25, 0.30])  # 4 chunks: TTFT 100 ms, E2EL 300 ms, ITL 50/100/50
    b = timing_from_arrivals(1.0, [1.40])  # one chunk: TTFT = E2EL = 400 ms, no ITL, no TPOT
    failed = RequestResult(False, error="HTTP 429: server busy")
    metrics = compute_metrics([a, b, failed], duration_s=2.0, concurrency=4, request_rate=math.inf)

    assert (metrics.completed, metrics.failed, metrics.output_tokens) == (2, 1, 5)
    assert metrics.errors == {"HTTP 429: server busy": 1}
    assert metrics.request_throughput == pytest.approx(2 / 2.0) and metrics.output_throughput == pytest.approx(5 / 2.0)
    # TTFT [100, 400]: mean 250, median 250, p99 = 100 + 0.99 * (400 - 100) (linear interpolation)
    assert metrics.ttft_ms == pytest.approx({"mean": 250.0, "median": 250.0, "p99": 397.0})
    # TPOT only for requests with > 1 token: (300 - 100) / (4 - 1)
    assert metrics.tpot_ms == pytest.approx({"mean": 200 / 3, "median": 200 / 3, "p99": 200 / 3})
    # ITL pooled [50, 100, 50]: sorted [50, 50, 100], p99 at rank 0.99 * 2 = 1.98 -> 50 + 0.98 * 50
    assert metrics.itl_ms == pytest.approx({"mean": 200 / 3, "median": 50.0, "p99": 99.0})
    assert metrics.e2el_ms == pytest.approx({"mean": 350.0, "median": 350.0, "p99": 399.0})


def test_tpot_uses_the_servers_token_count_when_given():
    """Several tokens can arrive in one chunk: usage.completion_tokens is the count TPOT divides by."""
    result = timing_from_arrivals(0.0, [0.1, 0.5], output_tokens=9)
    metrics = compute_metrics([result], duration_s=1.0, concurrency=1, request_rate=math.inf)
    assert metrics.tpot_ms["mean"] == pytest.approx((500 - 100) / 8)
    assert metrics.output_tokens == 9 and metrics.itl_ms["mean"] == pytest.approx(400.0)


def test_no_completed_request_leaves_latencies_empty():
    metrics = compute_metrics([RequestResult(False, error="x")] * 3, 1.0, 1, math.inf)
    assert metrics.completed == 0 and metrics.failed == 3 and math.isnan(metrics.ttft_ms["p99"])
    assert not timing_from_arrivals(0.0, []).success  # a stream without text is a failure


def test_poisson_arrivals_have_exponential_gaps_of_mean_one_over_rate():
    rate = 5.0
    arrivals = poisson_arrivals(20_000, rate, seed=0)
    gaps = np.diff([0.0, *arrivals])
    # mean 1/rate = 0.2 s: the standard error over 20,000 gaps is 0.2 / sqrt(20,000) = 0.0014, so 3% is ~4 sigma
    assert gaps.mean() == pytest.approx(1 / rate, rel=0.03)
    assert gaps.std() / gaps.mean() == pytest.approx(1.0, rel=0.05)  # exponential: coefficient of variation 1
    assert (gaps > 0).all() and arrivals == poisson_arrivals(20_000, rate, seed=0)
    assert arrivals != poisson_arrivals(20_000, rate, seed=1)
    assert poisson_arrivals(3, math.inf, seed=0) == [0.0, 0.0, 0.0]


# ---- a streaming server to test the client against -----------------------------------------------------------------

TOKENS_PER_REPLY = 5
FIRST_DELAY_S = 0.02
CHUNK_DELAY_S = 0.005


class FakeServer:
    """An OpenAI-style server: GET /v1/models; POST /v1/chat/completions and /v1/completions stream
    TOKENS_PER_REPLY chunks then usage and [DONE]; a prompt containing "reject" gets HTTP 429 with OpenAI's error
    envelope. It records every prompt it receives and the most requests it had in flight at once."""

    def __init__(self) -> None:
        self.received: Counter[str] = Counter()
        self.in_flight = 0
        self.most_in_flight = 0
        app = FastAPI()

        @app.get("/v1/models")
        async def models() -> dict:
            return {"object": "list", "data": [{"id": "fake-model", "object": "model"}]}

        async def complete(request: Request, chat: bool):  # noqa: ANN202
            body = await request.json()
            prompt = body["messages"][-1]["content"] if chat else body["prompt"]
            self.received[prompt] += 1
            if "reject" in prompt:
                return JSONResponse({"error": {"message": "server busy", "type": "rate_limit_error", "param": None,
                                               "code": "queue_full"}}, status_code=429)

            async def events():  # noqa: ANN202
                self.in_flight += 1
                self.most_in_flight = max(self.most_in_flight, self.in_flight)
                try:
                    await asyncio.sleep(FIRST_DELAY_S)
                    for index in range(TOKENS_PER_REPLY):
                        choice = ({"index": 0, "delta": {"content": f"t{index} "}} if chat
                                  else {"index": 0, "text": f"t{index} "})
                        yield f"data: {json.dumps({'choices': [choice]})}\n\n"
                        await asyncio.sleep(CHUNK_DELAY_S)
                    if body.get("stream_options", {}).get("include_usage"):
                        usage = {"prompt_tokens": 3, "completion_tokens": TOKENS_PER_REPLY, "total_tokens": 8}
                        yield f"data: {json.dumps({'choices': [], 'usage': usage})}\n\n"
                    yield "data: [DONE]\n\n"
                finally:
                    self.in_flight -= 1

            return StreamingResponse(events(), media_type="text/event-stream")

        @app.post("/v1/chat/completions")
        async def chat(request: Request):  # noqa: ANN202
            return await complete(request, chat=True)

        @app.post("/v1/completions")
        async def completions(request: Request):  # noqa: ANN202
            return await complete(request, chat=False)

        self.app = app


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture(scope="module")
def fake_server():
    import uvicorn

    server = FakeServer()
    port = free_port()
    config = uvicorn.Config(server.app, host="127.0.0.1", port=port, log_level="warning", lifespan="off")
    runner = uvicorn.Server(config)
    thread = threading.Thread(target=runner.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not runner.started:
        assert thread.is_alive() and time.monotonic() < deadline, "the test server did not start"
        time.sleep(0.02)
    server.url = f"http://127.0.0.1:{port}"
    yield server
    runner.should_exit = True
    thread.join(timeout=10)


def test_every_request_is_counted_once_and_429s_are_failures(fake_server):
    prompts = [f"prompt {index}" + (" reject" if index % 5 == 0 else "") for index in range(12)]  # 3 rejected
    fake_server.received.clear()
    levels = run_load_test(fake_server.url, prompts, [1, 4], max_tokens=8, show_progress=False)
    assert fake_server.received == Counter({prompt: 2 for prompt in prompts})  # each prompt sent once per level
    for level, concurrency in zip(levels, [1, 4]):
        assert (level.concurrency, level.num_requests, level.completed, level.failed) == (concurrency, 12, 9, 3)
        assert level.errors == {"HTTP 429: server busy": 3}
        assert level.output_tokens == 9 * TOKENS_PER_REPLY  # from usage.completion_tokens
        # the server slept before each reply and between chunks: latencies are at least that (never at most)
        assert level.ttft_ms["median"] >= FIRST_DELAY_S * 1000 and level.itl_ms["median"] >= CHUNK_DELAY_S * 1000
        assert level.e2el_ms["mean"] > level.ttft_ms["mean"] and level.tpot_ms["mean"] > 0
    assert fake_server.most_in_flight <= 4


def test_concurrency_bounds_requests_in_flight(fake_server):
    fake_server.most_in_flight = 0
    levels = run_load_test(fake_server.url, [f"q{i}" for i in range(8)], [2], endpoint="/v1/completions",
                           show_progress=False)
    assert levels[0].completed == 8 and fake_server.most_in_flight <= 2


def test_poisson_rate_spreads_the_sends(fake_server):
    """At 20 requests/s, 10 requests take at least the 9 gaps' sum, which the seed fixes."""
    levels = run_load_test(fake_server.url, [f"r{i}" for i in range(10)], [10], request_rate=20.0, seed=3,
                           show_progress=False)
    assert levels[0].completed == 10 and levels[0].duration_s >= poisson_arrivals(10, 20.0, seed=3)[-1]


def test_cli_writes_table_json_and_plot(fake_server, tmp_path, capsys):
    data = write_jsonl(tmp_path / "prompts.jsonl", [{"text": "hello"}, {"text": "please reject"}, {"text": "hi"}])
    code, out, err = run_cli(capsys, "bench", "serve", "--url", fake_server.url, "--concurrency", "1,2",
                             "--num_requests", "6", "--data", str(data), "--text_field", "text", "--request_rate", "inf",
                             "--output", str(tmp_path / "out"))
    assert code == 0, err
    report = json.loads((tmp_path / "out" / "results.json").read_text())
    assert [level["concurrency"] for level in report["levels"]] == [1, 2]
    assert all(level["completed"] == 4 and level["failed"] == 2 for level in report["levels"])
    assert report["setup"]["request_rate"] is None  # inf
    table = (tmp_path / "out" / "results.md").read_text()
    assert "| 2 | 4 | 2 |" in table and "failed 4x: HTTP 429: server busy" in table and table.strip() in out
    assert (tmp_path / "out" / "results.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_builtin_prompts_are_read_from_the_shared_data():
    from llmkit.commands.bench_serve import load_prompts

    prompts = load_prompts("sst2", "prompt", 3)
    assert len(prompts) == 3 and all(p.startswith("Is the sentiment") and len(p) > 40 for p in prompts)
    dialogues = load_prompts("dialogsum", "prompt", 60)  # 50 dialogues, reused in order
    assert dialogues[50] == dialogues[0] and "#Person1#" in dialogues[0]


@pytest.mark.parametrize(("argv", "message"), [
    (["--url", "ftp://127.0.0.1:1"], "--url 'ftp://127.0.0.1:1' is not an http(s) URL"),
    (["--url", "http://127.0.0.1:{closed}"], "cannot reach the server at --url http://127.0.0.1:"),
    (["--concurrency", "1,x"], "--concurrency '1,x' must be comma-separated integers >= 1"),
    (["--data", "missing.jsonl"], "--data 'missing.jsonl' is neither a file nor a built-in set"),
    (["--request_rate", "0"], "--request_rate '0' must be a number > 0"),
])
def test_bad_input_is_one_line(argv, message, capsys, tmp_path):
    argv = [arg.format(closed=free_port()) for arg in argv]
    code, out, err = run_cli(capsys, "bench", "serve", *argv, "--output", str(tmp_path))
    assert code == 2 and message in err and "Traceback" not in err and len(err.strip().splitlines()) == 1, err


def test_unknown_endpoint_is_refused():
    with pytest.raises(LlmkitError, match=r"--endpoint '/v1/embeddings' must be one of"):
        run_load_test("http://127.0.0.1:1", ["a"], [1], endpoint="/v1/embeddings", show_progress=False)
