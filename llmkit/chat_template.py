"""Chat templates: the jinja programs (shipped with each chat model) that turn a list of messages into
the exact prompt text the model was trained on. Rendered in a sandbox with the settings
`transformers` uses (trim_blocks, lstrip_blocks, loop controls, unescaped tojson), so both agree.

A template comes with a downloaded model, so it is untrusted code: besides jinja's sandbox (no private attributes,
no mutation of lists and dicts) each render is bounded. jinja's own `range` cap (MAX_RANGE = 100,000 items per call)
does not stop nested loops (100,000 x 100,000 runs for hours), so here every `range` draws from one budget of
MAX_LOOP_STEPS items per render, each step checks a MAX_RENDER_SECONDS deadline, `*` and `**` refuse results beyond
the output cap, and the rendered text may not exceed MAX_RENDERED_CHARS (plus twice the messages' own length, so a
long document in a message still renders). Real templates loop over the messages: a few hundred steps at most.
"""

from __future__ import annotations

import contextvars
import json
import operator
import time
from collections.abc import Iterator, Mapping, Sequence
from functools import lru_cache
from typing import Any

import jinja2
import jinja2.ext
from jinja2.sandbox import ImmutableSandboxedEnvironment

from llmkit.errors import LlmkitError

MAX_LOOP_STEPS = 1_000_000  # range() items per render, all loops together
MAX_RENDER_SECONDS = 10.0  # wall-clock time of one render
MAX_RENDERED_CHARS = 1_000_000  # rendered text beyond the messages' own length (times two)
MAX_POWER_EXPONENT = 1_000  # `a ** b`: a larger integer exponent could run for minutes

# A model without a chat template (a freshly pretrained one) chats by plain completion of this transcript
# (`llmkit chat` and `llmkit serve`'s /v1/chat/completions).
PLAIN_ROLES = {"system": "System", "user": "User", "assistant": "Assistant"}
PLAIN_STOP = "\nUser:"  # the model's reply ends where it starts writing the user's next turn


def plain_transcript(messages: Sequence[Mapping[str, str]]) -> str:
    """The conversation as plain text ("User: ...\nAssistant: ...\n"), ending with "Assistant:" for the reply."""
    lines = [f"{PLAIN_ROLES.get(message['role'], message['role'].title())}: {message['content']}" for message in messages]
    return "\n".join([*lines, "Assistant:"])


class TemplateLimitError(jinja2.TemplateError):
    """A render went past one of the limits above."""


class _Budget:
    """One render's allowance: loop steps left, its deadline and its output cap."""

    def __init__(self, max_chars: int) -> None:
        self.steps_left = MAX_LOOP_STEPS
        self.deadline = time.monotonic() + MAX_RENDER_SECONDS
        self.max_chars = max_chars

    def step(self) -> None:
        self.steps_left -= 1
        if self.steps_left < 0:
            raise TemplateLimitError(f"it ran more than {MAX_LOOP_STEPS:,} loop steps (range items)")
        if self.steps_left % 1024 == 0:
            self.check_time()

    def check_time(self) -> None:
        if time.monotonic() > self.deadline:
            raise TemplateLimitError(f"it ran longer than {MAX_RENDER_SECONDS:g} s")

    def check_size(self, n_chars: int) -> None:
        if n_chars > self.max_chars:
            raise TemplateLimitError(f"its text grew past {self.max_chars:,} characters")


_budget: contextvars.ContextVar[_Budget | None] = contextvars.ContextVar("chat_template_budget", default=None)


