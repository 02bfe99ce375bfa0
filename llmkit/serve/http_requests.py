"""From an HTTP request to engine requests, for the OpenAI-compatible server (llmkit/serve/http.py): the body read
within its size limit, the adapter a request's `model` names, the prompt(s) tokenized (chat template or plain
transcript) with each one's token budget, the response format's constraint, and the submission of every choice (or
none). Each refusal is an `ApiError` carrying OpenAI's envelope (llmkit/serve/openai_api.py)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from fastapi import Request

from llmkit.chat_template import PLAIN_STOP, plain_transcript
from llmkit.errors import LlmkitError
from llmkit.generate import SamplingSettings, tokenizer_stop_ids
from llmkit.serve import openai_api as api
from llmkit.tokenizer import Tokenizer

MAX_DRAINED_BYTES = 64 * 1024 * 1024  # of an oversized body, read and dropped before the 400 is sent


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


def adapter_load_error(error: Any) -> api.ApiError:
    """An AdapterLoadError as OpenAI's envelope: 404 model_not_found when the adapter's directory is gone, 400
    invalid_value when its files do not load onto the model; both name the adapter and the reason (param: model)."""
    if error.missing:
        return api.ApiError(404, str(error), "model_not_found", "model")
    return api.ApiError(400, str(error), "invalid_value", "model")


def submit_all(served: ServedModel, requests: list[Any]) -> list[Any]:
    """Submit every choice or none: a refusal cancels the ones already queued. 429 when the queue is full."""
    from llmkit.serve import EngineClosedError, QueueFullError
    from llmkit.serve.adapters import AdapterLoadError

    handles = []
    try:
        for request in requests:
            handles.append(served.engine.submit(request))
    except (LlmkitError, ValueError) as error:
        for handle in handles:
            handle.cancel()
        if isinstance(error, QueueFullError):
            raise api.ApiError(429, f"{error}; retry later", "rate_limit_exceeded", type="rate_limit_error") from None
        if isinstance(error, AdapterLoadError):
            raise adapter_load_error(error) from None
        if isinstance(error, EngineClosedError):
            raise api.ApiError(503, f"{error}", "server_shutting_down", type="server_error") from None
        raise api.ApiError(400, str(error), "invalid_value") from None
    return handles


