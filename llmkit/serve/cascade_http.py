"""The `cascade` model on `llmkit serve --cascade fitted.json`: a request whose `model` is "cascade" runs the
fitted cascade's stages in order (llmkit.serve.cascade_stages.Cascade) and returns the final answer in the OpenAI
shape, with an extra `cascade` field: which stage answered, each stage's score and cost, and the total cost (an
exact fraction as text, and a float).

It wraps the server's ASGI app rather than adding routes to it: a POST to /v1/chat/completions or /v1/completions
naming "cascade" is answered here, anything else goes to the app unchanged (its body replayed). A chat request's
prompt is its last user message; a completion request's is its `prompt` string. The stages answer as the fitted
cascade did on its task (choosing among its options), so send prompts shaped like the task's (e.g. "Review: ...
\nSentiment:"). The stages run in a worker thread, one request at a time.
"""

from __future__ import annotations

import asyncio
import json
import math
import time
import uuid
from collections.abc import Callable
from fractions import Fraction
from pathlib import Path
from typing import Any

from llmkit.errors import LlmkitError
from llmkit.io import read_json_object
from llmkit.serve.cascade import Price
from llmkit.serve.cascade_stages import SCORERS, Cascade, CascadeResult, Stage, choice_answerer, trained_scorer
from llmkit.serve.cascade_task import FITTED_FORMAT
from llmkit.serve.router import LogisticScorer

CASCADE_MODEL = "cascade"
CASCADE_ROUTES = ("/v1/chat/completions", "/v1/completions")
MAX_CASCADE_BODY_BYTES = 1 << 20


def load_cascade(path: str | Path, load: Callable[[Path], tuple[Any, Any]]) -> Cascade:
    """The Cascade a fitted cascade.json describes (what `llmkit cascade` writes); `load(model path)` gives each
    stage's (model, tokenizer)."""
    data = read_json_object(Path(path))
    if data.get("format") != FITTED_FORMAT:
        raise LlmkitError(f"--cascade {path} is not a fitted cascade (format {data.get('format')!r}, expected "
                          f"{FITTED_FORMAT!r}); write one with `llmkit cascade --output DIR` (DIR/cascade.json)")
    scorer_name, stages_data = data.get("scorer"), data.get("stages") or []
    trained = [LogisticScorer.from_json(item) for item in data.get("trained_scorers", [])]
    if scorer_name not in (*SCORERS, "trained") or (scorer_name == "trained" and len(trained) != len(stages_data) - 1):
        raise LlmkitError(f"--cascade {path}: scorer {scorer_name!r} is unknown or its trained scorers are missing; "
                          "refit it with `llmkit cascade`")
    stages = []
    for index, stage in enumerate(stages_data):
        model, tokenizer = load(Path(stage["model"]))
        threshold = math.inf if stage["threshold"] in (None, "inf") else float(stage["threshold"])
        scorer = trained_scorer(trained[index]) if scorer_name == "trained" and index < len(trained) else None
        stages.append(Stage(stage["name"], choice_answerer(model, tokenizer, data["options"]),
                            Price(*(Fraction(part) for part in stage["price"])), threshold, scorer))
    return Cascade(tuple(stages), SCORERS.get(scorer_name, SCORERS["mean_logprob"]))


def with_cascade(app: Any, cascade: Cascade, api_key: str | None = None) -> Callable:
    """`app` (ASGI) with requests for the model "cascade" answered by `cascade`."""
    lock = asyncio.Lock()

    async def asgi(scope: dict, receive: Callable, send: Callable) -> None:
        if scope["type"] != "http" or scope["method"] != "POST" or scope["path"] not in CASCADE_ROUTES:
            return await app(scope, receive, send)
        body, more = b"", True
        while more:
            message = await receive()
            body += message.get("body", b"")
            more = message.get("more_body", False) and len(body) <= MAX_CASCADE_BODY_BYTES
        request = _json_or_none(body)
        if not isinstance(request, dict) or request.get("model") != CASCADE_MODEL:
            replayed = False

            async def replay() -> dict:
                nonlocal replayed
                if replayed:
                    return await receive()
                replayed = True
                return {"type": "http.request", "body": body, "more_body": more}

            return await app(scope, replay, send)
        status, payload = await _answer(scope, request, cascade, api_key, lock)
        await send({"type": "http.response.start", "status": status,
                    "headers": [(b"content-type", b"application/json")]})
        await send({"type": "http.response.body", "body": json.dumps(payload).encode()})

    return asgi


def _json_or_none(body: bytes) -> Any:
    try:
        return json.loads(body)
    except ValueError:
        return None


def _error(status: int, message: str, code: str, param: str | None = None) -> tuple[int, dict]:
    return status, {"error": {"message": message, "type": "invalid_request_error", "param": param, "code": code}}


async def _answer(scope: dict, request: dict, cascade: Cascade, api_key: str | None,
                  lock: asyncio.Lock) -> tuple[int, dict]:
    headers = dict(scope.get("headers") or [])
    if api_key is not None and headers.get(b"authorization", b"").decode() != f"Bearer {api_key}":
        return _error(401, "the request has no or a wrong API key; send `Authorization: Bearer <key>` with the "
                      "server's --api_key", "invalid_api_key")
    chat = scope["path"] == "/v1/chat/completions"
    prompt = _chat_prompt(request) if chat else request.get("prompt")
    if not isinstance(prompt, str) or not prompt:
        what = "a last user message with text content" if chat else "a non-empty string `prompt`"
        return _error(400, f"the cascade model needs {what}", "invalid_value", "messages" if chat else "prompt")
    async with lock:  # one query at a time: the stages' models are not batched
        result = await asyncio.to_thread(cascade, prompt)
    return 200, _response(result, chat)


def _chat_prompt(request: dict) -> str | None:
    users = [m for m in request.get("messages") or [] if isinstance(m, dict) and m.get("role") == "user"]
    content = users[-1].get("content") if users else None
    return content if isinstance(content, str) else None


def _response(result: CascadeResult, chat: bool) -> dict:
    choice = ({"index": 0, "message": {"role": "assistant", "content": result.text}, "finish_reason": "stop"} if chat
              else {"index": 0, "text": result.text, "finish_reason": "stop", "logprobs": None})
    return {
        "id": f"{'chatcmpl' if chat else 'cmpl'}-{uuid.uuid4().hex}", "object": "chat.completion" if chat else
        "text_completion", "created": int(time.time()), "model": CASCADE_MODEL, "choices": [choice],
        "cascade": {"stage": result.stage, "stage_index": result.stage_index, "cost": str(result.cost),
                    "cost_float": float(result.cost),
                    "steps": [{"stage": s.stage, "score": s.score, "cost": str(s.cost)} for s in result.steps]},
    }
