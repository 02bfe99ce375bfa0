"""The serving engine against `generate_tokens` run alone (the reference: batching must not change a request's
tokens) and against log-softmax / OpenAI's penalty formula computed offline with full forwards.

Most tests drive the engine one `step()` at a time in the test's thread, so what happens at each step is asserted
from the step counter and the events, never from wall-clock time; a few run its background thread."""

from __future__ import annotations

import asyncio

import pytest
import torch

from llmkit import LlmkitError
from llmkit.checkpoints import default_model_path, load_model
from llmkit.generate import SamplingSettings, generate_tokens
from llmkit.serve import Engine, EngineClosedError, QueueFullError, Request, TokenEvent
from llmkit.serve.active import apply_openai_penalties
from tests.helpers import tiny_decoder

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def model() -> torch.nn.Module:
    return tiny_decoder()  # tiny-llama: vocabulary 256, context 256, RoPE, GQA


def random_prompt(length: int, seed: int, vocab: int = 256) -> list[int]:
    return torch.randint(0, vocab, (length,), generator=torch.Generator().manual_seed(seed)).tolist()


def alone(model: torch.nn.Module, prompt: list[int], max_new_tokens: int, **kwargs) -> list[int]:
    """The reference: one request through the plain decode loop."""
    return [step[0] for step in generate_tokens(model, prompt, max_new_tokens, **kwargs) if step[0] is not None]


def run_to_end(engine: Engine, max_steps: int = 1000) -> None:
    for _ in range(max_steps):
        stats = engine.stats()
        if not stats.running and not stats.waiting:
            return
        engine.step()
    raise AssertionError(f"engine still busy after {max_steps} steps")


def tokens_of(events: list[TokenEvent]) -> list[int]:
    return [event.token_id for event in events if event.token_id is not None]


# --- continuous batching -----------------------------------------------------------------------------------------


@pytest.mark.parametrize("preset", ["tiny-llama", "tiny-gpt2"])  # RoPE per row; learned positions per row
def test_batched_greedy_tokens_equal_each_request_alone(preset):
    model = tiny_decoder(preset)
    prompts = [random_prompt(length, seed) for seed, length in enumerate((3, 17, 40, 5, 64, 9, 100, 1))]
    expected = [alone(model, prompt, 12) for prompt in prompts]
    engine = Engine(model, max_batch_size=8, prefill_chunk=32)
    handles = [engine.submit(Request(prompt, 12)) for prompt in prompts[:4]]
    for _ in range(3):  # the other four join while the first ones decode
        engine.step()
    handles += [engine.submit(Request(prompt, 12)) for prompt in prompts[4:]]
    run_to_end(engine)
    events = [handle.events_ready() for handle in handles]
    assert [tokens_of(row) for row in events] == expected
    assert all(row[-1].finish_reason == "length" and len(row) == 12 for row in events)


def test_sliding_window_qk_norm_model_batched_equals_alone():
    """Gemma 3's attention (local layers with their own RoPE base and a 6-token window, QK-norm, sandwich norms): rows
    of the engine's per-row cache see only their window, as the plain loop's cache does; prompts span many windows."""
    model = tiny_decoder(n_layers=3, layer_types=("local", "local", "global"), sliding_window=6, rope_local_theta=500.0,
                         qk_norm=True, post_norms=True)
    prompts = [random_prompt(length, seed) for seed, length in enumerate((2, 23, 40, 9))]
    expected = [alone(model, prompt, 10) for prompt in prompts]
    engine = Engine(model, max_batch_size=4, prefill_chunk=16)
    handles = [engine.submit(Request(prompt, 10)) for prompt in prompts]
    run_to_end(engine)
    assert [tokens_of(handle.events_ready()) for handle in handles] == expected


def test_bf16_model_keeps_a_bf16_cache_and_the_plain_loops_tokens():
    model = tiny_decoder().to(torch.bfloat16)
    prompts = [random_prompt(length, 70 + length) for length in (4, 19, 33)]
    engine = Engine(model)
    handles = [engine.submit(Request(prompt, 10)) for prompt in prompts]
    run_to_end(engine)
    assert engine.slots.cache.keys[0].dtype == torch.bfloat16
    # Same bf16 weights and kernels, masks instead of padding: greedy tokens agree (checked over 10 seeds; a near
    # tie in bf16 could flip one, which would show as a failure here, not a silent pass).
    assert [tokens_of(handle.events_ready()) for handle in handles] == [alone(model, p, 10) for p in prompts]


