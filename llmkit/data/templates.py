"""Prompt templates for instruction tuning: turn one record (instruction / input / output, or a chat) into a
(prompt, completion) pair of strings. The loss later falls on the completion only.

- FLAN-style sets (Wei et al. 2022; Chung et al. 2022): several phrasings of one task, the phrasing of row r
  chosen by rotation, (seed + r) mod n, so a run sees every phrasing equally and the same seed gives the same
  data. `FLAN_DIALOGUE_SUMMARY` is FLAN's "samsum" set quoted in the source documents (7 phrasings).
- Alpaca (Taori et al. 2023): Stanford Alpaca's two prompts, with and without an input.
- chat: the model's own chat template (Tokenizer.apply_chat_template); the completion is the final assistant turn.

Non-chat prompts end with RESPONSE_DELIMITER, so the boundary between prompt and completion is explicit text
the model learns, and generation at inference time uses the same prompt (`render_prompt`).
"""

from __future__ import annotations

import string
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from llmkit.errors import LlmkitError

if TYPE_CHECKING:
    from llmkit.tokenizer import Tokenizer

RESPONSE_DELIMITER = "\n\n### Response:\n"  # ends every non-chat prompt; the completion starts right after it
ALPACA = "alpaca"
CHAT = "chat"
FLAN_DIALOGUE_SUMMARY_NAME = "flan_dialogue_summary"
USER_ROLE, ASSISTANT_ROLE = "user", "assistant"


@dataclass(frozen=True)
class SFTRecord:
    """One checked row: `output` is the text to learn; chat rows keep the messages before the final reply."""

    output: str
    instruction: str = ""
    input: str = ""
    messages: tuple[Mapping[str, str], ...] = ()
    origin: str = "record"  # "file, line N": error messages name it


@dataclass(frozen=True)
class FieldMap:
    """Which column of your data holds each field, e.g. DialogSum: FieldMap(input="dialogue", output="summary")."""

    instruction: str = "instruction"
    input: str = "input"
    output: str = "output"
    prompt: str = "prompt"
    completion: str = "completion"
    messages: str = "messages"


@dataclass(frozen=True)
class PromptTemplate:
    """One phrasing: `prompt` is a str.format pattern over the record's instruction/input fields."""

    prompt: str

    def fields(self) -> set[str]:
        """The record fields the pattern uses, e.g. {'input'}."""
        return {name for _, name, _, _ in string.Formatter().parse(self.prompt) if name}

    def format(self, **values: Any) -> str:
        """The pattern with its fields filled from `values` (extra values are ignored); a missing field raises
        LlmkitError naming it. Literal braces are written doubled, as in str.format: '{{' and '}}'."""
        missing = sorted(self.fields() - values.keys())
        if missing:
            raise LlmkitError(f"template {self.prompt[:60]!r} needs {', '.join(missing)}; pass "
                              f"{', '.join(f'{name}=...' for name in missing)}")
        return self.prompt.format(**values)


@dataclass(frozen=True)
class TemplateSet:
    """Several phrasings of one task (FLAN); row r of a run with `seed` uses phrasing (seed + r) mod n."""

    name: str
    templates: tuple[PromptTemplate, ...]

    def pick(self, row: int, seed: int = 0) -> PromptTemplate:
        return self.templates[(seed + row) % len(self.templates)]


# FLAN's samsum phrasings (google-research/FLAN, flan/templates.py), as quoted in the source documents; the
# first entry is garbled there ("[{"dialogue": ...") and is restored to FLAN's "{dialogue}\n\nBriefly summarize ...".
# The dialogue is the record's `input` (map it with FieldMap(input="dialogue", output="summary")).
FLAN_DIALOGUE_SUMMARY = TemplateSet(FLAN_DIALOGUE_SUMMARY_NAME, tuple(PromptTemplate(pattern) for pattern in (
    "{input}\n\nBriefly summarize that dialogue.",
    "Here is a dialogue:\n{input}\n\nWrite a short summary!",
    "Dialogue:\n{input}\n\nWhat is a summary of this dialogue?",
    "{input}\n\nWhat was that dialogue about, in two sentences or less?",
    "Here is a dialogue:\n{input}\n\nWhat were they talking about?",
    "Dialogue:\n{input}\n\nWhat were the main points in that conversation?",
    "Dialogue:\n{input}\n\nWhat was going on in that conversation?",
)))  # fmt: skip

