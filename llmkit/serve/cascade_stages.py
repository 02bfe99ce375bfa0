"""A cascade that runs: stages that answer a prompt, scorers that judge an answer, and the escalation loop.

A stage is a name, a price (llmkit.serve.cascade.Price) and a callable prompt -> Answer; tests pass any callable,
`choice_answerer` / `generation_answerer` build one from an llmkit model. A scorer maps an Answer to a number, the
higher the surer (FrugalGPT's scoring function g):

- `mean_logprob`: the model's own mean token log-probability of its answer, (1/n) sum_t log p(a_t | prompt, a_<t);
  exp(-mean_logprob) is the answer's perplexity, the source documents' rule (escalate a high-perplexity answer).
- `sample_agreement`: the share of n sampled answers (temperature > 0) equal to the greedy answer, a
  self-consistency check (Wang et al. 2023); the samples are calls too, and the stage's token counts include them.
- `trained_scorer(LogisticScorer)`: a logistic regression on `answer_features` (router.py), fitted on a labelled
  split to predict "this answer is right".
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from fractions import Fraction

import torch

from llmkit.errors import LlmkitError
from llmkit.serve.cascade import Price
from llmkit.serve.router import LogisticScorer

FEATURE_NAMES = ("mean_logprob", "min_logprob", "answer_tokens", "option_margin")


@dataclass(frozen=True)
class Answer:
    """One stage's answer to one prompt, with what it cost in tokens and what the scorers read."""

    text: str
    input_tokens: int  # prompt tokens read, over every call the stage made (samples included)
    output_tokens: int  # answer tokens produced or scored, over every call
    token_logprobs: tuple[float, ...]  # log p of each token of `text`
    samples: tuple[str, ...] = ()  # extra sampled answers, for sample_agreement
    margin: float = 0.0  # choice answers: log p(chosen option) - log p(runner-up); 0 for generated text


Scorer = Callable[[Answer], float]


def mean_logprob(answer: Answer) -> float:
    """Mean token log-probability of the answer (-inf for an empty answer: nothing to be sure of)."""
    return sum(answer.token_logprobs) / len(answer.token_logprobs) if answer.token_logprobs else -math.inf


def sample_agreement(answer: Answer) -> float:
    """Share of the sampled answers equal (after stripping whitespace) to the answer itself."""
    if not answer.samples:
        raise LlmkitError("the sample-agreement scorer needs sampled answers; build the stage with n_samples >= 1")
    return sum(sample.strip() == answer.text.strip() for sample in answer.samples) / len(answer.samples)


def answer_features(answer: Answer) -> list[float]:
    """The features FEATURE_NAMES names, for a trained scorer."""
    lowest = min(answer.token_logprobs) if answer.token_logprobs else -100.0
    return [max(mean_logprob(answer), -100.0), lowest, float(len(answer.token_logprobs)), answer.margin]


def trained_scorer(logistic: LogisticScorer) -> Scorer:
    """A scorer that returns the fitted logistic regression's probability that the answer is right."""
    if tuple(logistic.names) != FEATURE_NAMES:
        raise LlmkitError(f"the trained scorer was fitted on features {list(logistic.names)}; a cascade scorer reads "
                          f"{list(FEATURE_NAMES)}: refit it on answer_features")
    return lambda answer: float(logistic.probability(torch.tensor([answer_features(answer)]))[0])


SCORERS: dict[str, Scorer] = {"mean_logprob": mean_logprob, "sample_agreement": sample_agreement}


@dataclass(frozen=True)
class Stage:
    """A model in a cascade: its name, its price, how it answers, and the score its answer needs to be final."""

    name: str
    answer: Callable[[str], Answer]
    price: Price
    threshold: float = math.inf  # ignored for the last stage
    scorer: Scorer | None = None  # this stage's own scorer (a trained one is fitted per stage); None: the cascade's

    def cost(self, answer: Answer) -> Fraction:
        return self.price.cost(answer.input_tokens, answer.output_tokens)


@dataclass(frozen=True)
class StepRecord:
    stage: str
    score: float
    cost: Fraction


@dataclass(frozen=True)
class CascadeResult:
    """The final answer, which stage gave it, what the query cost in all, and each stage's score and cost."""

    text: str
    stage: str
    stage_index: int
    cost: Fraction
    steps: tuple[StepRecord, ...] = field(default_factory=tuple)