def test_background_thread_serves_concurrent_requests_and_async_iteration(model):
    prompts = [random_prompt(length, 10 + length) for length in (4, 30, 11)]
    engine = Engine(model, max_batch_size=2)  # three requests, two slots: one waits for a free slot
    engine.start()
    handles = [engine.submit(Request(prompt, 8)) for prompt in prompts]
    assert [tokens_of(list(handle.events(timeout=60))) for handle in handles] == [alone(model, p, 8) for p in prompts]

    async def stream() -> list[int]:
        handle = engine.submit(Request(prompts[1], 8))
        return [event.token_id async for event in handle]

    assert asyncio.run(stream()) == alone(model, prompts[1], 8)
    engine.shutdown(timeout=60)


def test_stop_id_ends_with_a_tokenless_stop_event(model):
    prompt = random_prompt(20, 3)
    reference = alone(model, prompt, 10)
    stop = reference[4]
    engine = Engine(model)
    handle = engine.submit(Request(prompt, 10, stop_ids=frozenset({stop})))
    run_to_end(engine)
    events = handle.events_ready()
    assert tokens_of(events) == reference[: reference.index(stop)]
    assert events[-1] == TokenEvent(None, finish_reason="stop")


# --- sampling, penalties, log-probs ---------------------------------------------------------------------------------


def test_seeded_sampling_gives_the_same_tokens_alone_and_in_a_batch(model):
    settings = SamplingSettings(temperature=0.9, top_k=40, top_p=0.95, seed=7)
    prompt = random_prompt(15, 4)
    expected = alone(model, prompt, 16, settings=settings)
    engine = Engine(model)
    others = [engine.submit(Request(random_prompt(9 + i, 20 + i), 16, SamplingSettings(temperature=1.0, seed=i)))
              for i in range(3)]
    engine.step()
    handle = engine.submit(Request(prompt, 16, settings))
    run_to_end(engine)
    assert tokens_of(handle.events_ready()) == expected
    assert all(len(other.events_ready()) == 16 for other in others)


def offline_greedy(model, prompt, max_new_tokens, adjust) -> tuple[list[int], list[torch.Tensor]]:
    """Greedy tokens with a full forward per step (no cache); `adjust(logits, generated)` changes the logits; also
    returns each step's raw logits."""
    generated, raw = [], []
    with torch.inference_mode():
        for _ in range(max_new_tokens):
            logits = model(torch.tensor([prompt + generated]))[0, -1].float()
            raw.append(logits)
            generated.append(int(adjust(logits, generated).argmax()))
    return generated, raw


def test_presence_and_frequency_penalties_follow_openais_formula(model):
    prompt, presence, frequency = random_prompt(12, 5), 0.6, 0.4

    def openai(logits: torch.Tensor, generated: list[int]) -> torch.Tensor:
        counts = torch.bincount(torch.tensor(generated, dtype=torch.long), minlength=logits.shape[0]).float()
        return logits - presence * (counts > 0).float() - frequency * counts

    expected, _ = offline_greedy(model, prompt, 20, openai)
    assert expected != alone(model, prompt, 20)  # the penalties matter for this prompt
    engine = Engine(model)
    handle = engine.submit(Request(prompt, 20, presence_penalty=presence, frequency_penalty=frequency))
    run_to_end(engine)
    assert tokens_of(handle.events_ready()) == expected
    logits, counts = torch.tensor([1.0, 2.0, 3.0]), torch.tensor([0.0, 1.0, 3.0])
    assert apply_openai_penalties(logits, counts, 0.5, 0.25).tolist() == [1.0, 2.0 - 0.75, 3.0 - 1.25]


def test_repetition_penalty_matches_the_plain_decode_loop(model):
    prompt, settings = random_prompt(12, 6), SamplingSettings(repetition_penalty=1.5)
    engine = Engine(model)
    handle = engine.submit(Request(prompt, 16, settings))
    run_to_end(engine)
    assert tokens_of(handle.events_ready()) == alone(model, prompt, 16, settings=settings)


