"""What a caller hands the serving engine (`Request`) and what it gets back (`RequestHandle`, a stream of
`TokenEvent`s), with the engine's own errors. No compute here: the engine's thread pushes events, any thread (or an
asyncio task) reads them."""

from __future__ import annotations

import asyncio
import queue
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Protocol

import torch

from llmkit.errors import LlmkitError
from llmkit.generate.sampling import SamplingSettings

MAX_TOP_LOGPROBS = 20  # OpenAI's limit on top_logprobs

FINISH_REASONS = ("stop", "length", "cancelled", "error")


class QueueFullError(LlmkitError):
    """`Engine.submit` while `max_queue` requests already wait (an HTTP server answers 429)."""


class EngineClosedError(LlmkitError):
    """`Engine.submit` after `shutdown` began."""


class TokenConstraint(Protocol):
    """Restricts which token may come next (JSON constrained decoding: llmkit/generate/constrained.py)."""

    def pick(self, logits: torch.Tensor, settings: SamplingSettings, generator: torch.Generator | None) -> int:
        """An allowed token id from float32 logits (V,) after the penalties, sampled as `settings` says."""
        ...

    def advance(self, token_id: int) -> None:
        """Record that `token_id` was output."""
        ...

    @property
    def complete(self) -> bool:
        """The output so far is a whole document: the engine ends the request with finish_reason "stop"."""
        ...


@dataclass
class Request:
    """One generation: continue `prompt_ids` by at most `max_new_tokens` tokens.

    OpenAI's penalties subtract presence * (count[t] > 0) + frequency * count[t] from logit t, counts taken over this
    request's generated tokens; `sampling.repetition_penalty` (CTRL) is applied after them, over prompt and output.
    `logprobs` k asks for the chosen token's log-probability and the k most likely (0 <= k <= 20).
    `adapter` names a LoRA adapter of the engine's AdapterRegistry (llmkit/serve/adapters.py); None: the base model.
    """

    prompt_ids: list[int]
    max_new_tokens: int
    sampling: SamplingSettings = field(default_factory=SamplingSettings)
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    stop_ids: frozenset[int] = frozenset()
    logprobs: int | None = None
    constraint: TokenConstraint | None = None
    adapter: str | None = None


@dataclass
class TokenEvent:
    """One generated token, or the end of a stream. `logprob` is the log-softmax of the raw logits (before
    temperature and penalties) at `token_id`; `top_logprobs` the k most likely (id, log-prob), most likely first."""

    token_id: int | None  # None only on a final event that carries no token (stop id, cancel, error)
    logprob: float | None = None
    top_logprobs: list[tuple[int, float]] = field(default_factory=list)
    finish_reason: str | None = None  # None mid-stream, else "stop" | "length" | "cancelled" | "error"
    error: str | None = None  # with finish_reason "error": what went wrong, one line
    cause: Exception | None = None  # with "error": the exception, so a server can tell the request's fault (an
    # adapter that does not load: llmkit.serve.adapters.AdapterLoadError) from its own


class RequestHandle:
    """The caller's side of a submitted request: iterate its events (blocking with `events`, or `async for` when it
    was submitted from inside an asyncio loop); `cancel()` ends it within one engine step. Thread-safe."""

    def __init__(
        self, request_id: str, loop: asyncio.AbstractEventLoop | None = None, on_cancel: Callable[[], None] | None = None
    ) -> None:
        self.request_id = request_id
        self._on_cancel = on_cancel  # wakes the engine's loop
        self._events: queue.SimpleQueue[TokenEvent] = queue.SimpleQueue()
        self._loop = loop
        self._wakeup = asyncio.Event() if loop is not None else None
        self._cancelled = threading.Event()
        self._read_final = False  # the consumer has seen the final event

    def cancel(self) -> None:
        """Ask the engine to end this request; its stream ends with finish_reason "cancelled" (unless it already
        ended). Returns at once."""
        self._cancelled.set()
        if self._on_cancel is not None:
            self._on_cancel()

    @property
    def cancelled(self) -> bool:
        return self._cancelled.is_set()

    def push(self, event: TokenEvent) -> None:
        """Called by the engine's thread: queue an event and wake an asyncio reader."""
        self._events.put(event)
        if self._loop is not None and not self._loop.is_closed():
            self._loop.call_soon_threadsafe(self._wakeup.set)

    def events(self, timeout: float | None = None) -> Iterator[TokenEvent]:
        """Yield the events as they come, ending after the final one. `timeout` seconds per event (None: wait
        forever); TimeoutError when none comes in time."""
        while not self._read_final:
            try:
                event = self._events.get(timeout=timeout)
            except queue.Empty:
                raise TimeoutError(f"request {self.request_id}: no token event within {timeout} s") from None
            self._read_final = event.finish_reason is not None
            yield event

    def events_ready(self) -> list[TokenEvent]:
        """The events produced and not yet read, without waiting (possibly none)."""
        ready = []
        while (event := self._next_ready()) is not None:
            ready.append(event)
        return ready

    def _next_ready(self) -> TokenEvent | None:
        """The next event if one is queued and the stream has not ended, else None."""
        if self._read_final:
            return None
        try:
            event = self._events.get_nowait()
        except queue.Empty:
            return None
        self._read_final = event.finish_reason is not None
        return event

    def __aiter__(self) -> RequestHandle:
        if self._loop is None:  # submitted outside a loop: bind to the one iterating
            self._loop, self._wakeup = asyncio.get_running_loop(), asyncio.Event()
        return self

    async def __anext__(self) -> TokenEvent:
        while not self._read_final:
            event = self._next_ready()
            if event is None:
                self._wakeup.clear()
                event = self._next_ready()  # an event pushed between the read and the clear must not be missed
            if event is not None:
                return event
            await self._wakeup.wait()
        raise StopAsyncIteration