# Stanford Alpaca's prompts (tatsu-lab/stanford_alpaca, train.py PROMPT_DICT); the "### Response:\n" ending is
# RESPONSE_DELIMITER, added by `render_prompt`.
ALPACA_WITH_INPUT = PromptTemplate(
    "Below is an instruction that describes a task, paired with an input that provides further context. "
    "Write a response that appropriately completes the request.\n\n"
    "### Instruction:\n{instruction}\n\n### Input:\n{input}"
)
ALPACA_NO_INPUT = PromptTemplate(
    "Below is an instruction that describes a task. Write a response that appropriately completes the request.\n\n"
    "### Instruction:\n{instruction}"
)

TEMPLATE_SETS: dict[str, TemplateSet] = {FLAN_DIALOGUE_SUMMARY_NAME: FLAN_DIALOGUE_SUMMARY}
TEMPLATE_NAMES = (ALPACA, CHAT, *TEMPLATE_SETS)

Template = str | TemplateSet  # a name from TEMPLATE_NAMES, or your own TemplateSet


def check_template(template: Template) -> Template:
    """The template to use: a TemplateSet for a set's name, 'alpaca' or 'chat' as is; unknown names raise."""
    if isinstance(template, TemplateSet):
        if not template.templates:
            raise LlmkitError(f"template set {template.name!r} holds no templates: give it at least one PromptTemplate")
        return template
    if template not in TEMPLATE_NAMES:
        raise LlmkitError(f"unknown template {template!r}; choose one of {', '.join(TEMPLATE_NAMES)} "
                          "or pass a TemplateSet")
    return TEMPLATE_SETS.get(template, template)


def render_prompt(
    record: SFTRecord, template: Template, row: int = 0, seed: int = 0, tokenizer: Tokenizer | None = None
) -> str:
    """The prompt text of a record: what the model sees before it should answer (training and inference)."""
    template = check_template(template)
    if template == CHAT:
        return _chat_prompt(_chat_messages(record), _need_tokenizer(tokenizer))
    if record.messages:
        raise LlmkitError(f"{record.origin}: a chat row (field 'messages') needs --template chat; the {_name(template)} "
                          "template formats instruction/input fields")
    if template == ALPACA:
        if not record.instruction:
            raise LlmkitError(f"{record.origin}: field 'instruction' is empty but the alpaca template needs it; map "
                              "the field that holds it with --fields.instruction NAME or choose another --template")
        pattern = ALPACA_WITH_INPUT if record.input else ALPACA_NO_INPUT
    else:
        pattern = template.pick(row, seed)
    values = {"instruction": record.instruction, "input": record.input}
    for name in sorted(pattern.fields()):
        if name not in values:
            raise LlmkitError(f"template {pattern.prompt!r} uses {{{name}}}; templates may use only "
                              "{instruction} and {input}")
        if not values[name]:
            raise LlmkitError(f"{record.origin}: field {name!r} is empty but the {_name(template)} template needs it; "
                              f"map the field that holds it with --fields.{name} NAME")
    return pattern.prompt.format(**values) + RESPONSE_DELIMITER


def render(
    record: SFTRecord, template: Template, row: int = 0, seed: int = 0, tokenizer: Tokenizer | None = None
) -> tuple[str, str]:
    """(prompt, completion) texts of a record. For chat the completion is the assistant turn as the model's
    template writes it (with its end-of-turn token); otherwise it is the output itself (EOS is added as an id)."""
    prompt = render_prompt(record, template, row, seed, tokenizer)
    if template != CHAT:
        return prompt, record.output
    messages = [*_chat_messages(record), {"role": ASSISTANT_ROLE, "content": record.output}]
    full = tokenizer.apply_chat_template(messages, add_generation_prompt=False)
    if not full.startswith(prompt):
        raise LlmkitError(f"{record.origin}: the model's chat template writes the conversation without the generation "
                          "prompt as its prefix, so prompt and completion cannot be split; use --template alpaca")
    return prompt, full[len(prompt):]


def _chat_messages(record: SFTRecord) -> list[Mapping[str, Any]]:
    """The conversation before the reply: a chat row's messages, or one user turn of instruction and input."""
    if record.messages:
        return list(record.messages)
    text = "\n\n".join(part for part in (record.instruction, record.input) if part)
    if not text:
        raise LlmkitError(f"{record.origin}: no instruction, input or messages to put in the user turn; map the "
                          "fields with FieldMap")
    return [{"role": USER_ROLE, "content": text}]


def _chat_prompt(messages: Sequence[Mapping[str, Any]], tokenizer: Tokenizer) -> str:
    return tokenizer.apply_chat_template(messages, add_generation_prompt=True)


def _need_tokenizer(tokenizer: Tokenizer | None) -> Tokenizer:
    if tokenizer is None:
        raise LlmkitError("template='chat' renders with the model's chat template: pass the tokenizer")
    return tokenizer


def _name(template: Template) -> str:
    return template.name if isinstance(template, TemplateSet) else template
