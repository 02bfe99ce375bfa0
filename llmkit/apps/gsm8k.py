"""GSM8K (Cobbe et al. 2021, "Training Verifiers to Solve Math Word Problems"; 1,319 test problems, MIT): prompting
methods side by side on one model, scored by exact match of the final number.

Each method is a function (model, problems) -> predictions, so a new one (PAL, a fine-tuned model's own format)
joins the table by being one more such function:

    direct              k solved examples whose answers are only "The answer is X." (standard prompting)
    zero_shot_cot       "Let's think step by step.", then "Therefore, the answer (arabic numerals) is" (Kojima et al.)
    fewshot_cot         k examples with worked rationales: the TRAIN split's solutions, calculator annotations
                        "<<48/2=24>>" removed, ending "The answer is X." (Wei et al. 2022)
    self_consistency    the few-shot CoT prompt, n chains sampled at temperature T, majority vote (Wang et al. 2023)
    pal                 the model writes `def solution():`, the sandbox runs it, the printed number is the answer
                        (Gao et al. 2022; llmkit.apps.pal, its own 3 worked programs as examples)

Examples come from the train split, so no test answer is ever shown; which ones is the Setup's choice (random per
problem, seeded; by similarity; fixed). A tiny model scores near 0 on GSM8K: the comparison between methods on the
same model and the same problems is the point, not the absolute figure.
"""

from __future__ import annotations

import re
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from fractions import Fraction
from functools import cached_property
from typing import Any, Literal

from llmkit.apps.answers import answers_match, extract_answer, first_number, format_number, reference_answer
from llmkit.apps.pal import EXAMPLES as PAL_EXAMPLES
from llmkit.apps.pal import pal_prompt, solve_with_program
from llmkit.apps.pipeline import TextModel, has_chat_template
from llmkit.apps.prompting import (
    ANSWER_TRIGGER,
    COT_TRIGGER,
    PLAIN_STOPS,
    Example,
    FewShotPrompt,
    FixedSelector,
    RandomSelector,
    SampledChains,
    SimilaritySelector,
    fewshot_prompt,
    self_consistency,
)
from llmkit.errors import LlmkitError
from llmkit.generate import SamplingSettings

SPLITS = ("test", "train")
DATA_FILE = "gsm8k/{split}.jsonl.gz"
Selection = Literal["random", "similar", "fixed"]
_CALCULATOR = re.compile(r"<<[^>]*>>")


@dataclass(frozen=True)
class Problem:
    """One GSM8K problem: its position in the split, the question, the reference solution and its final answer."""

    index: int
    question: str
    solution: str
    answer: Fraction


@dataclass
class Prediction:
    """A method's answer to one problem (None: no number found), the reply it came from and the prompt."""

    answer: Fraction | None
    reply: str
    prompt: str
    n_examples: int = 0
    vote_share: float | None = None  # self-consistency: votes for the answer / chains sampled
    replies: tuple[str, ...] = ()  # self-consistency: every sampled chain


Method = Callable[[TextModel, Sequence[Problem]], list[Prediction]]


def load_gsm8k(split: str = "test", limit: int | None = None) -> list[Problem]:
    """The problems of a split (../shared/data/gsm8k), in file order; the first `limit` of them if given."""
    from llmkit.data.jsonl import read_jsonl
    from llmkit.data.shared import shared_data_file

    if split not in SPLITS:
        raise LlmkitError(f"GSM8K split {split!r} does not exist; choose one of {', '.join(SPLITS)}")
    if limit is not None and limit < 1:
        raise LlmkitError(f"limit={limit} must be >= 1 (or None for the whole split)")
    path = shared_data_file(DATA_FILE.format(split=split))
    problems = []
    for index, (_, row) in enumerate(read_jsonl(path, fields=("question", "answer"))):
        if limit is not None and index >= limit:
            break
        problems.append(Problem(index, row["question"], row["answer"], reference_answer(row["answer"])))
    return problems


