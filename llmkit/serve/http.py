"""The OpenAI-compatible HTTP server: a FastAPI app over the continuous-batching `Engine`.

    POST /v1/chat/completions   messages -> the model's chat template (plain "User: ... Assistant:" without one)
    POST /v1/completions        prompt: a string, a list of strings, a list of token ids, or a list of those
    GET  /v1/models, /health (503 while the model loads), /metrics (Prometheus text), /  (the chat page)
    POST /v1/adapters {"name", "path"}, DELETE /v1/adapters/{name}   LoRA adapters on the base (multi-LoRA)

With LoRA adapters (llmkit/serve/adapters.py) the request's `model` picks one: "NAME" or "BASE:NAME" (BASE the
served model's name); the base's own name runs the base. Requests for different adapters share the engine's batch.

Each of the `n` choices is one engine request (choice i seeded with seed + i); llmkit/serve/choices.py turns its
token events into text (stop strings cut there). Streaming uses server-sent events (`data: {chunk}` ...
`data: [DONE]`). A client that goes away cancels its engine requests: a streamed response's generator is closed by
Starlette, a plain one is watched with `request.is_disconnected()`. Request bodies are parsed and validated by
llmkit/serve/openai_api.py before any compute.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import HTMLResponse, JSONResponse, PlainTextResponse, Response, StreamingResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from llmkit.chat_template import PLAIN_STOP, plain_transcript
from llmkit.errors import LlmkitError
from llmkit.generate import SamplingSettings, tokenizer_stop_ids
from llmkit.serve import openai_api as api
from llmkit.serve.choices import Piece, choice_pieces, collect, merged
from llmkit.serve.metrics import CONTENT_TYPE, ServerMetrics
from llmkit.tokenizer import Tokenizer

CHAT_PAGE = Path(__file__).parent / "static" / "chat.html"
MAX_DRAINED_BYTES = 64 * 1024 * 1024  # of an oversized body, read and dropped before the 400 is sent
DISCONNECT_POLL_SECONDS = 0.02  # how often a non-streamed request checks that its client is still there


@dataclass
class ServedModel:
    """What the app serves: the engine running the model, its tokenizer, and the name clients ask for."""

    name: str
    engine: Any  # llmkit.serve.engine.Engine
    tokenizer: Tokenizer
    context: int  # the model's context window, in tokens
    created: int = field(default_factory=api.now)
    adapters: Any = None  # llmkit.serve.adapters.AdapterRegistry, or None: the base model only


@dataclass
class Job:
    """One validated HTTP request, ready for the engine: a prompt per choice group and how to sample."""

    prompts: list[list[int]]
    max_tokens: list[int]  # per prompt
    body: Any  # the ChatCompletionRequest or CompletionRequest
    stops: tuple[str, ...]
    logprobs: int | None
    schema: dict[str, Any] | None | bool  # False: free text; None: any JSON object; a dict: that JSON schema
    chat: bool


def start_engine(model: Any, tokenizer: Tokenizer, name: str, start: bool = True, adapters: dict[str, Any] | None = None,
                 max_loaded_adapters: int = 4, **engine_options: Any) -> ServedModel:
    """An Engine over `model` (options: max_batch_size, max_queue, kv_cache_tokens, ...), ready to serve: running on
    its own thread, or, with `start=False`, for the caller to run (`served.engine.run()`, as `llmkit serve` does on
    the main thread). `adapters` (name -> LoRA adapter directory, possibly empty) turns on multi-LoRA serving with at
    most `max_loaded_adapters` loaded at once; None serves the base model only."""
    from llmkit.serve import Engine
    from llmkit.serve.adapters import AdapterRegistry

    registry = None if adapters is None else AdapterRegistry(model, adapters, max_loaded_adapters)
    engine = Engine(model, adapters=registry, **engine_options)
    if start:
        engine.start()
    return ServedModel(name, engine, tokenizer, model.config.max_seq_len, adapters=registry)


class ServerState:
    """What the app serves, once it is loaded: `attach(served)` when the model is ready, `fail(error)` when loading
    failed. Until then /health and every /v1 route answer 503. The caller loads the model in its own thread (the
    command: in the main thread; a model loaded in another thread was measured 40x slower to run afterwards, SmolLM2
    Q4_1, 2026-12-05), while uvicorn already answers."""

    def __init__(self) -> None:
        self.served: ServedModel | None = None
        self.metrics: ServerMetrics | None = None
        self.error: BaseException | None = None

    def attach(self, served: ServedModel) -> None:
        self.metrics = ServerMetrics(served.name)
        self.served = served

    def fail(self, error: BaseException) -> None:
        self.error = error


def create_app(api_key: str | None = None) -> FastAPI:
    """The app; `app.state.llmkit` is its ServerState (attach the model to it). `api_key`: every /v1 route requires
    `Authorization: Bearer <api_key>`. When uvicorn stops (after the requests in flight), the engine shuts down."""
    state = ServerState()

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        yield
        if state.served is not None:  # uvicorn has waited for the requests in flight: nothing is left running
            await asyncio.to_thread(state.served.engine.shutdown)

    app = FastAPI(title="llmkit serve", lifespan=lifespan, docs_url=None, redoc_url=None, openapi_url=None)
    app.state.llmkit = state

    def ready() -> tuple[ServedModel, ServerMetrics]:
        if state.served is None:
            reason = f"failed to load: {state.error}" if state.error else "is still loading; retry in a moment"
            raise api.ApiError(503, f"the model {reason}", "model_not_ready", type="server_error")
        return state.served, state.metrics

    def authorize(request: Request) -> None:
        if api_key is None:
            return
        header = request.headers.get("authorization", "")
        if header != f"Bearer {api_key}":
            said = "no Authorization header" if not header else "a wrong API key"
            raise api.ApiError(401, f"the request has {said}; send `Authorization: Bearer <key>` with the server's "
                               "--api_key", "invalid_api_key")

    async def validated(request: Request, model: type) -> tuple[ServedModel, ServerMetrics, Any]:
        served, metrics = ready()
        authorize(request)
        body = api.parse_body(await read_body(request), model)
        requested_adapter(served, body.model)  # 404 for a model it does not serve
        return served, metrics, body

    @app.exception_handler(api.ApiError)
    async def api_error(request: Request, error: api.ApiError) -> JSONResponse:
        return JSONResponse(error.envelope(), status_code=error.status)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, error: StarletteHTTPException) -> JSONResponse:
        code = {404: "not_found", 405: "method_not_allowed"}.get(error.status_code, "invalid_request")
        message = f"{request.method} {request.url.path}: {error.detail}"
        if error.status_code == 404:
            message += "; the routes are /v1/chat/completions, /v1/completions, /v1/models, /health, /metrics"
        return JSONResponse(api.ApiError(error.status_code, message, code).envelope(), status_code=error.status_code)

    @app.exception_handler(RequestValidationError)  # FastAPI's own 422 shape, for any route that lets it parse
    async def fastapi_validation_error(request: Request, error: RequestValidationError) -> JSONResponse:
        first = error.errors()[0] if error.errors() else {"loc": (), "msg": "invalid request"}
        param = ".".join(str(part) for part in first["loc"][1:]) or None
        return JSONResponse(api.ApiError(400, f"{param}: {first['msg']}", "invalid_type", param).envelope(), 400)

    @app.get("/health")
    async def health() -> JSONResponse:
        if state.served is None:
            return JSONResponse({"status": "failed" if state.error else "loading"}, status_code=503)
        return JSONResponse({"status": "ok"})

    @app.get("/metrics")
    async def metrics_text() -> Response:
        served, metrics = state.served, state.metrics
        text = "" if served is None else metrics.render(served.engine.stats())
        return PlainTextResponse(text, media_type=CONTENT_TYPE)

    @app.get("/")
    async def chat_page() -> HTMLResponse:
        return HTMLResponse(CHAT_PAGE.read_text(encoding="utf-8"))

    @app.get("/v1/models")
    async def models(request: Request) -> JSONResponse:
        served, _ = ready()
        authorize(request)
        adapters = [] if served.adapters is None else served.adapters.names()
        return JSONResponse(api.model_list(served.name, served.created, adapters))

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request) -> Response:
        arrival = time.perf_counter()
        served, metrics, body = await validated(request, api.ChatCompletionRequest)
        return await respond(request, served, metrics, chat_job(served, body), arrival)

    @app.post("/v1/completions")
    async def completions(request: Request) -> Response:
        arrival = time.perf_counter()
        served, metrics, body = await validated(request, api.CompletionRequest)
        return await respond(request, served, metrics, completion_job(served, body), arrival)

    add_adapter_routes(app, ready, authorize)
    return app


# ---- LoRA adapters (multi-LoRA serving) ----------------------------------------------------------------------------


def requested_adapter(served: ServedModel, model: str) -> str | None:
    """The adapter a request's `model` names ("NAME" or "BASE:NAME"), None for the base; 404 when it serves neither."""
    if model == served.name:
        return None
    name = model.removeprefix(f"{served.name}:")
    if served.adapters is not None and name in served.adapters:
        return name
    offered = "" if served.adapters is None else f" and the adapters {served.adapters.names()}"
    raise api.ApiError(404, f"the model `{model}` does not exist; this server serves `{served.name}`{offered} "
                       "(GET /v1/models)", "model_not_found", "model")