def render_chat_template(
    source: str,
    messages: Sequence[Mapping[str, Any]],
    add_generation_prompt: bool = True,
    name: str = "the chat template",
    **variables: Any,
) -> str:
    """Render `messages` ([{'role': ..., 'content': ...}]) with the jinja template `source` (called `name` in errors)."""
    for index, message in enumerate(messages):
        if not isinstance(message, Mapping) or "role" not in message or "content" not in message:
            raise LlmkitError(
                f"message {index} ({message!r:.80}) needs 'role' and 'content' keys, "
                "e.g. {'role': 'user', 'content': 'Hello'}"
            )
    template = _compile_template(source, name)
    budget = _Budget(MAX_RENDERED_CHARS + 2 * sum(len(str(message["content"])) for message in messages))
    token = _budget.set(budget)
    try:
        pieces: list[str] = []
        length = 0
        chunks = template.generate(
            messages=[dict(message) for message in messages], add_generation_prompt=add_generation_prompt, **variables
        )
        for chunk in chunks:
            pieces.append(chunk)
            length += len(chunk)
            budget.check_size(length)
            budget.check_time()
        return "".join(pieces)
    except TemplateLimitError as error:
        raise LlmkitError(
            f"{name} was stopped: {error} (limits: {MAX_LOOP_STEPS:,} loop steps, {MAX_RENDER_SECONDS:g} s, "
            f"{budget.max_chars:,} characters); it is not a working chat template: fix it or use the model's original "
            "tokenizer_config.json"
        ) from None
    except jinja2.TemplateError as error:
        raise LlmkitError(f"{name} failed on these messages: {error}") from error
    finally:
        _budget.reset(token)


def _bounded_range(*args: int) -> Iterator[int]:
    """`range` for templates: jinja's per-call cap, and every item drawn from the render's budget."""
    from jinja2.sandbox import safe_range

    numbers = safe_range(*args)
    budget = _budget.get()
    if budget is None:  # rendered outside render_chat_template (not done in llmkit): jinja's cap only
        yield from numbers
        return
    for number in numbers:
        budget.step()
        yield number


def _raise_template_exception(message: str) -> None:
    raise jinja2.TemplateError(message)


def _tojson(value: Any, ensure_ascii: bool = False, indent: int | None = None, separators=None, sort_keys=False) -> str:
    # Like transformers: no HTML escaping (jinja's own tojson would turn '<' into '\u003c').
    return json.dumps(value, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)


class _BoundedEnvironment(ImmutableSandboxedEnvironment):
    """jinja's immutable sandbox whose `*` and `**` cannot build a result past the render's limits."""

    intercepted_binops = frozenset({"*", "**"})

    def call_binop(self, context: jinja2.runtime.Context, operator_name: str, left: Any, right: Any) -> Any:
        if operator_name == "**" and isinstance(left, int) and isinstance(right, int) and abs(right) > MAX_POWER_EXPONENT:
            raise TemplateLimitError(f"its '** {right}' has an exponent above {MAX_POWER_EXPONENT:,}")
        if operator_name == "*":
            sequence, count = (left, right) if isinstance(right, int) else (right, left)
            if isinstance(sequence, (str, list, tuple)) and isinstance(count, int):
                budget = _budget.get()
                limit = budget.max_chars if budget is not None else MAX_RENDERED_CHARS
                if len(sequence) * count > limit:
                    raise TemplateLimitError(f"it would build {len(sequence) * count:,} items")
        return {"*": operator.mul, "**": operator.pow}[operator_name](left, right)

    def call(__self, __context: jinja2.runtime.Context, __obj: Any, *args: Any, **kwargs: Any) -> Any:  # noqa: N805
        budget = _budget.get()
        if budget is not None:  # every call in a template checks the clock (a loop over a long string has no range)
            budget.check_time()
        return super().call(__context, __obj, *args, **kwargs)


@lru_cache(maxsize=16)
def _compile_template(source: str, name: str = "the chat template") -> jinja2.Template:
    """Compile a chat template in a bounded sandbox with the settings transformers uses, so both render alike."""
    env = _BoundedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=[jinja2.ext.loopcontrols])
    env.filters["tojson"] = _tojson
    env.globals["raise_exception"] = _raise_template_exception
    env.globals["range"] = _bounded_range
    try:
        return env.from_string(source)
    except jinja2.TemplateSyntaxError as error:
        where = "" if name == "the chat template" else f" ({name})"
        raise LlmkitError(f"the chat template is not valid jinja (line {error.lineno}: {error.message}){where}") from error