def gsm8k_problem(split: str, index: int, flag: str = "index") -> Problem:
    """Problem number `index` of a split; out of range raises LlmkitError naming `flag` and the valid range."""
    problems = load_gsm8k(split)
    if not 0 <= index < len(problems):
        raise LlmkitError(f"{flag} {index} is out of range; GSM8K's {split} split has problems 0-{len(problems) - 1}")
    return problems[index]


def rationale(solution: str) -> str:
    """A reference solution as a chain-of-thought exemplar: calculator annotations removed, the "#### X" line
    replaced by "The answer is X." (the form Wei et al.'s exemplars end in)."""
    steps = [_CALCULATOR.sub("", line).strip() for line in solution.splitlines() if not line.startswith("####")]
    return "\n".join([*filter(None, steps), f"The answer is {format_number(reference_answer(solution))}."])


# ----------------------------------------------------------------------------- the shared setup

@dataclass
class Setup:
    """What every method shares: the examples (pool, how many, how chosen), the prompt layout, the generation
    budgets and self-consistency's sampling. `chat` None: chat turns when the model has a chat template."""

    shots: int = 4
    selection: Selection = "random"
    seed: int = 1234
    chat: bool | None = None
    direct_tokens: int = 24  # reply budget of an answer-only reply
    cot_tokens: int = 256  # reply budget of a reasoning chain
    answer_tokens: int = 16  # zero-shot CoT's second call, after the answer trigger
    samples: int = 5  # self-consistency chains per problem
    temperature: float = 0.7
    pool: list[Problem] = field(default_factory=list, repr=False)  # empty: the train split
    embed: Callable[[Sequence[str]], Any] | None = field(default=None, repr=False)  # similar: None is MiniLM

    def __post_init__(self) -> None:
        for name in ("shots", "direct_tokens", "cot_tokens", "answer_tokens", "samples"):
            if getattr(self, name) < (0 if name == "shots" else 1):
                raise LlmkitError(f"{name}={getattr(self, name)} must be >= {0 if name == 'shots' else 1}")
        if self.selection not in ("random", "similar", "fixed"):
            raise LlmkitError(f"selection {self.selection!r} is not one of random, similar, fixed")

    @cached_property
    def examples_pool(self) -> list[Problem]:
        return self.pool or load_gsm8k("train")

    @cached_property
    def selector(self) -> RandomSelector | SimilaritySelector | FixedSelector:
        questions = [problem.question for problem in self.examples_pool]
        if self.selection == "similar":
            return SimilaritySelector(questions, self.embed)
        if self.selection == "fixed":
            return FixedSelector(questions, range(min(len(questions), self.shots + 1)))  # one spare for the query
        return RandomSelector(questions, self.seed)

    def examples(self, problem: Problem, with_rationale: bool) -> list[Example]:
        """The problem's few-shot examples, answered with a rationale or with the bare answer."""
        if self.shots == 0:
            return []
        chosen = [self.examples_pool[i] for i in self.selector.select(problem.question, self.shots, problem.index)]
        return [Example(shot.question, rationale(shot.solution) if with_rationale
                        else f"The answer is {format_number(shot.answer)}.") for shot in chosen]

    def uses_chat(self, model: TextModel) -> bool:
        return self.chat if self.chat is not None else has_chat_template(model)  # a base model: plain Q/A prompts

    def prompt(self, model: TextModel, problem: Problem, examples: Sequence[Example], max_new_tokens: int,
               answer_prefix: str = "") -> FewShotPrompt:
        return fewshot_prompt(model, examples, problem.question, max_new_tokens, self.uses_chat(model), answer_prefix)

    def stops(self, model: TextModel, *more: str) -> tuple[str, ...]:
        """Plain prompts stop where the model starts the next "Q:"; chat replies end at the end-of-turn token."""
        return () if self.uses_chat(model) else (*PLAIN_STOPS, *more)


# ----------------------------------------------------------------------------- the methods

