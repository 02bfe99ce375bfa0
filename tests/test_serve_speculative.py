"""Speculative decoding inside the serving engine (llmkit/serve/speculation.py) against the engine without it and
`generate_tokens` (greedy: the same tokens), and against the exact law of plain sampling computed from full forwards
(sampling: a chi-square test over many seeded requests, as tests/test_generate_speculative.py does offline).

The engine is driven one `step()` at a time, so which tokens arrive in which step is asserted from the events."""

from __future__ import annotations

import copy
import gzip
import json

import pytest
import torch

from llmkit.generate import SamplingSettings
from llmkit.peft.lora import merge_lora
from llmkit.peft.registry import load_adapter
from llmkit.serve import Engine, Request, TokenEvent
from llmkit.serve.adapters import AdapterRegistry
from llmkit.serve.metrics import ServerMetrics
from tests.helpers import random_lora_dir, run_cli, tiny_decoder
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

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def model() -> torch.nn.Module:
    return tiny_decoder()  # tiny-llama: vocabulary 256; its greedy text falls into loops that prompt lookup finds


def repeating_prompt(length: int, seed: int) -> list[int]:
    return random_prompt(length, seed) * 3


def events_per_step(engine: Engine, handles, max_steps: int = 1000) -> list[list[list[TokenEvent]]]:
    """Step the engine to the end; per handle, the events each step delivered (one list per step)."""
    steps: list[list[list[TokenEvent]]] = [[] for _ in handles]
    for _ in range(max_steps):
        stats = engine.stats()
        if not stats.running and not stats.waiting:
            return steps
        engine.step()
        for index, handle in enumerate(handles):
            steps[index].append(handle.events_ready())
    raise AssertionError(f"engine still busy after {max_steps} steps")


def flat(steps: list[list[TokenEvent]]) -> list[TokenEvent]:
    return [event for step in steps for event in step]


def serve(model, requests: list[Request], **options) -> tuple[list[list[list[TokenEvent]]], Engine]:
    engine = Engine(model, max_batch_size=8, prefill_chunk=64, **options)
    handles = [engine.submit(request) for request in requests]
    return events_per_step(engine, handles), engine


def test_greedy_equals_the_engine_without_speculation_and_each_request_alone(model):
    """Requests of different lengths, some stopped by a stop id or max_tokens inside an accepted run, in one batch
    with a seeded sampled request, a constrained one and one asking for log-probs (those decode one token a step)."""
    prompts = [repeating_prompt(length, seed) for seed, length in enumerate((4, 7, 12, 5, 9))]
    loops = [alone(model, prompt, 40) for prompt in prompts[:2]]
    # Where the first request's loop breaks (a token new to its output, after 20): the token after an accepted run.
    stop_at = next(index for index in range(20, 40) if loops[0][index] not in loops[0][:index])
    stop_id = loops[0][stop_at]
    # The second request's prompt + its first 10 tokens: the loop continues, and a stop id the prompt already holds
    # ends the request at an accepted proposed token; the proposed tokens after it are not emitted.
    looping = prompts[1] + loops[1][:10]
    continuation = loops[1][10:]
    loop_stop = continuation[2]  # token 1 comes from the prefill; the next step proposes (and accepts) 2 and 3
    assert loop_stop in looping and continuation.index(loop_stop) == 2

    def requests() -> list[Request]:
        return [Request(prompts[0], 40, stop_ids=frozenset({stop_id})), Request(prompts[1], 23),
                Request(prompts[2], 30), Request(prompts[3], 17), Request(prompts[4], 2),
                Request(random_prompt(12, 20), 12, sampling=SamplingSettings(temperature=0.9, seed=3)),
                Request(random_prompt(10, 21), 20, constraint=OnlyEvenTokens()),
                Request(repeating_prompt(5, 22), 15, logprobs=2),
                Request(looping, 20, stop_ids=frozenset({loop_stop}))]

    plain, _ = serve(model, requests())
    speculative, engine = serve(model, requests(), speculate="ngram", num_speculative_tokens=4)
    stats = engine.stats()
    assert 0 < stats.spec_accepted_tokens < stats.spec_draft_tokens and stats.spec_drafts > 0
    for index in (0, 1, 2, 3, 4, 6, 7, 8):  # every request but the sampled one: the same tokens and finish reasons
        assert [(event.token_id, event.finish_reason) for event in flat(speculative[index])] == \
            [(event.token_id, event.finish_reason) for event in flat(plain[index])]
    # Log-probs from a wider forward (other rows' proposals): equal up to float32 rounding of other matmul shapes.
    for event, reference in zip(flat(speculative[7]), flat(plain[7])):
        assert event.logprob == pytest.approx(reference.logprob, abs=1e-5)
        assert [token for token, _ in event.top_logprobs] == [token for token, _ in reference.top_logprobs]
    assert tokens_of(flat(speculative[0])) == loops[0][:stop_at]
    for index, max_tokens in zip((1, 2, 3, 4), (23, 30, 17, 2)):
        assert tokens_of(flat(speculative[index])) == alone(model, prompts[index], max_tokens)
    assert tokens_of(flat(speculative[8])) == continuation[: continuation.index(loop_stop)]
    # Stop ids and max_tokens ended their requests inside steps that emitted several tokens.
    last = [step for step in speculative[0] if step][-1]
    assert last[-1] == TokenEvent(None, finish_reason="stop") and len(last) > 1
    last = [step for step in speculative[1] if step][-1]
    assert last[-1].finish_reason == "length" and len(last) > 1 and len(flat(speculative[1])) == 23
    # Token 1 from the prefill; then one step: token 2 and the stop id (accepted proposals), nothing after it.
    assert [step for step in speculative[8] if step] == [
        [TokenEvent(continuation[0])], [TokenEvent(continuation[1]), TokenEvent(None, finish_reason="stop")]]
    sampled = flat(speculative[5])
    assert len(sampled) == 12 and sampled[-1].finish_reason == "length"


