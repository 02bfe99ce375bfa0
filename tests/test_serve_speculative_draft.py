"""A draft model inside the serving engine (llmkit/serve/speculation.py with llmkit.generate.proposers.DraftProposer):
greedy tokens equal the engine without speculation while requests join mid-run, come and go and share prefixes; a
draft equal to the target accepts every proposal (which fails as soon as the draft's row holds keys/values of other
tokens than its slot's); sampled tokens follow the target's exact law (chi-square, as
tests/test_generate_speculative.py does offline); the draft's rows follow cancelled and reused slots.

The engine is driven one `step()` at a time; requests join at chosen steps."""

from __future__ import annotations

import copy
import socket

import pytest
import torch

from llmkit.errors import LlmkitError
from llmkit.generate import SamplingSettings, process_logits
from llmkit.nn.attention import RowKVCache
from llmkit.serve import Engine, Request, TokenEvent
from tests.helpers import byte_tokenizer, cli_status, tiny_decoder
from tests.test_generate_speculative import (
    N_TOKENS,
    P_VALUE_FLOOR,
    SAMPLE_PROMPT,
    VOCAB,
    chi_square_p,
    exact_law,
    small_vocab_model,
)
from tests.test_serve_engine import OnlyEvenTokens, alone, random_prompt, tokens_of
from tests.test_serve_speculative import events_per_step, flat, repeating_prompt

pytestmark = pytest.mark.usefixtures("one_thread")

KV_TOLERANCE = 1e-5  # fp32 keys/values of the same tokens computed in other chunkings / batch shapes


@pytest.fixture(scope="module")
def model() -> torch.nn.Module:
    return tiny_decoder()


@pytest.fixture(scope="module")
def near_draft(model) -> torch.nn.Module:
    """The target with noise on its weights: it agrees with the target on many tokens, not all (both branches of
    the verification run)."""
    draft = copy.deepcopy(model)
    generator = torch.Generator().manual_seed(5)
    with torch.no_grad():
        for parameter in draft.parameters():
            parameter.add_(0.6 * parameter.std() * torch.randn(parameter.shape, generator=generator))
    return draft


def run_with_arrivals(engine: Engine, arrivals: list[tuple[int, Request]], max_steps: int = 1000,
                      ) -> list[list[TokenEvent]]:
    """Submit each request at its step (0: before the first), step the engine to the end; each request's events."""
    events: list[list[TokenEvent]] = [[] for _ in arrivals]
    handles: dict[int, object] = {}
    for step in range(max_steps):
        for index, (at, request) in enumerate(arrivals):
            if at == step:
                handles[index] = engine.submit(request)
        stats = engine.stats()
        if len(handles) == len(arrivals) and not stats.running and not stats.waiting:
            return events
        engine.step()
        for index, handle in handles.items():
            events[index].extend(handle.events_ready())
    raise AssertionError(f"engine still busy after {max_steps} steps")


def assert_draft_rows_follow_slots(engine: Engine, draft: torch.nn.Module) -> None:
    """Every draft row holds the draft's keys/values of its slot's first `length` tokens, and no more."""
    proposer = engine.speculator.draft
    for slot in engine.slots.slots:
        length = proposer.lengths[slot.row]
        assert length <= len(slot.tokens)
        if length == 0:
            continue
        fresh = RowKVCache(draft.config, 1, length, torch.float32, "cpu")
        with torch.inference_mode():
            draft(torch.tensor([slot.tokens[:length]]), cache=fresh.rows([0], [0]))
        for layer in range(draft.config.n_layers):
            torch.testing.assert_close(proposer.cache.keys[layer][slot.row, :, :length], fresh.keys[layer][0],
                                       atol=KV_TOLERANCE, rtol=0)
            torch.testing.assert_close(proposer.cache.values[layer][slot.row, :, :length], fresh.values[layer][0],
                                       atol=KV_TOLERANCE, rtol=0)