def add_adapter_routes(app: FastAPI, ready: Any, authorize: Any) -> None:
    """POST /v1/adapters loads a LoRA adapter ({"name", "path"}: a directory on the server) and DELETE
    /v1/adapters/{name} unloads one (at once, or when the last running request using it ends)."""

    def registry_of(served: ServedModel) -> Any:
        if served.adapters is None:
            raise api.ApiError(400, "this server was started without LoRA adapters; start it with --adapters (even "
                               "\"[]\") to load adapters at run time", "adapters_disabled")
        return served.adapters

    @app.post("/v1/adapters")
    async def load_adapter(request: Request) -> JSONResponse:
        served, _ = ready()
        authorize(request)
        body = api.parse_body(await read_body(request), api.AdapterLoadRequest)
        registry = registry_of(served)
        if body.name == served.name:
            raise api.ApiError(400, f"name `{body.name}` is the base model's; choose another adapter name",
                               "invalid_value", "name")
        try:
            registry.add(body.name, body.path)
        except LlmkitError as error:
            raise api.ApiError(400, str(error), "invalid_value") from None
        try:  # load it now, on the engine's thread, so an adapter that does not fit fails here
            await asyncio.wrap_future(served.engine.run_between_steps(lambda: registry.preload(body.name)))
        except Exception as error:  # noqa: BLE001 (any failure to load: the adapter is not offered)
            registry.remove(body.name)
            raise api.ApiError(400, f"adapter {body.name!r} from {body.path} does not load: {error}",
                               "invalid_value", "path") from None
        return JSONResponse(api.model_card(body.name, api.now(), served.name))

    @app.delete("/v1/adapters/{name}")
    async def unload_adapter(request: Request, name: str) -> JSONResponse:
        from llmkit.serve.adapters import UnknownAdapterError

        served, _ = ready()
        authorize(request)
        registry = registry_of(served)
        try:
            registry.remove(name)
        except UnknownAdapterError as error:
            raise api.ApiError(404, str(error), "model_not_found", "name") from None
        await asyncio.wrap_future(served.engine.run_between_steps(registry.sync))
        return JSONResponse({"id": name, "object": "model", "deleted": True})