@dataclass(frozen=True)
class Cascade:
    """Stages cheapest first; a stage's answer is final when its score (the stage's scorer, else `scorer`) is >= its
    threshold, or when it is the last stage."""

    stages: tuple[Stage, ...]
    scorer: Scorer = mean_logprob

    def __post_init__(self) -> None:
        if not self.stages:
            raise LlmkitError("a cascade needs at least one stage; pass --models with one model or more")

    def __call__(self, prompt: str) -> CascadeResult:
        steps, total = [], Fraction(0)
        for index, stage in enumerate(self.stages):
            answer = stage.answer(prompt)
            cost = stage.cost(answer)
            total += cost
            last = index == len(self.stages) - 1
            score = (stage.scorer or self.scorer)(answer)
            steps.append(StepRecord(stage.name, score, cost))
            if last or score >= stage.threshold:
                return CascadeResult(answer.text, stage.name, index, total, tuple(steps))
        raise AssertionError("unreachable: the last stage always answers")


# ----------------------------------------------------------------------------- stages from llmkit models

def choice_answers(model, tokenizer, prompts: Sequence[str], options: Sequence[str],  # noqa: ANN001
                   batch_size: int = 8, progress: bool = False) -> list[Answer]:
    """Each prompt answered by the option the model finds likeliest (log p(option | prompt), summed over its tokens,
    as lm-eval scores multiple choice). Input tokens: the prompt's (as encode_pairs splits it); output tokens: the
    chosen option's. All options are read in one forward with the prompt (one-token options share one row)."""
    from llmkit.eval.scoring import encode_pairs, token_logprobs_of_pairs

    if len(options) < 2:
        raise LlmkitError(f"a choice stage needs two options or more; got {list(options)}")
    requests = [(prompt, option) for prompt in prompts for option in options]
    pairs = encode_pairs(tokenizer, requests)
    scored = token_logprobs_of_pairs(model, pairs, batch_size, progress)
    answers = []
    for p in range(len(prompts)):
        rows = range(p * len(options), (p + 1) * len(options))
        totals = sorted(((sum(scored[r][0]), r) for r in rows), reverse=True)
        best = totals[0][1]
        answers.append(Answer(options[best - p * len(options)], len(pairs[best][0]), len(pairs[best][1]),
                              tuple(scored[best][0]), margin=totals[0][0] - totals[1][0]))
    return answers


def choice_answerer(model, tokenizer, options: Sequence[str]) -> Callable[[str], Answer]:  # noqa: ANN001
    """A stage's answer callable that picks one of `options` (see choice_answers)."""
    return lambda prompt: choice_answers(model, tokenizer, [prompt], options)[0]


def generation_answerer(model, tokenizer, max_new_tokens: int = 32, n_samples: int = 0,  # noqa: ANN001
                        temperature: float = 0.7, seed: int = 0,
                        stop_strings: Sequence[str] = ()) -> Callable[[str], Answer]:
    """A stage's answer callable that decodes greedily with llmkit.generate, scores the answer's tokens with the same
    model, and (n_samples > 0) draws that many sampled answers at `temperature`, seeds seed, seed + 1, ...
    Output tokens are those of the answer texts as the tokenizer encodes them (the tokens scored); every call reads
    the whole prompt, so input tokens are the prompt's times 1 + n_samples."""
    from llmkit.eval.scoring import token_logprobs_of_pairs
    from llmkit.generate import SamplingSettings, generate

    def answer(prompt: str) -> Answer:
        text = generate(model, tokenizer, prompt, max_new_tokens, stop_strings=stop_strings)
        prompt_ids, answer_ids = tokenizer.encode(prompt), tokenizer.encode(text) if text else []
        logprobs = token_logprobs_of_pairs(model, [(prompt_ids, answer_ids)])[0][0] if answer_ids else []
        samples = tuple(
            generate(model, tokenizer, prompt, max_new_tokens, SamplingSettings(temperature=temperature, seed=seed + s),
                     stop_strings=stop_strings)
            for s in range(n_samples)
        )
        output_tokens = len(answer_ids) + sum(len(tokenizer.encode(sample)) for sample in samples if sample)
        return Answer(text, len(prompt_ids) * (1 + n_samples), output_tokens, tuple(logprobs), samples)

    return answer
