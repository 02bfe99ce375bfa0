"""The OpenAI API's shapes: request bodies (validated strictly, before any compute), response objects and the
error envelope, so an `openai` client talks to `llmkit serve` as it talks to api.openai.com.

Bodies are parsed here, not by FastAPI: bytes -> UTF-8 -> JSON -> a pydantic model in strict mode (no "0.7" for
0.7, no 1.0 for n), each failure one ApiError whose `param` names the field as the API spells it. Errors use
OpenAI's envelope `{"error": {"message", "type", "param", "code"}}` with string codes, and the statuses the
client maps to its exception classes: 400 BadRequestError, 401 AuthenticationError, 404 NotFoundError,
429 RateLimitError, 503 (retried by the client, then InternalServerError).
"""

from __future__ import annotations

import json
import math
import time
import uuid
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from llmkit.errors import LlmkitError

MAX_BODY_BYTES = 4 * 1024 * 1024  # a request body over this is refused before it is parsed
MAX_CHOICES = 16  # `n`: each choice is one engine request
MAX_STOP_STRINGS = 4  # OpenAI's limit on `stop`
MAX_TOP_LOGPROBS = 20  # OpenAI's limit on `top_logprobs` (the engine's too)
SYSTEM_FINGERPRINT = "llmkit"


class ApiError(LlmkitError):
    """A request the server refuses: HTTP status plus OpenAI's error fields (`code` is a string, as OpenAI's is)."""

    def __init__(self, status: int, message: str, code: str, param: str | None = None,
                 type: str = "invalid_request_error") -> None:  # noqa: A002 (OpenAI's field name)
        super().__init__(message)
        self.status, self.message, self.code, self.param, self.type = status, message, code, param, type

    def envelope(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


# ---- request bodies ------------------------------------------------------------------------------------------------


class _Strict(BaseModel):
    # Unknown fields are ignored (clients send `user`, `metadata`, ...); fields that would change the output and are
    # not implemented are declared below and refused when set.
    model_config = ConfigDict(strict=True, extra="ignore")


class TextPart(_Strict):
    type: Literal["text"]
    text: str


class Message(_Strict):
    role: Literal["system", "developer", "user", "assistant"]
    content: str | list[TextPart]
    name: str | None = None

    def text(self) -> str:
        return self.content if isinstance(self.content, str) else "".join(part.text for part in self.content)


class StreamOptions(_Strict):
    include_usage: bool = False


class JsonSchemaSpec(_Strict):
    name: str = "response"
    schema_: dict[str, Any] | None = Field(default=None, alias="schema")
    strict: bool | None = None


class ResponseFormat(_Strict):
    type: Literal["text", "json_object", "json_schema"]
    json_schema: JsonSchemaSpec | None = None


class _Generation(_Strict):
    """The fields both endpoints share, with OpenAI's defaults and ranges (top_k is an extension)."""

    model: str
    max_tokens: int | None = Field(default=None, ge=1)
    temperature: float = Field(default=1.0, ge=0, le=2)
    top_p: float = Field(default=1.0, gt=0, le=1)
    top_k: int | None = Field(default=None, ge=1)
    n: int = Field(default=1, ge=1, le=MAX_CHOICES)
    stop: str | list[str] | None = None
    seed: int | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    presence_penalty: float = Field(default=0.0, ge=-2, le=2)
    frequency_penalty: float = Field(default=0.0, ge=-2, le=2)
    response_format: ResponseFormat | None = None
    logit_bias: dict[str, float] | None = None  # refused when given: not implemented
    tools: list[Any] | None = None  # refused when given: not implemented

    def stop_strings(self) -> tuple[str, ...]:
        stops = (self.stop,) if isinstance(self.stop, str) else tuple(self.stop or ())
        if len(stops) > MAX_STOP_STRINGS:
            raise ApiError(400, f"stop holds {len(stops)} strings; give at most {MAX_STOP_STRINGS}", "invalid_value",
                           "stop")
        if any(not stop for stop in stops):
            raise ApiError(400, "stop holds an empty string; remove it (every stop string needs a character)",
                           "invalid_value", "stop")
        return stops

    def include_usage_in_stream(self) -> bool:
        return self.stream_options is not None and self.stream_options.include_usage

    def refuse_unsupported(self) -> None:
        for name in ("logit_bias", "tools"):
            if getattr(self, name):
                raise ApiError(400, f"{name} is not supported by llmkit serve; remove it from the request",
                               "unsupported_parameter", name)
        if self.stream_options is not None and not self.stream:
            raise ApiError(400, "stream_options is only allowed with stream=true", "invalid_value", "stream_options")


class ChatCompletionRequest(_Generation):
    messages: list[Message] = Field(min_length=1)
    max_completion_tokens: int | None = Field(default=None, ge=1)
    logprobs: bool = False
    top_logprobs: int | None = Field(default=None, ge=0, le=MAX_TOP_LOGPROBS)

    def new_tokens(self) -> int | None:
        return self.max_completion_tokens if self.max_completion_tokens is not None else self.max_tokens

    def logprob_count(self) -> int | None:
        """None: no log-probs; k: the chosen token's and the k most likely ones (top_logprobs needs logprobs)."""
        if self.top_logprobs is not None and not self.logprobs:
            raise ApiError(400, "top_logprobs needs logprobs=true", "invalid_value", "top_logprobs")
        return (self.top_logprobs or 0) if self.logprobs else None


class CompletionRequest(_Generation):
    prompt: str | list[str] | list[int] | list[list[int]]
    logprobs: int | None = Field(default=None, ge=0, le=MAX_TOP_LOGPROBS)
    echo: bool = False  # refused when true: not implemented
    suffix: str | None = None  # refused when given: not implemented

    def new_tokens(self) -> int | None:
        return self.max_tokens

    def logprob_count(self) -> int | None:
        return self.logprobs

    def prompts(self) -> list[str | list[int]]:
        """The prompts in the body, each a text or a list of token ids (OpenAI's four shapes of `prompt`)."""
        prompt = self.prompt
        if isinstance(prompt, str):
            return [prompt]
        if not prompt:
            raise ApiError(400, "prompt is an empty list; give a string or a non-empty list", "invalid_value", "prompt")
        if isinstance(prompt[0], int):
            return [list(prompt)]
        return list(prompt)

    def refuse_unsupported(self) -> None:
        super().refuse_unsupported()
        if self.echo or self.suffix is not None:
            name = "echo" if self.echo else "suffix"
            raise ApiError(400, f"{name} is not supported by llmkit serve; remove it from the request",
                           "unsupported_parameter", name)


def parse_body(raw: bytes, model: type[_Generation]) -> Any:
    """The validated request from a raw body: one ApiError (400) for bytes that are not UTF-8, text that is not a JSON
    object, or a field of the wrong type or out of range (the first one, named as the API spells it)."""
    if len(raw) > MAX_BODY_BYTES:
        raise body_too_large(len(raw))
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as error:
        raise ApiError(400, f"the request body is not UTF-8 (byte {raw[error.start]:#04x} at offset {error.start:,}); "
                       "send JSON encoded as UTF-8", "invalid_encoding") from None
    try:
        body = json.loads(text)
    except json.JSONDecodeError as error:
        raise ApiError(400, f"the request body is not valid JSON ({error.msg} at line {error.lineno} column "
                       f"{error.colno}); send one JSON object", "invalid_json") from None
    if not isinstance(body, dict):
        raise ApiError(400, f"the request body is a JSON {type(body).__name__}; send one JSON object", "invalid_json")
    try:
        request = model.model_validate(body)
    except ValidationError as error:
        raise validation_error(error) from None
    request.refuse_unsupported()
    return request


def body_too_large(size: int) -> ApiError:
    return ApiError(400, f"the request body has {size:,} bytes; the limit is {MAX_BODY_BYTES:,}: send a shorter "
                    "prompt", "request_too_large")


def validation_error(error: ValidationError) -> ApiError:
    """The first problem pydantic found, as one line naming the field (messages[0].content) and what it must be."""
    errors = error.errors()
    first = errors[0]
    param = _param(first["loc"])
    # A field that takes several types (content: a string or a list of parts) fails once per type: name them all.
    wanted = list(dict.fromkeys(e["msg"].lower().removeprefix("input should be ") for e in errors
                                if _param(e["loc"]) == param and e.get("input") is first.get("input")))
    code = "missing_required_parameter" if first["type"] == "missing" else "invalid_type"
    if first["type"].startswith(("greater", "less", "too_short", "too_long", "literal")):
        code = "invalid_value"
    shown = json.dumps(first.get("input"), default=str)[:60] if first["type"] != "missing" else ""
    said = first["msg"].lower() if len(wanted) == 1 else "should be " + " or ".join(wanted)
    message = f"{param}: {said}" + (f" (got {shown})" if shown else "")
    return ApiError(400, message, code, param)


def _param(loc: tuple[Any, ...]) -> str | None:
    """A pydantic location as the API spells the field: messages[0].content (union member tags such as `str` or
    `list[TextPart]` dropped)."""
    parts = []
    for part in loc:
        if isinstance(part, int):
            parts.append(f"[{part}]")
        elif part in ("str", "int", "float", "bool") or "[" in part or "-" in part:
            continue
        else:
            parts.append(f".{'schema' if part == 'schema_' else part}")
    return "".join(parts).lstrip(".") or None


# ---- responses -----------------------------------------------------------------------------------------------------


def new_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:24]}"