def test_a_sampling_request_follows_the_targets_distribution():
    """P(t1, t2, t3) over many seeded requests equals plain sampling's law computed from full forwards: t1 comes from
    the prefill; when t1 = 5 the prompt's "5 7 5 7 ..." makes prompt lookup propose 7, accepted with probability
    p(7) or replaced by a draw from p without 7; after an accept t3 is the bonus draw."""
    target = small_vocab_model(seed=0)
    settings = dict(temperature=0.9, top_k=6)
    engine = Engine(target, max_batch_size=64, max_queue=4000, prefill_chunk=2048, speculate="ngram",
                    num_speculative_tokens=2)
    handles = [engine.submit(Request(SAMPLE_PROMPT, N_TOKENS, sampling=SamplingSettings(seed=seed, **settings)))
               for seed in range(3000)]
    steps = events_per_step(engine, handles, max_steps=100_000)
    outputs = torch.tensor([tokens_of(flat(row)) for row in steps])  # (requests, 3)
    stats = engine.stats()
    assert 0 < stats.spec_accepted_tokens < stats.spec_draft_tokens  # both branches, accept and reject, ran
    counts = torch.bincount(outputs @ torch.tensor([VOCAB**2, VOCAB, 1]), minlength=VOCAB**N_TOKENS).double()
    law = exact_law(target, SamplingSettings(**settings))
    assert chi_square_p(counts, law) > P_VALUE_FLOOR
    # The test can tell laws apart: the law at another temperature is rejected outright.
    assert chi_square_p(counts, exact_law(target, SamplingSettings(temperature=1.5, top_k=6))) < 1e-6


def test_lora_adapters_follow_their_rows_through_speculative_steps(tmp_path):
    """Rows for three adapters (ranks 2, 4, 8) and the base in one batch, each proposing a different number of
    tokens: each request's tokens equal its adapter merged into the weights, run alone."""
    base = tiny_decoder()
    paths = {name: random_lora_dir(base, tmp_path / name, rank, seed, std=0.5, targets=("q_proj", "v_proj", "o_proj"))
             for seed, (name, rank) in enumerate(zip(("alpha", "beta", "gamma"), (2, 4, 8)))}
    merged = {name: merge_lora(load_adapter(copy.deepcopy(base), path)).eval() for name, path in paths.items()}
    merged[None] = base
    wanted = ["alpha", None, "beta", "gamma", "alpha", None]
    prompts = [repeating_prompt(3 + index, seed=index) for index in range(len(wanted))]
    model = copy.deepcopy(base)
    engine = Engine(model, adapters=AdapterRegistry(model, paths, 3), max_batch_size=8, prefill_chunk=128,
                    speculate="ngram", num_speculative_tokens=4)
    handles = [engine.submit(Request(prompt, 24, adapter=name)) for prompt, name in zip(prompts, wanted)]
    steps = events_per_step(engine, handles)
    assert [tokens_of(flat(row)) for row in steps] == [alone(merged[name], prompt, 24)
                                                        for prompt, name in zip(prompts, wanted)]
    assert engine.stats().spec_accepted_tokens > 0


def test_metrics_expose_proposed_and_accepted_tokens(model):
    _, engine = serve(model, [Request(repeating_prompt(4, 0), 30)], speculate="ngram", num_speculative_tokens=3)
    stats = engine.stats()
    text = ServerMetrics("tiny").render(stats)
    assert f'vllm:spec_decode_num_draft_tokens_total{{model_name="tiny"}} {float(stats.spec_draft_tokens)!r}' in text
    assert (f'vllm:spec_decode_num_accepted_tokens_total{{model_name="tiny"}} '
            f'{float(stats.spec_accepted_tokens)!r}') in text
    assert stats.spec_accepted_tokens > 0