def direct(model: TextModel, problems: Sequence[Problem], setup: Setup | None = None) -> list[Prediction]:
    """Standard few-shot prompting: examples answered "The answer is X.", greedy, answer only."""
    setup = setup or Setup()
    prompts = [setup.prompt(model, p, setup.examples(p, False), setup.direct_tokens) for p in problems]
    replies = model.complete([p.text for p in prompts], setup.direct_tokens, SamplingSettings(), setup.stops(model, "\n"))
    return [Prediction(extract_answer(reply), reply, prompt.text, prompt.n_examples)
            for prompt, reply in zip(prompts, replies)]


def zero_shot_cot(model: TextModel, problems: Sequence[Problem], setup: Setup | None = None) -> list[Prediction]:
    """Kojima et al.'s two calls: reason after "Let's think step by step.", then read the first number after
    "Therefore, the answer (arabic numerals) is"."""
    setup = setup or Setup()
    budget = setup.cot_tokens + setup.answer_tokens
    prompts = [setup.prompt(model, p, [], budget, COT_TRIGGER).text for p in problems]
    chains = model.complete(prompts, setup.cot_tokens, SamplingSettings(), setup.stops(model))
    second = [f"{prompt}{chain.rstrip()}\n{ANSWER_TRIGGER}" for prompt, chain in zip(prompts, chains)]
    answers = model.complete(second, setup.answer_tokens, SamplingSettings(), ("\n",))
    return [Prediction(first_number(answer), f"{chain.rstrip()}\n{ANSWER_TRIGGER}{answer}", prompt)
            for prompt, chain, answer in zip(prompts, chains, answers)]


def fewshot_cot(model: TextModel, problems: Sequence[Problem], setup: Setup | None = None) -> list[Prediction]:
    """Few-shot chain of thought: examples with rationales, greedy, the answer extracted from the chain."""
    setup = setup or Setup()
    prompts = [setup.prompt(model, p, setup.examples(p, True), setup.cot_tokens) for p in problems]
    replies = model.complete([p.text for p in prompts], setup.cot_tokens, SamplingSettings(), setup.stops(model))
    return [Prediction(extract_answer(reply), reply, prompt.text, prompt.n_examples)
            for prompt, reply in zip(prompts, replies)]


def self_consistency_cot(model: TextModel, problems: Sequence[Problem], setup: Setup | None = None) -> list[Prediction]:
    """The few-shot CoT prompt, `samples` chains at `temperature`, the majority answer (Wang et al. 2023)."""
    setup = setup or Setup()
    prompts = [setup.prompt(model, p, setup.examples(p, True), setup.cot_tokens) for p in problems]
    settings = SamplingSettings(temperature=setup.temperature, seed=setup.seed)
    voted = self_consistency(model, [p.text for p in prompts], setup.samples, setup.cot_tokens, settings,
                             extract_answer, setup.stops(model))
    return [Prediction(chains.vote.answer, _winning_chain(chains), prompt.text, prompt.n_examples, chains.vote.share,
                       chains.replies)
            for prompt, chains in zip(prompts, voted)]


def _winning_chain(chains: SampledChains) -> str:
    """The first chain that gave the majority answer (the first chain when none gave an answer)."""
    if chains.vote.answer is None:
        return chains.replies[0]
    return chains.replies[chains.vote.answers.index(chains.vote.answer)]


def program_aided(model: TextModel, problems: Sequence[Problem], setup: Setup | None = None) -> list[Prediction]:
    """PAL: a program per problem (greedy, up to the CoT budget), run in the sandbox; a program that does not
    parse, fails or prints no number gives no answer (the reason is in the reply field)."""
    setup = setup or Setup()
    predictions = []
    for problem in problems:
        result = solve_with_program(model, problem.question, setup.cot_tokens)
        printed = result.sandbox.stdout.strip().splitlines() if result.sandbox is not None else []
        reply = f"{result.code}\n# printed: {printed[-1][:200] if printed else ''}"
        reply += f"\n# no answer: {result.reason}" if result.reason else ""
        predictions.append(Prediction(result.answer, reply, pal_prompt(problem.question, model), len(PAL_EXAMPLES)))
    return predictions