def now() -> int:
    return int(time.time())


def usage(prompt_tokens: int, completion_tokens: int) -> dict[str, int]:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}


def finite(logprob: float) -> float:
    """JSON has no -inf: a token the model gives probability 0 reports OpenAI's floor, -9999.0."""
    return logprob if math.isfinite(logprob) else -9999.0


def chat_logprobs(entries: list[tuple[str, float, list[tuple[str, float]]]]) -> dict[str, Any]:
    """Chat format: {"content": [{"token", "logprob", "bytes", "top_logprobs": [...]}, ...]}."""
    def item(token: str, logprob: float) -> dict[str, Any]:
        return {"token": token, "logprob": finite(logprob), "bytes": list(token.encode("utf-8"))}

    return {"content": [{**item(token, logprob), "top_logprobs": [item(t, lp) for t, lp in top]}
                        for token, logprob, top in entries], "refusal": None}


def completion_logprobs(entries: list[tuple[str, float, list[tuple[str, float]]]], offset: int = 0) -> dict[str, Any]:
    """Completions format: parallel lists tokens / token_logprobs / top_logprobs / text_offset."""
    offsets = []
    for token, _, _ in entries:
        offsets.append(offset)
        offset += len(token)
    return {"tokens": [token for token, _, _ in entries],
            "token_logprobs": [finite(logprob) for _, logprob, _ in entries],
            "top_logprobs": [{t: finite(lp) for t, lp in top} for _, _, top in entries],
            "text_offset": offsets}