async def read_body(request: Request) -> bytes:
    """The body, refused (400) once it passes MAX_BODY_BYTES: the server never holds more. The rest is read and
    dropped (up to MAX_DRAINED_BYTES) so the client, still sending, receives the 400 instead of a reset connection."""
    declared = request.headers.get("content-length", "")
    chunks, size = [], 0
    too_large = declared.isdigit() and int(declared) > api.MAX_BODY_BYTES
    async for chunk in request.stream():
        size += len(chunk)
        too_large = too_large or size > api.MAX_BODY_BYTES
        if too_large:
            chunks.clear()
            if size > MAX_DRAINED_BYTES:
                break
        else:
            chunks.append(chunk)
    if too_large:
        raise api.body_too_large(max(size, int(declared) if declared.isdigit() else 0))
    return b"".join(chunks)


# ---- from a request body to engine requests ------------------------------------------------------------------------


def text_param(text: str, param: str) -> str:
    """`text` if it can be encoded (JSON's \\ud800 escapes give lone surrogates, which no tokenizer takes)."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as error:
        raise api.ApiError(400, f"{param} holds a lone surrogate (\\u{ord(text[error.start]):04x}) at character "
                           f"{error.start:,}: send valid Unicode text", "invalid_value", param) from None
    return text


def chat_job(served: ServedModel, body: api.ChatCompletionRequest) -> Job:
    messages = [{"role": "system" if m.role == "developer" else m.role, "content": text_param(m.text(), f"messages[{i}]")}
                for i, m in enumerate(body.messages)]
    tokenizer, stops = served.tokenizer, body.stop_strings()
    if tokenizer.chat_template is None:
        prompt, stops = plain_transcript(messages), (*stops, PLAIN_STOP)
    else:
        try:
            prompt = tokenizer.apply_chat_template(messages, add_generation_prompt=True)
        except LlmkitError as error:
            raise api.ApiError(400, f"messages: {error}", "invalid_value", "messages") from None
    ids = tokenizer.encode(prompt)
    return Job([ids], [new_token_budget(served, body, len(ids), "messages")], body, stops, body.logprob_count(),
               response_schema(body), chat=True)


def completion_job(served: ServedModel, body: api.CompletionRequest) -> Job:
    prompts = []
    for i, prompt in enumerate(body.prompts()):
        param = "prompt" if isinstance(body.prompt, str) else f"prompt[{i}]"
        if isinstance(prompt, str):
            prompt = served.tokenizer.encode(text_param(prompt, param))
        if not prompt:
            raise api.ApiError(400, f"{param} is empty; give at least one token of text to continue from",
                               "invalid_value", param)
        prompts.append(prompt)
    budgets = [new_token_budget(served, body, len(ids), "prompt") for ids in prompts]
    return Job(prompts, budgets, body, body.stop_strings(), body.logprob_count(), response_schema(body), chat=False)


def new_token_budget(served: ServedModel, body: Any, prompt_tokens: int, prompt_param: str) -> int:
    """max_tokens (or max_completion_tokens) if prompt + it fits the context; without one, the rest of the context."""
    room = served.context - prompt_tokens
    asked = body.new_tokens()
    name = "max_completion_tokens" if getattr(body, "max_completion_tokens", None) is not None else "max_tokens"
    if room < 1:
        raise api.ApiError(400, f"the prompt has {prompt_tokens:,} tokens; {served.name}'s context is "
                           f"{served.context:,} tokens: shorten {prompt_param}", "context_length_exceeded", prompt_param)
    if asked is None:
        return room
    if asked > room:
        raise api.ApiError(400, f"{name}={asked:,} plus the prompt's {prompt_tokens:,} tokens exceed {served.name}'s "
                           f"context of {served.context:,} tokens: ask for at most {room:,}", "context_length_exceeded",
                           name)
    return asked


def response_schema(body: Any) -> dict[str, Any] | None | bool:
    fmt = body.response_format
    if fmt is None or fmt.type == "text":
        return False
    if fmt.type == "json_object":
        return None
    if fmt.json_schema is None or fmt.json_schema.schema_ is None:
        raise api.ApiError(400, "response_format of type json_schema needs json_schema.schema", "invalid_value",
                           "response_format.json_schema")
    return fmt.json_schema.schema_


def engine_requests(served: ServedModel, job: Job) -> list[Any]:
    """One engine Request per choice (prompt-major, as OpenAI orders choices); choice i of a prompt uses seed + i."""
    from llmkit.serve import Request as EngineRequest

    body, stop_ids = job.body, tokenizer_stop_ids(served.tokenizer)
    requests = []
    for prompt, budget in zip(job.prompts, job.max_tokens):
        for i in range(body.n):
            settings = SamplingSettings(temperature=body.temperature, top_p=body.top_p, top_k=body.top_k,
                                        seed=None if body.seed is None else body.seed + i)
            requests.append(EngineRequest(list(prompt), budget, settings, body.presence_penalty, body.frequency_penalty,
                                          stop_ids, job.logprobs, constraint(served, job.schema, budget),
                                          adapter=requested_adapter(served, body.model)))
    return requests


def constraint(served: ServedModel, schema: dict[str, Any] | None | bool, max_tokens: int) -> Any:
    """A JsonConstraint for response_format (None without one). Given the request's token budget, it closes every
    document in time, so each reply parses."""
    if schema is False:
        return None
    from llmkit.generate.constrained import JsonConstraint

    try:
        return JsonConstraint(served.tokenizer, schema, max_tokens=max_tokens)
    except LlmkitError as error:
        raise api.ApiError(400, f"response_format: {error}", "invalid_value", "response_format") from None


def submit_all(served: ServedModel, requests: list[Any]) -> list[Any]:
    """Submit every choice or none: a refusal cancels the ones already queued. 429 when the queue is full."""
    from llmkit.serve import EngineClosedError, QueueFullError

    handles = []
    try:
        for request in requests:
            handles.append(served.engine.submit(request))
    except (LlmkitError, ValueError) as error:
        for handle in handles:
            handle.cancel()
        if isinstance(error, QueueFullError):
            raise api.ApiError(429, f"{error}; retry later", "rate_limit_exceeded", type="rate_limit_error") from None
        if isinstance(error, EngineClosedError):
            raise api.ApiError(503, f"{error}", "server_shutting_down", type="server_error") from None
        raise api.ApiError(400, str(error), "invalid_value") from None
    return handles


# ---- answering -----------------------------------------------------------------------------------------------------


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
