"""`GET /metrics`: the server's counters in Prometheus' text format (version 0.0.4), written by hand (no client
library), under vLLM's metric names and buckets so dashboards built for vLLM read llmkit unchanged.

    vllm:time_to_first_token_seconds   histogram  request arrival -> first token of a choice
    vllm:inter_token_latency_seconds   histogram  between two tokens of one choice
    vllm:e2e_request_latency_seconds   histogram  request arrival -> its last choice finished
    vllm:num_requests_running / _waiting, vllm:kv_cache_usage_perc (0-1)             gauges, read from the engine
    vllm:prefix_cache_queries_total / _hits_total (prompt tokens looked up / reused)  counters, read from the engine
    vllm:spec_decode_num_drafts_total / _num_draft_tokens_total / _num_accepted_tokens_total
                      (speculative decoding: rows that proposed, tokens proposed, tokens accepted)  counters, engine
    vllm:prompt_tokens_total, vllm:generation_tokens_total                            counters
    vllm:request_success_total{finished_reason="stop"|"length"|"abort"}               counter

Every series carries the label model_name, as vLLM's do. A histogram is cumulative: bucket `le` counts the
observations <= le, `+Inf` equals `_count`.
"""

from __future__ import annotations

import threading
from bisect import bisect_left
from collections.abc import Sequence
from typing import Any

# vLLM's bucket boundaries (vllm/v1/metrics/buckets.py), in seconds.
TIME_TO_FIRST_TOKEN_BUCKETS = (0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5,
                               10.0, 20.0, 40.0, 80.0, 160.0, 640.0, 2560.0)
INTER_TOKEN_LATENCY_BUCKETS = (0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0,
                               20.0, 40.0, 80.0)
REQUEST_LATENCY_BUCKETS = (0.3, 0.5, 0.8, 1.0, 1.5, 2.0, 2.5, 5.0, 10.0, 15.0, 20.0, 30.0, 40.0, 50.0, 60.0, 120.0,
                           240.0, 480.0, 960.0, 1920.0, 7680.0)
FINISHED_REASONS = ("stop", "length", "abort")  # vLLM's label values; a cancelled request counts as "abort"
CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"


class Histogram:
    """Counts per bucket (not cumulative inside; summed when written), plus the sum and count of observations."""

    def __init__(self, name: str, help_text: str, buckets: Sequence[float]) -> None:
        self.name, self.help_text, self.buckets = name, help_text, tuple(buckets)
        self.counts = [0] * (len(self.buckets) + 1)  # the last one is +Inf
        self.sum, self.count = 0.0, 0

    def observe(self, value: float) -> None:
        self.counts[bisect_left(self.buckets, value)] += 1  # le is inclusive: value == bound lands in that bucket
        self.sum += value
        self.count += 1

    def lines(self, labels: str) -> list[str]:
        out = [f"# HELP {self.name} {self.help_text}", f"# TYPE {self.name} histogram"]
        running = 0
        for bound, count in zip((*self.buckets, float("inf")), self.counts):
            running += count
            le = "+Inf" if bound == float("inf") else repr(float(bound))
            out.append(f'{self.name}_bucket{{{labels},le="{le}"}} {running}')
        out += [f"{self.name}_sum{{{labels}}} {self.sum!r}", f"{self.name}_count{{{labels}}} {self.count}"]
        return out


class ServerMetrics:
    """What the HTTP layer observes per request; `render(stats)` adds the engine's gauges and prefix-cache counts."""

    def __init__(self, model_name: str) -> None:
        self.labels = f'model_name="{_escape(model_name)}"'
        self.lock = threading.Lock()
        self.ttft = Histogram("vllm:time_to_first_token_seconds", "Histogram of time to first token in seconds.",
                              TIME_TO_FIRST_TOKEN_BUCKETS)
        self.itl = Histogram("vllm:inter_token_latency_seconds", "Histogram of inter-token latency in seconds.",
                             INTER_TOKEN_LATENCY_BUCKETS)
        self.e2e = Histogram("vllm:e2e_request_latency_seconds", "Histogram of e2e request latency in seconds.",
                             REQUEST_LATENCY_BUCKETS)
        self.prompt_tokens = 0
        self.generation_tokens = 0
        self.finished = dict.fromkeys(FINISHED_REASONS, 0)

    def first_token(self, seconds: float) -> None:
        with self.lock:
            self.ttft.observe(seconds)

    def next_token(self, seconds: float) -> None:
        with self.lock:
            self.itl.observe(seconds)

    def request_done(self, seconds: float, prompt_tokens: int, generation_tokens: int, finish_reasons: list[str]) -> None:
        """One HTTP request answered; each of its choices counts in request_success_total by how it ended."""
        with self.lock:
            self.e2e.observe(seconds)
            self.prompt_tokens += prompt_tokens
            self.generation_tokens += generation_tokens
            for reason in finish_reasons:
                self.finished[reason if reason in ("stop", "length") else "abort"] += 1

    def render(self, stats: Any) -> str:
        """The whole exposition; `stats` is the engine's EngineStats (None while the model loads)."""
        labels = self.labels
        gauges = counters = []
        if stats is not None:
            used = stats.kv_tokens_used / stats.kv_tokens_total if stats.kv_tokens_total else 0.0
            gauges = [("vllm:num_requests_running", "Number of requests in model execution batches.", stats.running),
                      ("vllm:num_requests_waiting", "Number of requests waiting to be processed.", stats.waiting),
                      ("vllm:kv_cache_usage_perc", "KV-cache usage. 1 means 100 percent usage.", used)]
            counters = [("vllm:prefix_cache_queries", "Prefix cache queries, in terms of number of queried tokens.",
                         stats.prefix_cache_queries),
                        ("vllm:prefix_cache_hits", "Prefix cache hits, in terms of number of cached tokens.",
                         stats.prefix_cache_hits),
                        ("vllm:spec_decode_num_drafts", "Number of spec decoding drafts.", stats.spec_drafts),
                        ("vllm:spec_decode_num_draft_tokens", "Number of draft tokens.", stats.spec_draft_tokens),
                        ("vllm:spec_decode_num_accepted_tokens", "Number of accepted tokens.",
                         stats.spec_accepted_tokens)]
        out: list[str] = []
        for name, help_text, value in gauges:
            out += [f"# HELP {name} {help_text}", f"# TYPE {name} gauge", f"{name}{{{labels}}} {float(value)!r}"]
        with self.lock:
            counters = [*counters,
                        ("vllm:prompt_tokens", "Number of prefill tokens processed.", self.prompt_tokens),
                        ("vllm:generation_tokens", "Number of generation tokens processed.", self.generation_tokens)]
            for name, help_text, value in counters:
                out += [f"# HELP {name}_total {help_text}", f"# TYPE {name}_total counter",
                        f"{name}_total{{{labels}}} {float(value)!r}"]
            name = "vllm:request_success_total"
            out += [f"# HELP {name} Count of successfully processed requests.", f"# TYPE {name} counter"]
            out += [f'{name}{{{labels},finished_reason="{reason}"}} {float(count)!r}'
                    for reason, count in self.finished.items()]
            for histogram in (self.ttft, self.itl, self.e2e):
                out += histogram.lines(labels)
        return "\n".join(out) + "\n"


def _escape(value: str) -> str:
    """A label value as the text format wants it: backslash, double quote and newline escaped."""
    return value.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")