def mixed_arrivals() -> list[tuple[int, Request]]:
    """8 requests of different lengths joining over the first steps: greedy ones (one stopped by a stop id), one
    seeded sampled, one JSON-like constrained and one with log-probs (those two never speculate)."""
    prompts = [repeating_prompt(length, seed) for seed, length in enumerate((4, 9, 13, 6, 21, 5))]
    return [(0, Request(prompts[0], 30)), (0, Request(prompts[1], 24)), (2, Request(prompts[2], 19)),
            (3, Request(prompts[3], 27, stop_ids=frozenset({7, 40}))), (5, Request(prompts[4], 16)),
            (6, Request(prompts[5], 22, sampling=SamplingSettings(temperature=0.8, seed=2))),
            (8, Request(random_prompt(10, 21), 20, constraint=OnlyEvenTokens())),
            (9, Request(repeating_prompt(5, 22), 15, logprobs=2))]


def test_greedy_with_a_draft_equals_the_engine_without_while_requests_join(model, near_draft):
    """Prompts of up to 63 tokens prefilled 8 at a time (the draft's row after each chunk of the target's)."""
    plain = run_with_arrivals(Engine(model, max_batch_size=8, prefill_chunk=8), mixed_arrivals())
    engine = Engine(model, max_batch_size=8, prefill_chunk=8, draft=near_draft, num_speculative_tokens=3)
    drafted = run_with_arrivals(engine, mixed_arrivals())
    stats = engine.stats()
    assert 0 < stats.spec_accepted_tokens < stats.spec_draft_tokens and stats.spec_drafts > 0
    for index in (0, 1, 2, 3, 4, 6, 7):  # all but the sampled request: the same tokens and finish reasons
        assert [(event.token_id, event.finish_reason) for event in drafted[index]] == \
            [(event.token_id, event.finish_reason) for event in plain[index]]
    for index, (_, request) in enumerate(mixed_arrivals()[:5]):
        if not request.stop_ids:
            assert tokens_of(drafted[index]) == alone(model, request.prompt_ids, request.max_new_tokens)
    assert len(tokens_of(drafted[5])) == 22 and drafted[5][-1].finish_reason == "length"
    assert_draft_rows_follow_slots(engine, near_draft)


def test_a_draft_equal_to_the_target_accepts_every_proposal(model):
    """Requests that join mid-run, two with one prompt (the second copies the first's prefix, in the draft's rows
    too), and later ones that take over finished slots with a shared prefix: acceptance rate 1 and plain tokens."""
    shared = repeating_prompt(11, 3)
    first = [(0, Request(repeating_prompt(4, 0), 30)), (0, Request(shared, 20)), (0, Request(shared, 25)),
             (4, Request(repeating_prompt(7, 1), 12))]
    plain = run_with_arrivals(Engine(model, max_batch_size=4, prefill_chunk=16), first)
    engine = Engine(model, max_batch_size=4, prefill_chunk=16, draft=copy.deepcopy(model), num_speculative_tokens=4)
    drafted = run_with_arrivals(engine, first)
    assert [tokens_of(events) for events in drafted] == [tokens_of(events) for events in plain]
    # Follow-ups extending finished texts: their slots are taken over at the shared prefix (draft rows cut there).
    follow_ups = [shared + tokens_of(drafted[2])[:9], repeating_prompt(4, 0) + tokens_of(drafted[0])[:20]]
    hits = engine.stats().prefix_cache_hits
    later = run_with_arrivals(engine, [(0, Request(prompt, 14)) for prompt in follow_ups])
    assert [tokens_of(events) for events in later] == [alone(model, prompt, 14) for prompt in follow_ups]
    stats = engine.stats()
    assert stats.prefix_cache_hits - hits >= sum(len(prompt) - 1 for prompt in follow_ups)
    assert stats.spec_draft_tokens > 0 and stats.spec_accepted_tokens == stats.spec_draft_tokens
    assert_draft_rows_follow_slots(engine, engine.speculator.draft.model)


