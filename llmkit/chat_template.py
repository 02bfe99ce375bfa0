"""Chat templates: the jinja programs (shipped with each chat model) that turn a list of messages into
the exact prompt text the model was trained on. Rendered in a sandbox with the settings
`transformers` uses (trim_blocks, lstrip_blocks, loop controls, unescaped tojson), so both agree."""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from functools import lru_cache
from typing import Any

import jinja2
import jinja2.ext
from jinja2.sandbox import ImmutableSandboxedEnvironment

from llmkit.errors import LlmkitError


def render_chat_template(
    source: str, messages: Sequence[Mapping[str, Any]], add_generation_prompt: bool = True, **variables: Any
) -> str:
    """Render `messages` ([{'role': ..., 'content': ...}]) with the jinja template `source`."""
    for index, message in enumerate(messages):
        if not isinstance(message, Mapping) or "role" not in message or "content" not in message:
            raise LlmkitError(
                f"message {index} ({message!r:.80}) needs 'role' and 'content' keys, "
                "e.g. {'role': 'user', 'content': 'Hello'}"
            )
    template = _compile_template(source)
    try:
        return template.render(
            messages=[dict(message) for message in messages], add_generation_prompt=add_generation_prompt, **variables
        )
    except jinja2.TemplateError as error:
        raise LlmkitError(f"the chat template failed on these messages: {error}") from error


def _raise_template_exception(message: str) -> None:
    raise jinja2.TemplateError(message)


def _tojson(value: Any, ensure_ascii: bool = False, indent: int | None = None, separators=None, sort_keys=False) -> str:
    # Like transformers: no HTML escaping (jinja's own tojson would turn '<' into '\u003c').
    return json.dumps(value, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)


@lru_cache(maxsize=16)
def _compile_template(source: str) -> jinja2.Template:
    """Compile a chat template in a sandbox with the settings transformers uses, so both render alike."""
    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=[jinja2.ext.loopcontrols])
    env.filters["tojson"] = _tojson
    env.globals["raise_exception"] = _raise_template_exception
    try:
        return env.from_string(source)
    except jinja2.TemplateSyntaxError as error:
        raise LlmkitError(f"the chat template is not valid jinja (line {error.lineno}: {error.message})") from error
