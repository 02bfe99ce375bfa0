"""The serving engine: continuous batching of decode steps, chunked prefill, prefix caching, admission control.

Continuous batching (Yu et al. 2022, Orca): one background thread runs a step loop. Requests join the running batch
between steps and leave as soon as they finish, so a short request never waits for a long one; every step runs one
batched forward of one token for all decoding requests, each row at its own length and position (llmkit/serve/kv.py),
then each request picks its token with its own settings (llmkit/serve/sequence.py).

Chunked prefill (Agrawal et al. 2023, Sarathi): a step also prefills at most `prefill_chunk` prompt tokens of the
requests that are still reading their prompts, so a long prompt is spread over several steps and the running
requests keep producing a token every step meanwhile.

Admission: a request waits (FIFO) until a slot is free and its prompt + max_new_tokens fit in what `kv_cache_tokens`
has left; at most `max_queue` wait, beyond that `submit` raises QueueFullError.

Multi-LoRA (S-LoRA, Sheng et al. 2023): with an `AdapterRegistry` (llmkit/serve/adapters.py) a request may name a
LoRA adapter (`Request.adapter`). Requests for different adapters share one decode batch: each forward tells the
model's LoRA layers which adapter each row uses (llmkit.peft.multi_lora.batch_adapters). An adapter loads when its
first request is admitted; a request whose adapter finds no room (every loaded adapter in use) waits.

Speculative decoding (`speculate="ngram"` or `draft=model`, llmkit/serve/speculation.py): a decode step feeds each
row its pending token and up to `num_speculative_tokens` tokens proposed by prompt lookup or by a draft model (whose
KV cache has a row per slot, prefilled chunk by chunk with the target's), and emits every token the row accepts,
each as its own event; greedy output is the same as without it, sampled output has the same distribution.

Here: the caller's side and the scheduling (step, admission, emitting, finishing); the checks of settings and
requests are llmkit/serve/engine_checks.py, the model forwards of a step llmkit/serve/engine_forward.py.

    engine = Engine(model); engine.start()
    handle = engine.submit(Request(prompt_ids=ids, max_new_tokens=32))
    for event in handle.events(): ...        # or `async for event in handle` inside an asyncio loop
    engine.shutdown()
"""

from __future__ import annotations

import asyncio
import itertools
import threading
from collections import deque
from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import dataclass
from typing import Any

import torch

from llmkit.errors import LlmkitError
from llmkit.serve.active import ActiveRequest
from llmkit.serve.engine_checks import check_engine_settings, check_kv_cache_tokens, check_request, one_line
from llmkit.serve.engine_forward import decode_logits, prefill_logits
from llmkit.serve.kv import SlotTable
from llmkit.serve.request import (
    EngineClosedError,
    QueueFullError,
    Request,
    RequestHandle,
    TokenConstraint,
    TokenEvent,
)
from llmkit.serve.speculation import Speculator

__all__ = ["Engine", "EngineClosedError", "EngineStats", "QueueFullError", "Request", "RequestHandle",
           "TokenConstraint", "TokenEvent"]


@dataclass
class EngineStats:
    """A snapshot of the engine's state (Prometheus gauges and counters of an HTTP server)."""

    running: int  # admitted requests (prefilling or decoding)
    waiting: int  # submitted, not yet admitted
    kv_tokens_used: int  # tokens stored for running requests
    kv_tokens_total: int  # the admission budget, kv_cache_tokens
    prefix_cache_queries: int  # prompt tokens looked up in the prefix cache
    prefix_cache_hits: int  # prompt tokens whose keys/values were reused
    steps: int  # steps that ran a forward
    spec_drafts: int = 0  # speculative decoding: row-steps that proposed tokens
    spec_draft_tokens: int = 0  # tokens proposed
    spec_accepted_tokens: int = 0  # of those, the ones accepted


