"""Retrieval-augmented generation (Lewis et al. 2020, "Retrieval-Augmented Generation for Knowledge-Intensive NLP
Tasks"), the way a prompt-level RAG works: retrieve the k chunks nearest the question, put them in the prompt as
numbered sources, ask the model to answer from them and cite them as [i].

Packing: chunks go into the prompt in rank order while the whole chat prompt still fits the budget,

    tokens(prompt with sources 1..n) + max_new_tokens <= context window   (or --context_tokens, when smaller)

A chunk that does not fit is left out whole, never cut mid-way (a cut chunk would put words in a source's mouth);
the next, shorter ones may still fit. What was left out is reported (`RagAnswer.dropped`). The answer's [i] marks
are read back, so a reader sees which of the packed sources the model says it used.

The model is any TextModel (llmkit.apps.pipeline): its chat template builds the prompt, its tokenizer counts it.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass, field

from llmkit.apps.index import RagIndex
from llmkit.apps.pipeline import TextModel
from llmkit.apps.retrieve import Hit, Method, search
from llmkit.errors import LlmkitError
from llmkit.generate import SamplingSettings

SYSTEM_PROMPT = "You are a helpful assistant that answers questions from the given sources."
# after the question, where a small model still reads it (SmolLM2-135M cited no source with the rule in the system
# prompt, and cited [1] with it here, on the same retrieved chunks)
ANSWER_RULE = "Answer in one sentence from the sources, and cite the source number in brackets, like [1]."
CITATION = re.compile(r"\[(\d+)\]")


@dataclass(frozen=True)
class PackedPrompt:
    """The prompt the model sees, the sources in it (numbered 1..n in this order) and the retrieved chunks left out."""

    prompt: str
    sources: list[Hit]
    dropped: list[Hit]
    n_tokens: int


@dataclass(frozen=True)
class RagAnswer:
    """An answer with the sources it was given; `cited` are the source numbers (1-based) the answer mentions."""

    question: str
    answer: str
    sources: list[Hit]
    cited: list[int]
    dropped: list[Hit] = field(default_factory=list)
    prompt_tokens: int = 0

    def format(self) -> str:
        """The answer, then each source with its number, document and the exact text quoted (cited ones marked *)."""
        lines = [self.answer.strip(), "", "Sources:"]
        for number, hit in enumerate(self.sources, start=1):
            mark = "*" if number in self.cited else " "
            lines.append(f"{mark}[{number}] {hit.title} (document {hit.doc_id!r}, characters {hit.char_start}-"
                         f"{hit.char_end}): {' '.join(hit.text.split())}")
        if self.dropped:
            lines.append(f"({len(self.dropped)} retrieved chunk(s) did not fit the context budget and were left out)")
        return "\n".join(lines)


def rag_messages(question: str, sources: Sequence[Hit]) -> list[dict[str, str]]:
    """The chat messages: a system prompt, then the numbered sources, the question and the rule to cite."""
    blocks = "\n\n".join(f"[{number}] {hit.title}: {hit.text}" for number, hit in enumerate(sources, start=1))
    user = (f"Sources:\n{blocks}\n\n" if sources else "") + f"Question: {question}\n{ANSWER_RULE}"
    return [{"role": "system", "content": SYSTEM_PROMPT}, {"role": "user", "content": user}]


def pack_prompt(model: TextModel, question: str, hits: Sequence[Hit], max_new_tokens: int,
                context_tokens: int | None = None) -> PackedPrompt:
    """The chat prompt with as many of `hits` (in rank order, each whole) as fit `context_tokens` (default: the
    model's context window) with `max_new_tokens` to spare."""
    window = model.context_window if context_tokens is None else min(context_tokens, model.context_window)
    budget = window - max_new_tokens
    bare = model.count_tokens(model.chat_prompt(rag_messages(question, [])))
    if bare > budget:
        raise LlmkitError(f"the question and instructions take {bare:,} tokens, and --max_new_tokens {max_new_tokens:,} "
                          f"leaves {budget:,} of the {window:,}-token context: shorten the question or pass a smaller "
                          "--max_new_tokens")
    kept: list[Hit] = []
    dropped: list[Hit] = []
    prompt, n_tokens = model.chat_prompt(rag_messages(question, [])), bare
    for hit in hits:
        candidate = model.chat_prompt(rag_messages(question, [*kept, hit]))
        length = model.count_tokens(candidate)
        if length <= budget:
            kept.append(hit)
            prompt, n_tokens = candidate, length
        else:
            dropped.append(hit)
    return PackedPrompt(prompt, kept, dropped, n_tokens)


def cited_sources(answer: str, n_sources: int) -> list[int]:
    """The source numbers [i] the answer mentions that exist (1..n_sources), in order of first mention."""
    numbers = (int(match) for match in CITATION.findall(answer))
    return list(dict.fromkeys(number for number in numbers if 1 <= number <= n_sources))


def answer_question(index: RagIndex, model: TextModel, question: str, k: int = 5, method: Method = "hybrid",
                    max_new_tokens: int = 256, context_tokens: int | None = None,
                    settings: SamplingSettings | None = None) -> RagAnswer:
    """Retrieve `k` chunks for the question, pack them into the prompt, generate, and read back the citations.
    `model` is a TextModel (llmkit.apps.LocalModel for an llmkit decoder); greedy decoding by default."""
    if max_new_tokens < 1:
        raise LlmkitError(f"--max_new_tokens {max_new_tokens} must be at least 1")
    hits = search(index, question, k, method)
    packed = pack_prompt(model, question, hits, max_new_tokens, context_tokens)
    answer = model.complete([packed.prompt], max_new_tokens, settings or SamplingSettings())[0]
    return RagAnswer(question, answer, packed.sources, cited_sources(answer, len(packed.sources)), packed.dropped,
                     packed.n_tokens)
