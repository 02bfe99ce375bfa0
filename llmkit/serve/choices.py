"""One choice of a completion as text: the engine's token events become text pieces through `StreamDecoder` (never
half a character) and `StopStringFilter` (a stop string is cut, even across pieces, and cancels the engine
request), each with its tokens' log-probs; `merged` interleaves the choices of one request as they are produced."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

from llmkit.generate import StopStringFilter
from llmkit.serve import openai_api as api
from llmkit.serve.metrics import ServerMetrics
from llmkit.tokenizer import StreamDecoder, Tokenizer


@dataclass
class Piece:
    """Text a choice produced since its last piece, with its tokens' log-probs, and how it ended (None: not yet)."""

    index: int
    text: str
    logprobs: list[tuple[str, float, list[tuple[str, float]]]]
    finish_reason: str | None = None
    tokens: int = 0  # tokens generated so far (the usage count)


async def choice_pieces(index: int, handle: Any, tokenizer: Tokenizer, stops: tuple[str, ...], want_logprobs: bool,
                        metrics: ServerMetrics, arrival: float) -> AsyncIterator[Piece]:
    """The text of one choice as it is generated; the last piece has its finish_reason ("stop" for a stop id, a stop
    string or a complete JSON document; "length"). A stop string cancels the engine request."""
    decoder, stop_filter = StreamDecoder(tokenizer), StopStringFilter(stops)
    tokens, entries, last = 0, [], None
    async for event in handle:
        text = ""
        if event.token_id is not None:
            now = time.perf_counter()
            if last is None:
                metrics.first_token(now - arrival)
            else:
                metrics.next_token(now - last)
            tokens, last = tokens + 1, now
            text = stop_filter.push(decoder.push(event.token_id))
            if want_logprobs:
                top = [(tokenizer.decode([token]), logprob) for token, logprob in event.top_logprobs]
                entries.append((tokenizer.decode([event.token_id]), event.logprob, top))
            if stop_filter.stopped:
                handle.cancel()
                yield Piece(index, text, entries, "stop", tokens)
                return
        if event.finish_reason is not None:
            if event.finish_reason == "error":
                raise failure(event)
            text += stop_filter.push(decoder.flush()) + stop_filter.flush()
            reason = "length" if event.finish_reason == "length" else "stop"
            yield Piece(index, text, entries, "abort" if event.finish_reason == "cancelled" else reason, tokens)
            return
        if text:
            yield Piece(index, text, entries, None, tokens)
            entries = []


def failure(event: Any) -> api.ApiError:
    """The error a request that ended with finish_reason "error" answers: 404/400 when its adapter does not load (the
    request's fault, llmkit.serve.http_requests.adapter_load_error), else 500 (the server's)."""
    from llmkit.serve.adapters import AdapterLoadError
    from llmkit.serve.http_requests import adapter_load_error

    if isinstance(event.cause, AdapterLoadError):
        return adapter_load_error(event.cause)
    return api.ApiError(500, f"generation failed: {event.error or 'engine error'}", "server_error", type="server_error")


async def collect(pieces: AsyncIterator[Piece]) -> Piece:
    """A whole choice: its pieces joined."""
    whole = Piece(0, "", [])
    async for piece in pieces:
        whole = Piece(piece.index, whole.text + piece.text, whole.logprobs + piece.logprobs, piece.finish_reason,
                      piece.tokens)
    return whole


async def merged(streams: list[AsyncIterator[Piece]]) -> AsyncIterator[Piece]:
    """The pieces of all choices in the order they are produced."""
    queue: asyncio.Queue[Piece | Exception | None] = asyncio.Queue()

    async def pump(stream: AsyncIterator[Piece]) -> None:
        try:
            async for piece in stream:
                await queue.put(piece)
        except Exception as error:  # noqa: BLE001 (handed to the reader, which raises it)
            await queue.put(error)
            return
        await queue.put(None)

    tasks = [asyncio.ensure_future(pump(stream)) for stream in streams]
    try:
        remaining = len(tasks)
        while remaining:
            item = await queue.get()
            if item is None:
                remaining -= 1
            elif isinstance(item, Exception):
                raise item
            else:
                yield item
    finally:
        for task in tasks:
            task.cancel()