METHODS: dict[str, Callable[..., list[Prediction]]] = {
    "direct": direct,
    "zero_shot_cot": zero_shot_cot,
    "fewshot_cot": fewshot_cot,
    "self_consistency": self_consistency_cot,
    "pal": program_aided,
}


def method_budget(name: str, setup: Setup) -> str:
    """The generation budget of a built-in method, in words, for the table."""
    return {"direct": f"{setup.direct_tokens} tokens, greedy",
            "zero_shot_cot": f"{setup.cot_tokens} + {setup.answer_tokens} tokens, greedy",
            "fewshot_cot": f"{setup.cot_tokens} tokens, greedy",
            "self_consistency": f"{setup.samples} x {setup.cot_tokens} tokens, T={setup.temperature}",
            "pal": f"{setup.cot_tokens} tokens of program, greedy; sandboxed run"}.get(name, "")


# ----------------------------------------------------------------------------- scoring

@dataclass
class MethodResult:
    """One method's exact-match accuracy over the problems, with its timing and every prediction."""

    method: str
    accuracy: float
    n_problems: int
    n_correct: int
    n_missing: int  # replies with no number in them
    seconds: float
    budget: str = ""
    predictions: list[Prediction] = field(default_factory=list, repr=False)

    @property
    def seconds_per_problem(self) -> float:
        return self.seconds / self.n_problems

    def summary(self) -> dict[str, Any]:
        keys = ("method", "accuracy", "n_problems", "n_correct", "n_missing", "seconds", "budget")
        return {**{key: getattr(self, key) for key in keys}, "seconds_per_problem": self.seconds_per_problem}


def accuracy(predictions: Sequence[Prediction], problems: Sequence[Problem]) -> float:
    """GSM8K exact match: the share of problems whose predicted number equals the reference answer."""
    if len(predictions) != len(problems) or not problems:
        raise LlmkitError(f"{len(predictions)} predictions for {len(problems)} problems; score one per problem")
    return sum(answers_match(p.answer, q.answer) for p, q in zip(predictions, problems)) / len(problems)


def run_method(name: str, method: Method, model: TextModel, problems: Sequence[Problem], batch_size: int = 8,
               progress: bool = False, budget: str = "") -> MethodResult:
    """`method` over the problems in batches (a progress bar per method), scored by exact match."""
    from tqdm.auto import tqdm

    if not problems:
        raise LlmkitError("no problems to evaluate; pass --limit >= 1")
    predictions: list[Prediction] = []
    start = time.perf_counter()
    with tqdm(total=len(problems), desc=name, unit="problem", disable=not progress) as bar:
        for first in range(0, len(problems), batch_size):
            batch = problems[first:first + batch_size]
            predictions += method(model, batch)
            bar.update(len(batch))
    seconds = time.perf_counter() - start
    correct = sum(answers_match(p.answer, q.answer) for p, q in zip(predictions, problems))
    return MethodResult(name, accuracy(predictions, problems), len(problems), correct,
                        sum(p.answer is None for p in predictions), seconds, budget, predictions)


def method_table(results: Sequence[MethodResult]) -> str:
    """The results as a markdown table, one row per method."""
    lines = ["| method | accuracy | correct | no answer | generation budget | s / problem |",
             "| --- | --- | --- | --- | --- | --- |"]
    lines += [f"| {r.method} | {r.accuracy:.1%} | {r.n_correct}/{r.n_problems} | {r.n_missing} | {r.budget} | "
              f"{r.seconds_per_problem:.1f} |" for r in results]
    return "\n".join(lines)


def prediction_record(problem: Problem, prediction: Prediction) -> dict[str, Any]:
    """One problem's outcome as JSON-able values (for the samples file)."""
    record = {"index": problem.index, "question": problem.question, "reference": format_number(problem.answer),
              "predicted": format_number(prediction.answer),
              "correct": answers_match(prediction.answer, problem.answer), "n_examples": prediction.n_examples,
              "reply": prediction.reply, "prompt": prediction.prompt}
    if prediction.vote_share is not None:
        record |= {"vote_share": prediction.vote_share, "replies": list(prediction.replies)}
    return record