def test_cancelling_a_request_mid_run_hands_its_draft_row_to_the_next_request(model):
    draft = copy.deepcopy(model)
    engine = Engine(model, max_batch_size=2, prefill_chunk=32, draft=draft, num_speculative_tokens=4)
    prompts = [repeating_prompt(6, 8), repeating_prompt(5, 9)]
    handles = [engine.submit(Request(prompt, 60)) for prompt in prompts]
    for _ in range(4):
        engine.step()
    handles[0].cancel()
    engine.step()
    assert handles[0].events_ready()[-1].finish_reason == "cancelled"
    cancelled = next(slot for slot in engine.slots.slots if not slot.busy)
    assert engine.speculator.draft.lengths[cancelled.row] > len(prompts[0])  # it had drafted for the request
    assert_draft_rows_follow_slots(engine, draft)
    # A new request takes the freed slot over at a prefix shorter than what its draft row holds: the row is cut.
    follow_up = cancelled.tokens[:9] + [3, 1, 4]
    handle = engine.submit(Request(follow_up, 20))
    steps = events_per_step(engine, [handles[1], handle])
    assert engine.speculator.draft.lengths[cancelled.row] <= len(cancelled.tokens)
    assert tokens_of(flat(steps[1])) == alone(model, follow_up, 20)
    assert len(tokens_of(flat(steps[0]))) > 0
    stats = engine.stats()
    assert stats.spec_draft_tokens > 0 and stats.spec_accepted_tokens == stats.spec_draft_tokens
    assert_draft_rows_follow_slots(engine, draft)


def test_a_request_too_long_for_the_drafts_context_decodes_without_it(model):
    """A draft of 32 tokens of context (the target's weights): a request of 8 + 16 (+ k = 4) tokens speculates, one
    of 8 + 30 decodes one token a step, both with the plain tokens."""
    short_draft = tiny_decoder(max_seq_len=32)  # seed 0: the target's weights
    prompt = repeating_prompt(4, 5)
    for max_new_tokens, speculates in ((16, True), (30, False)):
        engine = Engine(model, max_batch_size=2, draft=short_draft, num_speculative_tokens=4)
        steps = events_per_step(engine, [engine.submit(Request(prompt, max_new_tokens))])
        assert tokens_of(flat(steps[0])) == alone(model, prompt, max_new_tokens)
        assert (engine.stats().spec_draft_tokens > 0) == speculates


def test_a_sampling_request_follows_the_targets_distribution():
    """P(t1, t2, t3) over many seeded requests equals plain sampling's law from full forwards: t1 from the prefill,
    t2 proposed by a 1-layer draft from its own q and accepted with min(1, p / q) or redrawn from norm(max(0, p - q)),
    t3 the bonus after an accept or the next step's draw."""
    target, draft = small_vocab_model(seed=0), small_vocab_model(seed=7, n_layers=1)
    settings = dict(temperature=0.9, top_k=6)
    engine = Engine(target, max_batch_size=64, max_queue=4000, prefill_chunk=2048, draft=draft,
                    num_speculative_tokens=2)
    handles = [engine.submit(Request(SAMPLE_PROMPT, N_TOKENS, sampling=SamplingSettings(seed=seed, **settings)))
               for seed in range(3000)]
    steps = events_per_step(engine, handles, max_steps=100_000)
    outputs = torch.tensor([tokens_of(flat(row)) for row in steps])  # (requests, 3)
    stats = engine.stats()
    assert 0 < stats.spec_accepted_tokens < stats.spec_draft_tokens  # both branches, accept and reject, ran
    counts = torch.bincount(outputs @ torch.tensor([VOCAB**2, VOCAB, 1]), minlength=VOCAB**N_TOKENS).double()
    assert chi_square_p(counts, exact_law(target, SamplingSettings(**settings))) > P_VALUE_FLOOR
    # The test can tell laws apart: the draft's own law is rejected outright.
    assert chi_square_p(counts, exact_law(draft, SamplingSettings(**settings))) < 1e-6
    # Each request proposed t2 once. The law above holds for any proposal accepted with p(x) alone; the draft's q
    # shows in the acceptance rate, E_t1[sum_x min(p(x | t1), q(x | t1))] (with p(x) alone: E_t1[sum_x p q], lower).
    assert stats.spec_draft_tokens == len(handles)
    rate, (expected, one_hot) = stats.spec_accepted_tokens / stats.spec_draft_tokens, acceptance(target, draft, settings)
    standard_error = (expected * (1 - expected) / len(handles)) ** 0.5
    assert abs(rate - expected) < 4 * standard_error and expected - one_hot > 8 * standard_error