class Engine:
    """Serves many generation requests at once on one decoder model (its device and dtype)."""

    def __init__(
        self, model: torch.nn.Module, *, max_batch_size: int = 8, kv_cache_tokens: int | None = None,
        max_queue: int = 64, prefill_chunk: int = 256, prefix_cache: bool = True, adapters: Any = None,
        speculate: str | None = None, num_speculative_tokens: int = 5, draft: torch.nn.Module | None = None,
    ) -> None:
        check_engine_settings(model.config, max_batch_size, max_queue, prefill_chunk)
        self.model = model.eval()
        self.config = model.config
        self.context = self.config.max_seq_len
        self.kv_cache_tokens = max_batch_size * self.context if kv_cache_tokens is None else kv_cache_tokens
        check_kv_cache_tokens(self.kv_cache_tokens, kv_cache_tokens)
        self.max_batch_size, self.max_queue, self.prefill_chunk = max_batch_size, max_queue, prefill_chunk
        self.prefix_cache = prefix_cache
        self.adapters = adapters  # an AdapterRegistry (llmkit.serve.adapters) over this model, or None
        self.speculator = (None if speculate is None and draft is None
                           else Speculator(speculate, num_speculative_tokens, draft, model))
        self._calls: deque[tuple[Callable[[], Any], Future]] = deque()  # run_between_steps
        self.device = model.activation_dtype_device()[1]
        self.slots = SlotTable(model, max_batch_size, min(self.context, self.kv_cache_tokens))
        if self.speculator is not None and self.speculator.draft is not None:
            self.slots.follow(self.speculator.draft)  # the draft's cache: a row per slot, following its tokens
        self._lock = threading.Condition()
        self._waiting: deque[tuple[Request, RequestHandle]] = deque()
        self._running: list[ActiveRequest] = []
        self._reserved = 0  # KV tokens reserved by running requests
        self._ids = itertools.count()
        self._closed = False
        self._thread: threading.Thread | None = None
        self._loop_done = threading.Event()  # set when the step loop returns (after shutdown)
        self._queries = self._hits = self._steps = 0

    # --- the caller's side -----------------------------------------------------------------------------------

    def start(self) -> None:
        """Run the step loop on a background thread (daemon: a forgotten engine never blocks exit)."""
        if self._thread is not None:
            return
        self._thread = threading.Thread(target=self._loop, name="llmkit-engine", daemon=True)
        self._thread.start()

    def run(self) -> None:
        """Run the step loop in the calling thread until `shutdown()` (called from another thread) and the requests
        in flight have ended. `llmkit serve` runs it on the main thread: on CPU, torch ops issued from a thread other
        than the one that first used torch's OpenMP pool ran ~3x slower in decode (SmolLM2 Q4_1, 2 threads, 2026-12-05:
        57 tok/s on the main thread, 19 on a worker thread, 42 on a worker with one thread)."""
        if self._thread is not None:
            raise LlmkitError("the engine's step loop already runs (start() or run() was called); call it once")
        self._thread = threading.current_thread()
        self._loop()

    def submit(self, request: Request) -> RequestHandle:
        """Queue a request and return its handle. Thread-safe; checks the request before any compute.

        Raises:
            LlmkitError: an empty prompt, ids outside the vocabulary, prompt + max_new_tokens over the context or
                over kv_cache_tokens, logprobs outside 0..20, bad settings; an adapter not offered (UnknownAdapterError)
                or not loaded with its directory gone (AdapterLoadError).
            QueueFullError: `max_queue` requests already wait.
            EngineClosedError: shutdown has begun.
        """
        check_request(request, self.config, self.kv_cache_tokens, self.adapters)
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:
            loop = None
        handle = RequestHandle(f"req-{next(self._ids)}", loop, on_cancel=self._wake)
        with self._lock:
            if self._closed:
                raise EngineClosedError("the engine is shutting down and takes no new requests; submit to a new one")
            if len(self._waiting) >= self.max_queue:
                raise QueueFullError(f"{len(self._waiting)} requests already wait (max_queue={self.max_queue}); "
                                     "retry later or raise max_queue")
            self._waiting.append((request, handle))
            self._lock.notify_all()
        return handle

    def shutdown(self, cancel_running: bool = False, timeout: float | None = None) -> None:
        """Stop taking requests, finish the ones submitted (or cancel them), and join the loop's thread (up to
        `timeout` seconds). Without a running loop (never started) queued requests are cancelled."""
        with self._lock:
            self._closed = True
            handles = [handle for _, handle in self._waiting] + [seq.handle for seq in self._running]
            self._lock.notify_all()
        if cancel_running or self._thread is None:
            for handle in handles:
                handle.cancel()
        if self._thread is None:
            self._drop_cancelled()
            return
        self._loop_done.wait(timeout)

    def run_between_steps(self, call: Callable[[], Any]) -> Future:
        """Run `call()` on the engine's thread before the next step (no forward runs meanwhile) and return a Future
        of its result: how the server loads an adapter into the model the step loop is using. Thread-safe."""
        future: Future = Future()
        with self._lock:
            if self._closed:
                raise EngineClosedError("the engine is shutting down; nothing more runs on it")
            self._calls.append((call, future))
            self._lock.notify_all()
        return future

    def stats(self) -> EngineStats:
        with self._lock:
            return EngineStats(
                running=len(self._running), waiting=len(self._waiting), kv_tokens_used=self.slots.used_tokens(),
                kv_tokens_total=self.kv_cache_tokens, prefix_cache_queries=self._queries,
                prefix_cache_hits=self._hits, steps=self._steps,
                **({} if self.speculator is None else {
                    "spec_drafts": self.speculator.drafts, "spec_draft_tokens": self.speculator.proposed,
                    "spec_accepted_tokens": self.speculator.accepted}),
            )

    def _wake(self) -> None:
        with self._lock:
            self._lock.notify_all()

    # --- the step loop -----------------------------------------------------------------------------------------

    def _loop(self) -> None:
        try:
            while True:
                with self._lock:
                    while not self._waiting and not self._running and not self._calls and not self._closed:
                        self._lock.wait()
                    if self._closed and not self._waiting and not self._running:
                        return
                try:
                    self.step()
                except Exception as error:  # noqa: BLE001 (a bug outside one request's work must not hang every consumer)
                    self._fail_everything(one_line(error))
        finally:
            with self._lock:
                calls, self._calls = list(self._calls), deque()
            for _, future in calls:
                future.cancel()
            self._loop_done.set()

    def _fail_everything(self, message: str) -> None:
        """End every running and waiting request with finish_reason "error"; the loop then serves new ones."""
        with self._lock:
            waiting, self._waiting = list(self._waiting), deque()
        for _, handle in waiting:
            handle.push(TokenEvent(None, finish_reason="error", error=message))
        for seq in list(self._running):
            self._finish(seq, TokenEvent(None, finish_reason="error", error=message))

    def step(self) -> None:
        """One scheduling step: end cancelled requests, admit waiting ones, one batched decode forward over the
        decoding requests, then prefill up to `prefill_chunk` prompt tokens. `start()` runs it in a loop; tests call
        it directly to drive the engine one step at a time.

        Raises:
            LlmkitError: called from another thread while the engine's own loop runs.
        """
        if self._thread is not None and threading.current_thread() is not self._thread:
            raise LlmkitError("Engine.step() drives an engine that was not start()ed; this one runs its own loop")
        self._run_calls()
        self._drop_cancelled()
        self._admit()
        decoding = [seq for seq in self._running if not seq.prefilling]
        prefilling = [seq for seq in self._running if seq.prefilling]
        worked = bool(decoding)
        if decoding:
            self._guarded(decoding, self._decode)
        budget = self.prefill_chunk
        for seq in prefilling:
            if budget == 0:
                break
            if self.prefix_cache:
                copied = self.slots.extend_prefix(seq.slot, seq.request.prompt_ids)
                seq.prefilled += copied
                with self._lock:
                    self._hits += copied
            n_tokens = min(budget, len(seq.request.prompt_ids) - seq.prefilled)
            self._guarded([seq], lambda seqs, n=n_tokens: self._prefill(seqs[0], n))
            budget -= n_tokens
            worked = True
        if worked:
            with self._lock:
                self._steps += 1

    def _run_calls(self) -> None:
        """The calls queued by `run_between_steps`, then drop the adapters no longer offered and no longer used."""
        while True:
            with self._lock:
                if not self._calls:
                    break
                call, future = self._calls.popleft()
            try:  # not in inference mode: an adapter loaded here must stay an ordinary tensor
                future.set_result(call())
            except Exception as error:  # noqa: BLE001 (the caller gets it through the future)
                future.set_exception(error)
        if self.adapters is not None:
            self.adapters.sync()

    def _drop_cancelled(self) -> None:
        with self._lock:
            cancelled = [handle for _, handle in self._waiting if handle.cancelled]
            self._waiting = deque((request, handle) for request, handle in self._waiting if not handle.cancelled)
        for handle in cancelled:
            handle.push(TokenEvent(None, finish_reason="cancelled"))
        for seq in [seq for seq in self._running if seq.handle.cancelled]:
            self._finish(seq, TokenEvent(None, finish_reason="cancelled"))

    def _admit(self) -> None:
        """Move waiting requests (in order) into free slots while their prompt + max_new_tokens fit the budget."""
        with self._lock:
            while self._waiting and len(self._running) < self.max_batch_size:
                request, handle = self._waiting[0]
                needed = len(request.prompt_ids) + request.max_new_tokens
                if self._reserved + needed > self.kv_cache_tokens:
                    break
                if request.adapter is not None and not self.adapters.can_acquire(request.adapter):
                    break  # every loaded adapter is in use: wait for one to be free
                self._waiting.popleft()
                try:
                    kv_key = None if request.adapter is None else self.adapters.acquire(request.adapter)
                except Exception as error:  # noqa: BLE001 (an adapter that fails to load: this request only)
                    handle.push(TokenEvent(None, finish_reason="error", error=one_line(error), cause=error))
                    continue
                try:
                    # A speculative step writes up to k proposed tokens past the row's end: grow rows for them too.
                    row_tokens = needed + (0 if self.speculator is None else self.speculator.k)
                    slot, reused = self.slots.acquire(request.prompt_ids, row_tokens, self.prefix_cache, kv_key)
                except Exception as error:  # noqa: BLE001 (e.g. out of memory growing the rows: this request only)
                    if request.adapter is not None:
                        self.adapters.release(request.adapter)
                    handle.push(TokenEvent(None, finish_reason="error", error=one_line(error)))
                    continue
                self._queries += len(request.prompt_ids) if self.prefix_cache else 0
                self._hits += reused
                self._reserved += needed
                self._running.append(ActiveRequest(request, handle, slot, prefilled=reused, reserved=needed,
                                              device=self.device, vocab_size=self.config.vocab_size))

    def _guarded(self, seqs: list[ActiveRequest], work) -> None:  # noqa: ANN001 (a callable over seqs)
        """Run `work(seqs)`; an exception ends those requests with finish_reason "error", the engine goes on."""
        try:
            with torch.inference_mode():
                work(seqs)
        except Exception as error:  # noqa: BLE001 (any failure must end its requests, never the loop)
            message = one_line(error)
            for seq in seqs:
                if seq in self._running:
                    self._finish(seq, TokenEvent(None, finish_reason="error", error=message))

    def _prefill(self, seq: ActiveRequest, n_tokens: int) -> None:
        """Feed the next `n_tokens` prompt tokens of one request; after its last one, choose its first token."""
        chunk = seq.request.prompt_ids[seq.prefilled : seq.prefilled + n_tokens]
        logits = prefill_logits(self.model, self.slots, seq, chunk, self.device, self.adapters)  # (1, 1, V)
        seq.slot.tokens.extend(chunk)
        seq.prefilled += n_tokens
        if self.speculator is not None:
            self.speculator.prefilled(seq)
        if seq.prefilled == len(seq.request.prompt_ids):
            self._emit(seq, seq.choose(logits[0, -1]))

    def _decode(self, seqs: list[ActiveRequest]) -> None:
        """One batched forward of each decoding request's pending token (and, speculating, its proposed tokens),
        then each request's next token(s). Rows go in slot order, so when the busy slots are a run (every slot busy,
        the loaded case) the forward reads the cache as one slice instead of gathering every layer's keys/values
        (llmkit.nn.attention.RowCacheView)."""
        seqs = sorted(seqs, key=lambda seq: seq.slot.row)
        proposals, qs = (([[] for _ in seqs], [None] * len(seqs)) if self.speculator is None
                         else self.speculator.propose(seqs, self.slots.cache.capacity))
        logits = decode_logits(self.model, self.slots, seqs, proposals, self.device, self.adapters)  # (B, 1 + width, V)
        plain = [seq.plain_greedy and not proposal for seq, proposal in zip(seqs, proposals)]
        greedy = logits[:, 0].argmax(-1).tolist() if any(plain) else None
        for row, (seq, proposal, q) in enumerate(zip(seqs, proposals, qs)):
            seq.slot.tokens.append(seq.pending)
            try:
                if proposal:
                    self._emit_run(seq, self.speculator.verify(seq, logits[row], proposal, q))
                    continue
                if plain[row]:
                    seq.record(greedy[row])
                    event = TokenEvent(greedy[row])
                else:
                    event = seq.choose(logits[row, 0])
            except Exception as error:  # noqa: BLE001 (a constraint's failure ends only its request)
                self._finish(seq, TokenEvent(None, finish_reason="error", error=one_line(error)))
                continue
            self._emit(seq, event)

    def _emit_run(self, seq: ActiveRequest, tokens: list[int]) -> None:
        """Emit a speculative step's tokens (accepted proposal + the token after it) one event each, until one
        ends the request. The accepted ones' keys/values were computed in this step's forward: the slot holds them."""
        seq.slot.tokens.extend(tokens[:-1])
        self.speculator.keep(seq)  # the draft's row: back to the accepted tokens
        for token in tokens:
            seq.record(token)
            self._emit(seq, TokenEvent(token))
            if seq not in self._running:
                return

    def _emit(self, seq: ActiveRequest, event: TokenEvent) -> None:
        """Send a chosen token's event, ending the request when the token ends it."""
        reason = seq.finish_reason(event.token_id)
        if reason == "stop" and event.token_id in seq.request.stop_ids:
            self._finish(seq, TokenEvent(None, finish_reason="stop"))  # the stop token itself is not output
            return
        if reason is None:
            seq.pending = event.token_id
            seq.handle.push(event)
            return
        event.finish_reason = reason
        self._finish(seq, event)

    def _finish(self, seq: ActiveRequest, final: TokenEvent) -> None:
        with self._lock:
            self._running.remove(seq)
            self._reserved -= seq.reserved
            self.slots.release(seq.slot)
            if seq.request.adapter is not None:
                self.adapters.release(seq.request.adapter)
        seq.handle.push(final)
