"""The application layer's building blocks: a language model behind one small interface, prompt templates, output
parsers and conversation memory, joined by `Pipeline` (template -> model -> parser, with memory). RAG, few-shot and
chain-of-thought prompting, PAL and the ReAct agent are all built from these; what LangChain calls a chain is here
one small object you can read.

    model = LocalModel(decoder, tokenizer)                       # or any object with TextModel's methods
    ask = Pipeline(PromptTemplate("Q: {question}\\nA:"), model, parser=str.strip, max_new_tokens=64)
    ask(question="What is the capital of France?")              # -> 'Paris.'

`TextModel` is what an application asks of a model: complete prompts (a batch, for self-consistency's samples),
complete under a JSON schema (tool calls a small model cannot get wrong: llmkit.generate.constrained), turn chat
messages into a prompt (the model's chat template), count tokens (to fit a context window). Tests drive the
applications with a scripted stand-in that has the same methods.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import Any, Protocol

import torch

from llmkit.data.templates import PromptTemplate
from llmkit.errors import LlmkitError
from llmkit.generate import SamplingSettings, generate
from llmkit.generate.constrained import JsonConstraint, generate_constrained
from llmkit.tokenizer import Tokenizer

DEFAULT_BATCH_SIZE = 8  # prompts per batched generate call


class TextModel(Protocol):
    """What applications need from a language model (LocalModel is llmkit's; tests use a scripted one)."""

    @property
    def context_window(self) -> int:
        """Tokens of prompt plus new tokens the model can hold."""
        ...

    def complete(self, prompts: Sequence[str], max_new_tokens: int, settings: SamplingSettings | None = None,
                 stop: Sequence[str] = ()) -> list[str]:
        """The continuation of each prompt (new text only), cut before the first of `stop`."""
        ...

    def complete_json(self, prompt: str, schema: Mapping[str, Any], max_new_tokens: int,
                      settings: SamplingSettings | None = None) -> str:
        """A continuation that is a JSON document the schema accepts (json_schema.py's subset), whole within
        max_new_tokens."""
        ...

    def chat_prompt(self, messages: Sequence[Mapping[str, str]]) -> str:
        """The prompt for the next assistant turn after `messages` ({"role", "content"} dicts)."""
        ...

    def count_tokens(self, text: str) -> int:
        """Tokens `text` takes in a prompt."""
        ...


def has_chat_template(model: TextModel) -> bool:
    """Whether `model` can lay out chat messages (an instruct model); a base model's `chat_prompt` refuses."""
    try:
        model.chat_prompt([{"role": "user", "content": "?"}])
    except LlmkitError:
        return False
    return True


@dataclass
class LocalModel:
    """An llmkit decoder and its tokenizer as a TextModel (load one with llmkit.commands.common.load_decoder or
    llmkit.checkpoints.load_model). Prompts are generated in batches of `batch_size`."""

    model: torch.nn.Module
    tokenizer: Tokenizer
    batch_size: int = DEFAULT_BATCH_SIZE

    @property
    def context_window(self) -> int:
        return self.model.config.max_seq_len

    def complete(self, prompts: Sequence[str], max_new_tokens: int, settings: SamplingSettings | None = None,
                 stop: Sequence[str] = ()) -> list[str]:
        if isinstance(prompts, str):
            raise LlmkitError("prompts is one string; pass a list of prompts (e.g. [prompt])")
        outputs: list[str] = []
        for start in range(0, len(prompts), self.batch_size):
            batch = list(prompts[start:start + self.batch_size])
            outputs += generate(self.model, self.tokenizer, batch, max_new_tokens, settings, stop_strings=stop)
        return outputs

    def complete_json(self, prompt: str, schema: Mapping[str, Any], max_new_tokens: int,
                      settings: SamplingSettings | None = None) -> str:
        constraint = JsonConstraint(self.tokenizer, dict(schema), max_tokens=max_new_tokens)
        return generate_constrained(self.model, self.tokenizer, prompt, constraint, max_new_tokens, settings)

    def chat_prompt(self, messages: Sequence[Mapping[str, str]]) -> str:
        if self.tokenizer.chat_template is None:
            raise LlmkitError("this model's tokenizer has no chat template; use an instruct model (e.g. the default "
                              "SmolLM2-135M-Instruct) or plain prompts")
        return self.tokenizer.apply_chat_template(list(messages), add_generation_prompt=True)

    def count_tokens(self, text: str) -> int:
        return len(self.tokenizer.encode(text))


@dataclass
class ConversationMemory:
    """The turns of a conversation so far, kept to the last `max_turns` exchanges (None: all). A system message,
    if any, always stays first."""

    system: str | None = None
    max_turns: int | None = None
    turns: list[tuple[str, str]] = field(default_factory=list)  # (user, assistant)

    def __post_init__(self) -> None:
        if self.max_turns is not None and self.max_turns < 0:
            raise LlmkitError(f"max_turns={self.max_turns} must be >= 0 (0 keeps no history)")

    def add(self, user: str, assistant: str) -> None:
        """Record one exchange, dropping the oldest beyond max_turns."""
        self.turns.append((user, assistant))
        if self.max_turns is not None:
            self.turns = self.turns[len(self.turns) - self.max_turns:] if self.max_turns else []

    def messages(self, next_user: str | None = None) -> list[dict[str, str]]:
        """The conversation as chat messages, with `next_user` appended as the newest user turn."""
        messages = [{"role": "system", "content": self.system}] if self.system else []
        for user, assistant in self.turns:
            messages += [{"role": "user", "content": user}, {"role": "assistant", "content": assistant}]
        if next_user is not None:
            messages.append({"role": "user", "content": next_user})
        return messages

    def clear(self) -> None:
        self.turns.clear()


@dataclass
class Pipeline:
    """template -> model -> parser. Calling it fills the template, sends it to the model (as a chat turn when
    `chat` is true or memory is given; as a raw prompt otherwise) and parses the reply; with memory the exchange
    is remembered, so the next call sees it.

    `parser` turns the reply text into the result (str.strip, a number extractor, json.loads...); a parser that
    raises ValueError makes the call raise LlmkitError naming the reply. `schema` constrains the reply to JSON the
    schema accepts (the parser then sees that JSON text)."""

    template: PromptTemplate | str
    model: TextModel
    parser: Callable[[str], Any] | None = None
    memory: ConversationMemory | None = None
    chat: bool = False
    max_new_tokens: int = 128
    settings: SamplingSettings = field(default_factory=SamplingSettings)
    stop: tuple[str, ...] = ()
    schema: Mapping[str, Any] | None = None

    def __post_init__(self) -> None:
        if isinstance(self.template, str):
            self.template = PromptTemplate(self.template)
        if self.max_new_tokens < 1:
            raise LlmkitError(f"max_new_tokens={self.max_new_tokens} must be >= 1")

    def prompt(self, **values: Any) -> str:
        """The exact prompt text the model would see for these values (with memory and chat template applied)."""
        return self._prompt_for(self.template.format(**values))

    def _prompt_for(self, text: str) -> str:
        if self.memory is not None:
            return self.model.chat_prompt(self.memory.messages(text))
        return self.model.chat_prompt([{"role": "user", "content": text}]) if self.chat else text

    def __call__(self, **values: Any) -> Any:
        return self.run(**values)[1]

    def run(self, **values: Any) -> tuple[str, Any]:
        """(reply text, parsed result) for one call."""
        text = self.template.format(**values)
        prompt = self._prompt_for(text)
        if self.schema is not None:
            reply = self.model.complete_json(prompt, self.schema, self.max_new_tokens, self.settings)
        else:
            reply = self.model.complete([prompt], self.max_new_tokens, self.settings, self.stop)[0]
        if self.memory is not None:
            self.memory.add(text, reply)
        return reply, self.parse(reply)

    def sample(self, n: int, seed: int | None = None, **values: Any) -> list[tuple[str, Any]]:
        """`n` replies to one prompt in a batch (sampling settings as given; `seed` overrides theirs), each parsed;
        a reply the parser rejects is paired with None. For self-consistency and best-of-n; memory is not updated."""
        if n < 1:
            raise LlmkitError(f"n={n} must be >= 1")
        settings = self.settings if seed is None else replace(self.settings, seed=seed)
        replies = self.model.complete([self.prompt(**values)] * n, self.max_new_tokens, settings, self.stop)
        results = []
        for reply in replies:
            try:
                results.append((reply, self._parse_or_raise(reply)))
            except ValueError:
                results.append((reply, None))
        return results

    def parse(self, reply: str) -> Any:
        try:
            return self._parse_or_raise(reply)
        except ValueError as error:
            raise LlmkitError(f"could not parse the model's reply {reply[:80]!r}: {error}") from None

    def _parse_or_raise(self, reply: str) -> Any:
        return reply if self.parser is None else self.parser(reply)