def acceptance(target: torch.nn.Module, draft: torch.nn.Module, settings: dict) -> tuple[float, float]:
    """The expected acceptance rate of the token after t1 ~ p(. | prompt), with min(1, p / q) and with p alone."""
    ids = torch.tensor([SAMPLE_PROMPT + [t1] for t1 in range(VOCAB)])  # (V, P + 1): each possible t1
    with torch.no_grad():
        logits = target(ids)  # (V, P + 1, V)
        first = process_logits(logits[0, -2:-1], SamplingSettings(**settings)).softmax(-1)[0].double()  # (V,) of t1
        p = process_logits(logits[:, -1], SamplingSettings(**settings)).softmax(-1).double()  # (V, V): after t1
        q = process_logits(draft(ids)[:, -1], SamplingSettings(**settings)).softmax(-1).double()
    return float(first @ torch.minimum(p, q).sum(-1)), float(first @ (p * q).sum(-1))


def test_openai_client_gets_the_plain_servers_text_and_metrics_count_drafted_tokens():
    import openai

    from tests.test_serve_http import http_get, serve_tiny

    results, metrics = {}, ""
    for with_draft in (False, True):
        draft = tiny_decoder(max_seq_len=1024) if with_draft else None  # seed 0: the served model's weights
        server, _, _ = serve_tiny(api_key=None, draft=draft, num_speculative_tokens=4)
        try:
            client = openai.OpenAI(base_url=server.url + "/v1", api_key="none", max_retries=0)
            options = dict(model="tiny", prompt="the cat and the hat", max_tokens=40)
            chunks = list(client.completions.create(stream=True, stream_options={"include_usage": True},
                                                    temperature=0, **options))
            text = "".join(chunk.choices[0].text for chunk in chunks if chunk.choices)
            sampled = client.completions.create(n=3, temperature=0.9, seed=1, **options)
            results[with_draft] = (text, chunks[-1].usage.completion_tokens)
            assert [choice.finish_reason for choice in sampled.choices] == ["length"] * 3
            assert sampled.usage.completion_tokens == 3 * 40
            metrics = http_get(server.url + "/metrics")[1]
        finally:
            server.stop()
    assert results[True] == results[False] and results[False][1] == 40
    values = {line.split("{")[0]: float(line.split()[-1]) for line in metrics.splitlines()
              if line.startswith("vllm:spec_decode_num_")}
    assert values["vllm:spec_decode_num_accepted_tokens_total"] > 0
    assert values["vllm:spec_decode_num_draft_tokens_total"] >= values["vllm:spec_decode_num_accepted_tokens_total"]


def test_bad_drafts_are_one_clear_error(model):
    with pytest.raises(LlmkitError, match=r"vocabulary of 128 ids, the target .* 256; a draft must share"):
        Engine(model, draft=tiny_decoder(vocab_size=128))
    with pytest.raises(LlmkitError, match=r"--draft and --speculate ngram are two ways to propose tokens"):
        Engine(model, speculate="ngram", draft=model)
    with pytest.raises(LlmkitError, match=r"--num_speculative_tokens=0 must be an integer >= 1"):
        Engine(model, draft=model, num_speculative_tokens=0)


@pytest.fixture(scope="module")
def model_dirs(tmp_path_factory, model):
    from llmkit.checkpoints import save_model

    root = tmp_path_factory.mktemp("engine-draft")
    save_model(model, root / "target", tokenizer=byte_tokenizer())
    save_model(tiny_decoder(seed=1, vocab_size=260), root / "other", tokenizer=byte_tokenizer(specials=[
        "<a>", "<b>", "<c>", "<d>"]))
    return root