def test_kv_bookkeeping_stays_exact_for_the_prefix_cache(model):
    """A finished speculative request's slot holds exactly the tokens whose keys/values it computed (rejected
    proposals left none behind): a second request extending that text reuses them and decodes as alone."""
    prompt = repeating_prompt(6, 3)
    first, engine = serve(model, [Request(prompt, 20)], speculate="ngram", num_speculative_tokens=4)
    output = tokens_of(flat(first[0]))
    slot = next(slot for slot in engine.slots.slots if slot.tokens)
    assert slot.tokens == (prompt + output)[: len(slot.tokens)] and len(slot.tokens) >= len(prompt) + len(output) - 1
    follow_up = prompt + output[:15]
    handle = engine.submit(Request(follow_up, 10))
    steps = events_per_step(engine, [handle])
    assert engine.stats().prefix_cache_hits >= len(follow_up) - 1
    assert tokens_of(flat(steps[0])) == alone(model, follow_up, 10)


def test_openai_client_gets_the_same_streamed_text_usage_and_stop_string_cut():
    """Through HTTP: a streamed greedy completion from a server with --speculate equals the plain server's, text and
    usage included; a stop string cuts the text where the plain server does; /metrics shows the accepted tokens."""
    import openai

    from tests.test_serve_http import http_get, serve_tiny

    texts, metrics = {}, ""
    for speculate in (None, "ngram"):
        server, _, _ = serve_tiny(api_key=None, speculate=speculate, num_speculative_tokens=4)
        try:
            client = openai.OpenAI(base_url=server.url + "/v1", api_key="none", max_retries=0)
            options = dict(model="tiny", prompt="the cat and the hat and the cat and the hat and the", max_tokens=48,
                           temperature=0)
            chunks = list(client.completions.create(stream=True, stream_options={"include_usage": True}, **options))
            text = "".join(chunk.choices[0].text for chunk in chunks if chunk.choices)
            stop = text[len(text) // 2 : len(text) // 2 + 3]
            stopped = client.completions.create(stop=[stop], **options)
            texts[speculate] = (text, chunks[-1].usage.completion_tokens, stopped.choices[0].text,
                                stopped.choices[0].finish_reason, stopped.usage.completion_tokens)
            metrics = http_get(server.url + "/metrics")[1]
        finally:
            server.stop()
    assert texts["ngram"] == texts[None] and texts[None][1] == 48 and texts[None][3] == "stop"
    accepted = next(line for line in metrics.splitlines() if line.startswith("vllm:spec_decode_num_accepted_tokens_"))
    assert float(accepted.split()[-1]) > 0


@pytest.mark.parametrize(("flags", "message"), [
    (["--num_speculative_tokens", "0"], "--num_speculative_tokens=0 must be an integer >= 1"),
    (["--speculate", "ngram", "--num_speculative_tokens", "-2"], "--num_speculative_tokens=-2 must be"),
])
def test_cli_bad_speculation_flags_exit_2_with_one_line(capsys, flags, message):
    code, _, err = run_cli(capsys, "serve", "--model", "/nonexistent.gguf", *flags)
    assert code == 2 and err.startswith("error: ") and message in err and len(err.strip().splitlines()) == 1


@pytest.mark.slow
def test_smollm2_engine_with_prompt_lookup_equals_the_engine_without_on_a_summary():
    from llmkit.checkpoints import default_model_path, load_model, load_tokenizer
    from llmkit.data.shared import shared_data_file
    from llmkit.generate.decode import tokenizer_stop_ids

    path = default_model_path()
    model, tokenizer = load_model(path), load_tokenizer(path)
    with gzip.open(shared_data_file("dialogsum/dialogsum.dev.jsonl.gz"), "rt", encoding="utf-8") as file:
        dialogues = [json.loads(line)["dialogue"] for line in file.readlines()[1:3]]
    stop_ids = frozenset(tokenizer_stop_ids(tokenizer))
    prompts = [tokenizer.encode(tokenizer.apply_chat_template(
        [{"role": "user", "content": f"Summarise this dialogue.\n\n{dialogue}"}])) for dialogue in dialogues]
    plain, _ = serve(model, [Request(prompt, 32, stop_ids=stop_ids) for prompt in prompts])
    speculative, engine = serve(model, [Request(prompt, 32, stop_ids=stop_ids) for prompt in prompts],
                                speculate="ngram", num_speculative_tokens=5)
    assert [tokens_of(flat(row)) for row in speculative] == [tokens_of(flat(row)) for row in plain]
    assert engine.stats().spec_accepted_tokens > 0
