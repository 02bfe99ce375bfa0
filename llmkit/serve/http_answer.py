"""Answering an OpenAI request from its engine requests' token events (llmkit/serve/choices.py): one JSON body once
every choice has ended (the client's disconnect, watched meanwhile, cancels them), or server-sent events as tokens
arrive (`data: {chunk}` ... `data: [DONE]`; a closed stream cancels them)."""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import AsyncIterator
from typing import Any

from fastapi import Request
from fastapi.responses import JSONResponse, Response, StreamingResponse

from llmkit.serve import openai_api as api
from llmkit.serve.choices import Piece, choice_pieces, collect, merged
from llmkit.serve.http_requests import Job, ServedModel, engine_requests, requested_adapter, submit_all
from llmkit.serve.metrics import ServerMetrics

DISCONNECT_POLL_SECONDS = 0.02  # how often a non-streamed request checks that its client is still there


async def respond(request: Request, served: ServedModel, metrics: ServerMetrics, job: Job, arrival: float) -> Response:
    handles = submit_all(served, engine_requests(served, job))
    prompt_tokens = sum(len(prompt) for prompt in job.prompts)  # counted once however many choices, as OpenAI does
    streams = [choice_pieces(i, handle, served.tokenizer, job.stops, job.logprobs is not None, metrics, arrival)
               for i, handle in enumerate(handles)]
    id_ = api.new_id("chatcmpl" if job.chat else "cmpl")
    answered = served.name if requested_adapter(served, job.body.model) is None else job.body.model  # who answered
    if job.body.stream:
        events = sse_events(id_, answered, job, streams, handles, prompt_tokens, metrics, arrival)
        return StreamingResponse(events, media_type="text/event-stream", headers={"Cache-Control": "no-cache"})
    collected = asyncio.ensure_future(asyncio.gather(*(collect(stream) for stream in streams)))
    watcher = asyncio.ensure_future(watch_disconnect(request))
    try:
        await asyncio.wait({collected, watcher}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        watcher.cancel()
        for handle in handles:  # the client left, or a choice failed: free the engine's slots (no-op for ended ones)
            handle.cancel()
        if not collected.done():
            collected.cancel()
    if not collected.done():
        return Response(status_code=499)
    results = collected.result()
    completion_tokens = sum(piece.tokens for piece in results)
    metrics.request_done(time.perf_counter() - arrival, prompt_tokens, completion_tokens,
                         [piece.finish_reason for piece in results])
    used = api.usage(prompt_tokens, completion_tokens)
    if job.chat:
        choices = [api.chat_choice(p.index, p.text, p.finish_reason,
                                   None if job.logprobs is None else api.chat_logprobs(p.logprobs)) for p in results]
        return JSONResponse(api.chat_completion(id_, answered, choices, used))
    choices = [api.text_choice(p.index, p.text, p.finish_reason,
                               None if job.logprobs is None else api.completion_logprobs(p.logprobs)) for p in results]
    return JSONResponse(api.text_completion(id_, answered, choices, used))


async def watch_disconnect(request: Request) -> None:
    """Returns when the client has closed its connection."""
    while not await request.is_disconnected():
        await asyncio.sleep(DISCONNECT_POLL_SECONDS)


async def sse_events(id_: str, model: str, job: Job, streams: list[AsyncIterator[Piece]], handles: list[Any],
                     prompt_tokens: int, metrics: ServerMetrics, arrival: float) -> AsyncIterator[str]:
    """Server-sent events: OpenAI's chunks, then a usage chunk (stream_options.include_usage), then [DONE]. Closed
    early (the client left), it cancels every engine request."""
    include_usage = job.body.include_usage_in_stream()
    usage_field = {"usage": None} if include_usage else {}
    done: dict[int, Piece] = {}
    offsets = [0] * len(handles)

    def event(payload: dict[str, Any]) -> str:
        return f"data: {json.dumps(payload, ensure_ascii=False)}\n\n"

    try:
        if job.chat:
            for index in range(len(handles)):
                start = api.chat_delta(index, {"role": "assistant", "content": ""})
                yield event({**api.chat_chunk(id_, model, [start]), **usage_field})
        try:
            async for piece in merged(streams):
                if piece.finish_reason is not None:
                    done[piece.index] = piece
                if job.chat:
                    logprobs = None if job.logprobs is None else api.chat_logprobs(piece.logprobs)
                    delta = {"content": piece.text} if piece.text else {}
                    chunk = api.chat_chunk(id_, model, [api.chat_delta(piece.index, delta, piece.finish_reason, logprobs)])
                else:
                    logprobs = None
                    if job.logprobs is not None:
                        logprobs = api.completion_logprobs(piece.logprobs, offsets[piece.index])
                    offsets[piece.index] += len(piece.text)
                    choice = api.text_choice(piece.index, piece.text, piece.finish_reason, logprobs)
                    chunk = api.text_completion(id_, model, [choice], None, chunk=True)
                yield event({**chunk, **usage_field})
        except api.ApiError as error:
            yield event(error.envelope())
            return
        completion_tokens = sum(piece.tokens for piece in done.values())
        metrics.request_done(time.perf_counter() - arrival, prompt_tokens, completion_tokens,
                             [piece.finish_reason for piece in done.values()])
        if include_usage:
            used = api.usage(prompt_tokens, completion_tokens)
            final = api.chat_chunk(id_, model, [], used) if job.chat else api.text_completion(id_, model, [], used, True)
            yield event(final)
        yield "data: [DONE]\n\n"
    finally:
        for handle in handles:
            handle.cancel()  # a no-op for requests that ended