@pytest.mark.parametrize(("draft", "extra", "message"), [
    ("target", ("--speculate", "ngram"), "--draft and --speculate ngram are two ways to propose tokens"),
    ("missing", (), "does not exist; pass a .gguf file or a model directory"),
    ("other", (), "has another tokenizer than --model"),
])
def test_cli_bad_draft_exits_2_with_one_line(capsys, model_dirs, draft, extra, message):
    with socket.socket() as probe:  # a port free right now
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    code, err = cli_status(capsys, "serve", "--model", str(model_dirs / "target"), "--port", str(port),
                           "--draft", str(model_dirs / draft), *extra)
    assert code == 2 and "Traceback" not in err
    # The tokenizer is compared while the model loads, after the "loading" line: the error is the last line, whole.
    last = err.strip().splitlines()[-1]
    assert last.startswith("error: ") and message in last


def test_the_slot_table_moves_the_drafts_rows_with_its_slots(model):
    """Taking over a slot cuts the draft's row to the shared prefix, a prefix copied between slots is copied in the
    draft's rows (not recomputed), and the draft's rows grow with the slots' (up to the draft's context)."""
    from llmkit.generate.proposers import DraftProposer
    from llmkit.serve.kv import SlotTable

    draft = tiny_decoder(seed=1, n_layers=1, max_seq_len=300)
    table, proposer = SlotTable(model, 2, 1024), DraftProposer(draft, model)
    table.follow(proposer)
    prompt = repeating_prompt(11, 3)  # 33 tokens
    first, _ = table.acquire(prompt, 40)
    first.tokens = list(prompt)  # as if prefilled (the target's keys/values do not matter here)
    with torch.inference_mode():
        proposer.catch_up([first.row], {first.row: prompt})
    second, reused = table.acquire(prompt, 40)
    assert reused == 0 and table.extend_prefix(second, prompt) == 32
    assert proposer.lengths[second.row] == 32
    for layer in range(draft.config.n_layers):
        assert torch.equal(proposer.cache.keys[layer][second.row, :, :32], proposer.cache.keys[layer][first.row, :, :32])
    table.release(first)
    taken, reused = table.acquire(prompt[:20] + [1, 2], 40)
    assert taken is first and reused == 20 and proposer.lengths[first.row] == 20
    assert proposer.lengths[second.row] == 32  # the running slot's row is untouched
    table.release(taken)
    table.acquire([5] * 10, 600)  # the slots grow to 768; the draft's rows to its context
    assert table.cache.capacity == 768 and proposer.cache.capacity == 300


@pytest.mark.slow
def test_smollm2_engine_with_its_q4_1_blocks_drafting_equals_the_engine_without():
    """SmolLM2 fp32 (the GGUF dequantized) served with the GGUF's own Q4_1 blocks as the draft: two DialogSum
    summaries in one batch, the same tokens as the engine without a draft, most proposals accepted."""
    import gzip
    import json

    from llmkit.checkpoints import default_model_path, load_tokenizer
    from llmkit.commands.common import load_decoder
    from llmkit.data.shared import shared_data_file
    from llmkit.generate.decode import tokenizer_stop_ids

    path = default_model_path()
    target, draft, tokenizer = load_decoder(path, weights="float"), load_decoder(path), load_tokenizer(path)
    with gzip.open(shared_data_file("dialogsum/dialogsum.dev.jsonl.gz"), "rt", encoding="utf-8") as file:
        dialogues = [json.loads(line)["dialogue"] for line in file.readlines()[1:3]]
    stop_ids = frozenset(tokenizer_stop_ids(tokenizer))
    prompts = [tokenizer.encode(tokenizer.apply_chat_template(
        [{"role": "user", "content": f"Summarise this dialogue.\n\n{dialogue}"}])) for dialogue in dialogues]
    arrivals = [(0, Request(prompts[0], 16, stop_ids=stop_ids)), (2, Request(prompts[1], 16, stop_ids=stop_ids))]
    plain = run_with_arrivals(Engine(target, max_batch_size=2, prefill_chunk=128), arrivals)
    engine = Engine(target, max_batch_size=2, prefill_chunk=128, draft=draft, num_speculative_tokens=4)
    drafted = run_with_arrivals(engine, arrivals)
    assert [tokens_of(events) for events in drafted] == [tokens_of(events) for events in plain]
    stats = engine.stats()
    assert stats.spec_accepted_tokens > 0.8 * stats.spec_draft_tokens > 0