def test_logprobs_are_the_log_softmax_of_the_raw_logits_and_top_k_the_largest(model):
    prompt = random_prompt(25, 8)
    generated, raw = offline_greedy(model, prompt, 6, lambda logits, _: logits)
    engine = Engine(model)
    engine.submit(Request(random_prompt(7, 9), 6))  # another row in the batch
    handle = engine.submit(Request(prompt, 6, logprobs=5))
    run_to_end(engine)
    events = handle.events_ready()
    assert tokens_of(events) == generated
    for event, logits in zip(events, raw):
        log_probs = logits.log_softmax(-1)
        assert event.logprob == pytest.approx(float(log_probs[event.token_id]), abs=1e-4)
        top = log_probs.topk(5)
        assert [token for token, _ in event.top_logprobs] == top.indices.tolist()
        assert [value for _, value in event.top_logprobs] == pytest.approx(top.values.tolist(), abs=1e-4)


class OnlyEvenTokens:
    """A TokenConstraint: even ids only; the "document" is complete after three tokens."""

    def __init__(self) -> None:
        self.output: list[int] = []

    def pick(self, logits, settings, generator) -> int:
        allowed = logits.clone()
        allowed[1::2] = float("-inf")
        return int(allowed.argmax())

    def advance(self, token_id: int) -> None:
        self.output.append(token_id)

    @property
    def complete(self) -> bool:
        return len(self.output) == 3


class Broken(OnlyEvenTokens):
    def pick(self, logits, settings, generator) -> int:
        raise RuntimeError("grammar\nexploded")


def test_constraint_picks_each_token_and_ends_the_request_when_complete(model):
    engine = Engine(model)
    constraint = OnlyEvenTokens()
    handle = engine.submit(Request(random_prompt(10, 11), 20, constraint=constraint))
    broken = engine.submit(Request(random_prompt(10, 12), 20, constraint=Broken()))
    plain = engine.submit(Request(random_prompt(10, 13), 5))
    run_to_end(engine)
    events = handle.events_ready()
    assert tokens_of(events) == constraint.output and all(token % 2 == 0 for token in constraint.output)
    assert [event.finish_reason for event in events] == [None, None, "stop"]
    failed = broken.events_ready()
    assert failed == [TokenEvent(None, finish_reason="error", error="RuntimeError: grammar exploded")]
    assert tokens_of(plain.events_ready()) == alone(model, random_prompt(10, 13), 5)  # the engine went on serving


# --- chunked prefill, prefix cache ------------------------------------------------------------------------------


def test_chunked_prefill_keeps_running_requests_decoding_every_step(model):
    short, long = random_prompt(5, 14), random_prompt(50, 15)
    engine = Engine(model, prefill_chunk=16)
    running = engine.submit(Request(short, 30))
    engine.step()
    assert len(running.events_ready()) == 1  # prefilled and produced its first token
    reading = engine.submit(Request(long, 6))
    for step in range(4):  # 50 prompt tokens in chunks of 16, 16, 16, 2
        before = engine.stats().steps
        engine.step()
        assert engine.stats().steps == before + 1
        assert len(running.events_ready()) == 1  # one token per step while the long prompt prefills
        assert len(reading.events_ready()) == (1 if step == 3 else 0)
    run_to_end(engine)
    engine_tokens = [step[0] for step in generate_tokens(model, long, 6)]
    rest = reading.events_ready()
    assert len(rest) == 5 and tokens_of(rest) == engine_tokens[1:]  # unchunked reference


def test_prefix_cache_reuses_a_finished_requests_keys_values(model):
    shared = random_prompt(60, 16)
    first, second = shared + random_prompt(4, 17), shared + random_prompt(7, 18)
    engine = Engine(model, max_batch_size=2)
    engine.submit(Request(first, 4))
    run_to_end(engine)
    handle = engine.submit(Request(second, 8))
    run_to_end(engine)
    stats = engine.stats()
    assert stats.prefix_cache_hits == 60 and stats.prefix_cache_queries == len(first) + len(second)
    assert tokens_of(handle.events_ready()) == alone(model, second, 8)