def chat_completion(id_: str, model: str, choices: list[dict[str, Any]], used: dict[str, int]) -> dict[str, Any]:
    return {"id": id_, "object": "chat.completion", "created": now(), "model": model,
            "system_fingerprint": SYSTEM_FINGERPRINT, "choices": choices, "usage": used}


def chat_choice(index: int, text: str, finish_reason: str, logprobs: dict[str, Any] | None) -> dict[str, Any]:
    return {"index": index, "message": {"role": "assistant", "content": text, "refusal": None},
            "logprobs": logprobs, "finish_reason": finish_reason}


def chat_chunk(id_: str, model: str, choices: list[dict[str, Any]], used: dict[str, int] | None = None) -> dict[str, Any]:
    chunk = {"id": id_, "object": "chat.completion.chunk", "created": now(), "model": model,
             "system_fingerprint": SYSTEM_FINGERPRINT, "choices": choices}
    if used is not None:
        chunk["usage"] = used
    return chunk


def chat_delta(index: int, delta: dict[str, Any], finish_reason: str | None = None,
               logprobs: dict[str, Any] | None = None) -> dict[str, Any]:
    return {"index": index, "delta": delta, "logprobs": logprobs, "finish_reason": finish_reason}


def text_completion(id_: str, model: str, choices: list[dict[str, Any]], used: dict[str, int] | None,
                    chunk: bool = False) -> dict[str, Any]:
    # OpenAI's completion chunks carry object "text_completion" too.
    result = {"id": id_, "object": "text_completion", "created": now(), "model": model,
              "system_fingerprint": SYSTEM_FINGERPRINT, "choices": choices}
    if used is not None or not chunk:
        result["usage"] = used
    return result


def text_choice(index: int, text: str, finish_reason: str | None, logprobs: dict[str, Any] | None) -> dict[str, Any]:
    return {"index": index, "text": text, "logprobs": logprobs, "finish_reason": finish_reason}


def model_list(model: str, created: int, adapters: list[str] = ()) -> dict[str, Any]:
    """The base model, then each LoRA adapter served on it (`parent`: the base, as vLLM lists LoRA modules)."""
    return {"object": "list", "data": [model_card(model, created)] + [model_card(name, created, model)
                                                                       for name in adapters]}


def model_card(model: str, created: int, parent: str | None = None) -> dict[str, Any]:
    card = {"id": model, "object": "model", "created": created, "owned_by": "llmkit"}
    return card if parent is None else {**card, "parent": parent, "root": parent}


class AdapterLoadRequest(_Strict):
    """POST /v1/adapters: offer the LoRA adapter directory `path` (on the server's disk) under `name`."""

    name: str
    path: str

    def refuse_unsupported(self) -> None:
        """Nothing to refuse (parse_body calls it on every body)."""
