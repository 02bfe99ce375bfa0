"""The engine's throughput levers keep a request's tokens: decode rows go in slot order so the cache is read as one
slice (llmkit/serve/engine.py)."""

from __future__ import annotations

import pytest
import torch

from llmkit.generate import generate_tokens
from llmkit.nn.attention import RowKVCache
from llmkit.serve import Engine, Request
from tests.helpers import tiny_decoder

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def model() -> torch.nn.Module:
    return tiny_decoder()  # tiny-llama: vocabulary 256, context 256, RoPE, GQA


def prompt(length: int, seed: int) -> list[int]:
    return torch.randint(0, 256, (length,), generator=torch.Generator().manual_seed(seed)).tolist()


def alone(model: torch.nn.Module, ids: list[int], max_new_tokens: int) -> list[int]:
    return [step[0] for step in generate_tokens(model, ids, max_new_tokens) if step[0] is not None]


def run_to_end(engine: Engine) -> None:
    for _ in range(1000):
        if not engine.stats().running and not engine.stats().waiting:
            return
        engine.step()
    raise AssertionError("engine still busy after 1000 steps")


def test_decode_reads_rows_in_slot_order_and_keeps_each_requests_tokens(model, monkeypatch):
    calls = []
    rows = RowKVCache.rows
    monkeypatch.setattr(RowKVCache, "rows", lambda self, ids, starts: (calls.append(list(ids)), rows(self, ids, starts))[1])
    prompts = [prompt(6 + index, 10 + index) for index in range(4)]
    lengths = [2, 9, 9, 9]  # the first request ends early; a fifth takes its slot (row 0) while rows 1-3 decode
    engine = Engine(model, max_batch_size=4, prefix_cache=False)
    handles = [engine.submit(Request(ids, n)) for ids, n in zip(prompts, lengths)]
    late = prompt(7, 20)
    handles.append(engine.submit(Request(late, 6)))
    run_to_end(engine)
    decode_calls = [ids for ids in calls if len(ids) > 1]
    assert [0, 1, 2, 3] in decode_calls  # the fifth request (row 0, joined last) decodes with the others, in order
    assert all(ids == sorted(ids) for ids in decode_calls)
    for handle, ids, n in zip(handles, prompts + [late], lengths + [6]):
        assert [event.token_id for event in handle.events_ready()] == alone(model, ids, n)