def test_prefix_cache_copies_a_running_requests_prefix(model):
    shared = random_prompt(40, 19)
    engine = Engine(model, max_batch_size=3)
    running = engine.submit(Request(shared + [1, 2, 3], 20))
    engine.step()
    follower = engine.submit(Request(shared + [9], 6))
    same = engine.submit(Request(shared + [1, 2, 3], 6))  # the whole prompt is shared: its last token is computed
    run_to_end(engine)
    assert engine.stats().prefix_cache_hits == 40 + 42
    assert tokens_of(follower.events_ready()) == alone(model, shared + [9], 6)
    assert tokens_of(same.events_ready()) == alone(model, shared + [1, 2, 3], 6)
    assert tokens_of(running.events_ready()) == alone(model, shared + [1, 2, 3], 20)


def test_identical_prompts_arriving_together_compute_their_prefix_once(model):
    prompt = random_prompt(45, 21)
    engine = Engine(model, prefill_chunk=64)
    handles = [engine.submit(Request(prompt, 5)) for _ in range(3)]  # OpenAI's n=3
    engine.step()
    assert engine.stats().prefix_cache_hits == 2 * 44  # the second and third copy the first's keys/values
    run_to_end(engine)
    assert [tokens_of(handle.events_ready()) for handle in handles] == [alone(model, prompt, 5)] * 3


def test_without_prefix_cache_nothing_is_looked_up(model):
    prompt = random_prompt(30, 20)
    engine = Engine(model, prefix_cache=False)
    for _ in range(2):
        handle = engine.submit(Request(prompt, 4))
        run_to_end(engine)
        assert tokens_of(handle.events_ready()) == alone(model, prompt, 4)
    assert engine.stats().prefix_cache_hits == 0 == engine.stats().prefix_cache_queries


def test_a_failing_forward_ends_its_requests_with_an_error_and_the_engine_goes_on(model, monkeypatch):
    engine = Engine(model)
    handles = [engine.submit(Request(random_prompt(8, 60 + i), 10)) for i in range(2)]
    engine.step()  # both prefilled: they decode together at the next step

    def lost(*args, **kwargs):
        raise RuntimeError("device\nlost")

    monkeypatch.setattr(engine, "model", lost)
    engine.step()
    monkeypatch.undo()
    for handle in handles:
        assert handle.events_ready()[-1] == TokenEvent(None, finish_reason="error", error="RuntimeError: device lost")
    assert engine.stats().running == 0 and engine.slots.free_slots() == engine.max_batch_size
    after = engine.submit(Request(random_prompt(8, 62), 4))
    run_to_end(engine)
    assert tokens_of(after.events_ready()) == alone(model, random_prompt(8, 62), 4)


def test_a_bug_in_the_step_loop_fails_waiting_consumers_instead_of_hanging_them(model, monkeypatch):
    engine = Engine(model)
    monkeypatch.setattr(engine, "_admit", lambda: 1 / 0)
    engine.start()
    handle = engine.submit(Request([1, 2, 3], 4))
    assert list(handle.events(timeout=30)) == [
        TokenEvent(None, finish_reason="error", error="ZeroDivisionError: division by zero")]
    engine.shutdown(timeout=30)


# --- admission, cancellation, queue, shutdown, refusals -------------------------------------------------------------


def test_admission_waits_until_prompt_and_new_tokens_fit_the_kv_budget(model):
    engine = Engine(model, kv_cache_tokens=100)
    first = engine.submit(Request(random_prompt(40, 21), 20))  # 60 tokens reserved
    second = engine.submit(Request(random_prompt(30, 22), 20))  # 50 more would be 110 > 100
    engine.step()
    assert (engine.stats().running, engine.stats().waiting) == (1, 1)
    assert engine.stats().kv_tokens_used == 40 and engine.stats().kv_tokens_total == 100
    first_events = []
    while engine.stats().waiting:
        first_events += first.events_ready()
        engine.step()
    assert first_events[-1].finish_reason == "length"  # admitted only once the first one ended
    run_to_end(engine)
    assert tokens_of(second.events_ready()) == alone(model, random_prompt(30, 22), 20)


