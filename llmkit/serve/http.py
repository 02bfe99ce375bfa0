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

Here: the app, its state and its routes. From a body to engine requests: llmkit/serve/http_requests.py; from their
token events to the response (JSON or server-sent events): llmkit/serve/http_answer.py.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import HTMLResponse, JSONResponse, PlainTextResponse, Response
from starlette.exceptions import HTTPException as StarletteHTTPException

from llmkit.errors import LlmkitError
from llmkit.serve import openai_api as api
from llmkit.serve.http_answer import respond
from llmkit.serve.http_requests import (
    Job,
    ServedModel,
    chat_job,
    completion_job,
    read_body,
    requested_adapter,
)
from llmkit.serve.metrics import CONTENT_TYPE, ServerMetrics
from llmkit.tokenizer import Tokenizer

__all__ = ["Job", "ServedModel", "ServerState", "chat_job", "completion_job", "create_app", "start_engine"]

CHAT_PAGE = Path(__file__).parent / "static" / "chat.html"
MAX_DRAINED_BYTES = 64 * 1024 * 1024  # of an oversized body, read and dropped before the 400 is sent
DISCONNECT_POLL_SECONDS = 0.02  # how often a non-streamed request checks that its client is still there


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
        from llmkit.serve.adapters import AdapterLoadError

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
            message = str(error) if isinstance(error, AdapterLoadError) else \
                f"adapter {body.name!r} from {body.path} does not load: {error}"
            raise api.ApiError(400, message, "invalid_value", "path") from None
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