def test_cancel_frees_the_slot_within_one_step(model):
    engine = Engine(model, max_batch_size=2)
    handle = engine.submit(Request(random_prompt(10, 23), 100))
    queued = [engine.submit(Request(random_prompt(5, 24 + i), 10)) for i in range(2)]
    engine.step()
    engine.step()
    assert engine.stats().running == 2
    handle.cancel()
    queued[1].cancel()
    engine.step()
    stats = engine.stats()
    assert stats.running == 1 and stats.waiting == 0
    assert handle.events_ready()[-1] == TokenEvent(None, finish_reason="cancelled")
    assert queued[1].events_ready() == [TokenEvent(None, finish_reason="cancelled")]
    assert engine.slots.free_slots() == 1


def test_a_full_queue_refuses_and_shutdown_finishes_in_flight(model):
    engine = Engine(model, max_queue=2)
    handles = [engine.submit(Request(random_prompt(6, 30 + i), 5)) for i in range(2)]
    with pytest.raises(QueueFullError, match=r"2 requests already wait \(max_queue=2\)"):
        engine.submit(Request([1, 2], 5))
    engine.start()
    engine.shutdown(timeout=60)
    assert [event.finish_reason for event in handles[0].events(timeout=1)][-1] == "length"
    assert len(list(handles[1].events(timeout=1))) == 5
    with pytest.raises(EngineClosedError, match="shutting down"):
        engine.submit(Request([1, 2], 5))


def test_shutdown_can_cancel_running_requests(model):
    engine = Engine(model)
    handle = engine.submit(Request(random_prompt(6, 40), 200))
    engine.step()
    engine.shutdown(cancel_running=True)
    assert handle.events_ready()[-1].finish_reason == "cancelled"


@pytest.mark.parametrize(
    ("request_", "message"),
    [
        (Request([], 5), r"^prompt is empty \(0 tokens\)"),
        (Request([1, 256], 5), r"^prompt holds token id 256, outside tiny-llama's vocabulary of 256 ids"),
        (Request([1] * 250, 10), r"^prompt of 250 tokens \+ max_new_tokens=10 is 260 tokens, over tiny-llama's "
                                 r"context of 256; shorten the prompt or ask for at most 6 new tokens$"),
        (Request([1] * 50, 60), r"over the engine's kv_cache_tokens=100; ask for fewer tokens or raise"),
        (Request([1], 5, logprobs=21), r"^logprobs=21 must be an integer from 0 to 20"),
        (Request([1], 0), r"^max_new_tokens=0 must be an integer >= 1$"),
        (Request([1], 5, frequency_penalty=2.5), r"^frequency_penalty=2.5 must be a number from -2.0 to 2.0"),
    ],
)
def test_bad_requests_are_refused_at_submit_with_one_line(model, request_, message):
    engine = Engine(model, kv_cache_tokens=100)
    with pytest.raises(LlmkitError, match=message) as error:
        engine.submit(request_)
    assert "\n" not in str(error.value)
    assert engine.stats().waiting == 0


# --- real weights ----------------------------------------------------------------------------------------------------


@pytest.mark.slow
def test_smollm2_concurrent_greedy_requests_equal_each_alone():
    model = load_model(default_model_path())
    prompts = [random_prompt(length, 50 + length, vocab=model.config.vocab_size) for length in (5, 23, 12, 30)]
    expected = [alone(model, prompt, 8) for prompt in prompts]
    engine = Engine(model, max_batch_size=4)
    engine.start()
    handles = [engine.submit(Request(prompt, 8)) for prompt in prompts]
    assert [tokens_of(list(handle.events(timeout=120))) for handle in handles] == expected
    engine.shutdown(timeout=60)


def test_run_steps_in_the_calling_thread_until_shutdown(model):
    """`Engine.run()` is the loop `start()` runs, in the caller's thread (llmkit serve: the main thread); shutdown from
    another thread lets the requests in flight finish, then run() returns; a second loop is refused."""
    import threading

    prompt = random_prompt(9, seed=5)
    engine = Engine(model, max_batch_size=2)
    handle = engine.submit(Request(prompt, 6))
    runner = threading.Thread(target=engine.run)
    runner.start()
    with pytest.raises(LlmkitError, match="already runs"):
        engine.run()
    engine.shutdown()  # waits for the loop to end, not for the thread that ran it
    runner.join(timeout=60)
    assert not runner.is_alive()
    assert tokens_of(handle.events_ready()) == alone(model, prompt, 6)
