"""Evaluation tasks: a small spec (name, kind, data, jinja prompt, few-shot, metric, baseline) over JSONL rows.

Each row becomes one prompt, assembled the way lm-evaluation-harness does:

    context = description + shot_1 + separator + ... + shot_k + separator + prompt(row)
    shot_i  = prompt(example_i) + target_delimiter + target(example_i)

The k examples are drawn deterministically per row (seed and row index) from a separate few-shot split,
or from the task's other rows -- never the row itself. In-context learning is just k > 0. Kinds:
- generation: the model continues the context; predictions are scored against the target(s).
- multiple_choice: each choice is scored by log-likelihood of `target_delimiter + choice`.
- loglikelihood: the log-probability of `target_delimiter + target` after the context.

A spec file (JSON or YAML) holds the TaskSpec fields; `data` is a JSONL file (optionally .gz) beside it.
`prompt` is a jinja template; `target`, `choices` and `answer` are jinja expressions over the row's fields.
"""

from __future__ import annotations

import dataclasses
import itertools
import json
import random
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any, Literal

import jinja2
from jinja2.sandbox import ImmutableSandboxedEnvironment

from llmkit.data.jsonl import read_jsonl
from llmkit.errors import LlmkitError

Kind = Literal["generation", "multiple_choice", "loglikelihood"]
KINDS: tuple[str, ...] = ("generation", "multiple_choice", "loglikelihood")

# Metrics each kind reports; the first is the kind's default primary metric. All lie in [0, 1].
GENERATION_METRICS = ("exact_match", "f1", "rouge1", "rouge2", "rougeL", "rougeLsum", "bleu", "chrf")
KIND_METRICS: dict[str, tuple[str, ...]] = {
    "generation": GENERATION_METRICS,
    "multiple_choice": ("acc", "acc_norm", "acc_bytes"),
    "loglikelihood": ("acc",),
}
SPEC_SUFFIXES = (".json", ".yaml", ".yml")


@dataclass
class TaskSpec:
    """What a task is; the keys of a task spec file are exactly these fields."""

    name: str
    kind: Kind
    prompt: str  # jinja template over a row's fields: the text the model sees for this row
    target: str = ""  # jinja expression: reference text (or a list of references) / the continuation scored
    choices: str = ""  # multiple_choice: jinja expression giving the list of choice texts
    answer: str = ""  # multiple_choice: jinja expression giving the gold choice (index or its text)
    data: str = ""  # JSONL rows (relative to the spec file); built-in tasks load their rows themselves
    fewshot_data: str = ""  # JSONL rows to draw few-shot examples from; empty: the task's other rows
    category: str = "other"  # report group (MosaicML Gauntlet style: language_understanding, safety, ...)
    metric: str = ""  # primary metric for the report; empty: the kind's first metric
    random_baseline: float | None = None  # score of guessing; None: mean 1/len(choices) for multiple_choice, else 0
    num_fewshot: int = 0
    fewshot_seed: int = 1234
    fewshot_separator: str = "\n\n"
    target_delimiter: str = " "
    description: str = ""  # text placed before the few-shot examples
    max_new_tokens: int = 128  # generation
    stop: tuple[str, ...] = ("\n\n",)  # generation: stop strings (cut off the prediction)
    temperature: float = 0.0  # generation: 0 is greedy
    top_p: float | None = None
    seed: int | None = None  # generation: sampling seed
    source: str = ""  # where the data comes from, for the report

    def __post_init__(self) -> None:
        where = f"task {self.name!r}"
        self.stop = (self.stop,) if isinstance(self.stop, str) else tuple(self.stop)
        if not all(isinstance(stop, str) and stop for stop in self.stop):
            raise LlmkitError(f"{where}: stop {list(self.stop)!r} must be a list of non-empty strings")
        for name in ("num_fewshot", "fewshot_seed", "max_new_tokens"):
            if isinstance(getattr(self, name), bool) or not isinstance(getattr(self, name), int):
                raise LlmkitError(f"{where}: {name}={getattr(self, name)!r} must be an integer")
        if self.kind not in KINDS:
            raise LlmkitError(f"{where}: kind {self.kind!r} is not one of {', '.join(KINDS)}; fix the spec's 'kind'")
        self.metric = self.metric or KIND_METRICS[self.kind][0]
        if self.metric not in KIND_METRICS[self.kind]:
            raise LlmkitError(f"{where}: metric {self.metric!r} is not one a {self.kind} task reports; choose one of "
                              f"{', '.join(KIND_METRICS[self.kind])}")
        needed = ("choices", "answer") if self.kind == "multiple_choice" else ("target",)
        for name in needed:
            if not getattr(self, name).strip():
                raise LlmkitError(f"{where}: a {self.kind} task needs '{name}' (a jinja expression over the row's "
                                  "fields, e.g. \"label\" or \"['no', 'yes']\"); add it to the spec")
        if self.num_fewshot < 0:
            raise LlmkitError(f"{where}: num_fewshot={self.num_fewshot} must be >= 0")
        if self.random_baseline is not None and not 0 <= self.random_baseline < 1:
            raise LlmkitError(f"{where}: random_baseline={self.random_baseline} must lie in [0, 1)")
        _compile(self.prompt, template=True, where=f"{where} 'prompt'")
        for name in ("target", "choices", "answer"):
            if getattr(self, name).strip():
                _compile(getattr(self, name), template=False, where=f"{where} '{name}'")


@dataclass(frozen=True)
class Row:
    """One data row and where it came from, so an error can name the file and line."""

    fields: Mapping[str, Any]
    source: str
    line: int

    def where(self) -> str:
        return f"{self.source}, line {self.line}"


@dataclass
class Task:
    """A spec with its rows loaded (and the rows few-shot examples are drawn from, when separate)."""

    spec: TaskSpec
    rows: list[Row]
    fewshot_rows: list[Row] | None = None

    @property
    def name(self) -> str:
        return self.spec.name


# ----------------------------------------------------------------------------- loading

def read_task_rows(path: str | Path) -> list[Row]:
    """Rows of a task's JSONL file (gzip if it ends in .gz), each a JSON object, with their line numbers."""
    rows = [Row(fields, str(path), number) for number, fields in read_jsonl(path)]
    if not rows:
        raise LlmkitError(f"{path} holds no rows; add one JSON object per line")
    return rows


def load_task(path: str | Path) -> Task:
    """A task from a spec file (.json/.yaml) whose `data` (and `fewshot_data`) JSONL paths are relative to it."""
    path = Path(path)
    if path.suffix not in SPEC_SUFFIXES or not path.is_file():
        raise LlmkitError(f"{path} is not a task spec file; pass an existing {'/'.join(SPEC_SUFFIXES)} file "
                          "or a built-in task name")
    import yaml

    text = path.read_text(encoding="utf-8")
    try:
        values = json.loads(text) if path.suffix == ".json" else yaml.safe_load(text)
    except (ValueError, yaml.YAMLError) as error:  # json.JSONDecodeError is a ValueError
        raise LlmkitError(f"{path} cannot be parsed ({error}); fix its syntax") from None
    if not isinstance(values, dict):
        raise LlmkitError(f"{path} should hold a mapping of TaskSpec fields, not a {type(values).__name__}")
    known = {f.name for f in dataclasses.fields(TaskSpec)}
    unknown = sorted(set(values) - known)
    if unknown:
        raise LlmkitError(f"{path}: unknown field(s) {unknown}; a task spec takes {sorted(known)}")
    try:
        spec = TaskSpec(**values)
    except TypeError as error:
        raise LlmkitError(f"{path}: {error}; a task spec needs at least name, kind and prompt") from None
    if not spec.data:
        raise LlmkitError(f"{path}: 'data' is empty; give the JSONL file of rows (relative to the spec file)")
    rows = read_task_rows(path.parent / spec.data)
    fewshot_rows = read_task_rows(path.parent / spec.fewshot_data) if spec.fewshot_data else None
    return Task(spec, rows, fewshot_rows)


# ----------------------------------------------------------------------------- rendering

@lru_cache(maxsize=256)
def _compile(source: str, template: bool, where: str = "") -> Any:
    """A sandboxed jinja template (template=True) or expression; undefined fields raise instead of rendering ''."""
    environment = _environment()
    try:
        if template:
            return environment.from_string(source)
        return environment.compile_expression(source, undefined_to_none=False)
    except jinja2.TemplateSyntaxError as error:
        raise LlmkitError(f"{where} is not valid jinja ({error.message}): {source!r}") from None


@lru_cache(maxsize=1)
def _environment() -> ImmutableSandboxedEnvironment:
    return ImmutableSandboxedEnvironment(undefined=jinja2.StrictUndefined, keep_trailing_newline=True)


def _evaluate(task: Task, row: Row, name: str) -> Any:
    """Render the spec's field `name` ('prompt' is a template, the others expressions) on one row."""
    source = getattr(task.spec, name)
    compiled = _compile(source, template=name == "prompt", where=f"task {task.name!r} '{name}'")
    try:
        value = compiled.render(**row.fields) if name == "prompt" else compiled(**row.fields)
        _raise_if_undefined(value)
    except jinja2.TemplateError as error:  # UndefinedError included: a field the row lacks
        raise LlmkitError(f"{row.where()}: task {task.name!r} '{name}' ({source!r}) failed: {error}; the row has "
                          f"fields {sorted(row.fields)}: fix the row or the task's '{name}'") from None
    return value


def _raise_if_undefined(value: Any) -> None:
    """Expressions return Undefined objects (inside lists too) instead of raising; str() on one raises."""
    if isinstance(value, jinja2.Undefined):
        str(value)
    if isinstance(value, (list, tuple)):
        for item in value:
            _raise_if_undefined(item)


def render_prompt(task: Task, row: Row) -> str:
    """The row's own prompt text (without few-shot examples)."""
    return _evaluate(task, row, "prompt")


def row_references(task: Task, row: Row) -> list[str]:
    """The target of a generation or loglikelihood row: one or more reference texts (non-empty strings)."""
    value = _evaluate(task, row, "target")
    references = [value] if isinstance(value, str) else value
    if not isinstance(references, (list, tuple)) or not references or not all(
        isinstance(text, str) and text for text in references
    ):
        raise LlmkitError(f"{row.where()}: task {task.name!r} 'target' gave {value!r:.80}; it must be a non-empty "
                          "string or a list of them: fix the row or the task's 'target'")
    if task.spec.kind == "loglikelihood" and len(references) != 1:
        raise LlmkitError(f"{row.where()}: task {task.name!r} 'target' gave {len(references)} texts; a loglikelihood "
                          "task scores exactly one continuation per row")
    return list(references)


def row_choices(task: Task, row: Row) -> tuple[list[str], int]:
    """The choice texts of a multiple-choice row and the index of the gold one."""
    choices = _evaluate(task, row, "choices")
    if not isinstance(choices, (list, tuple)) or len(choices) < 2 or not all(isinstance(c, str) and c for c in choices):
        raise LlmkitError(f"{row.where()}: task {task.name!r} 'choices' gave {choices!r:.80}; it must be a list of at "
                          "least 2 non-empty strings: fix the row or the task's 'choices'")
    answer = _evaluate(task, row, "answer")
    if isinstance(answer, str) and answer.strip().lstrip("-").isdigit() and answer not in choices:
        answer = int(answer)  # a label column read as text, e.g. "1"
    if isinstance(answer, str):
        if answer not in choices:
            raise LlmkitError(f"{row.where()}: task {task.name!r} 'answer' gave {answer!r:.60}, which is not one of "
                              f"the choices {list(choices)!r:.120}; fix the row or the task's 'answer'")
        return list(choices), list(choices).index(answer)
    if isinstance(answer, bool) or not isinstance(answer, int) or not 0 <= answer < len(choices):
        raise LlmkitError(f"{row.where()}: task {task.name!r} 'answer' gave {answer!r:.60}; it must be a choice index "
                          f"in 0..{len(choices) - 1} or one of the choice texts: fix the row or the task's 'answer'")
    return list(choices), answer


def example_target(task: Task, row: Row) -> str:
    """The text that follows a few-shot example's prompt: its first reference, or its gold choice."""
    if task.spec.kind == "multiple_choice":
        choices, answer = row_choices(task, row)
        return choices[answer]
    return row_references(task, row)[0]


# ----------------------------------------------------------------------------- few-shot

def fewshot_indices(pool_size: int, k: int, seed: int, index: int, skip: Callable[[int], bool] | None = None) -> list[int]:
    """k distinct indices into a few-shot pool for row `index`, leaving out those `skip` rejects; the same
    (seed, index) always gives the same ones."""
    rng = random.Random(f"{seed}/{index}")  # string seeds are hashed with sha512: stable across runs and machines
    candidates = (i for i in _random_order(rng, pool_size) if skip is None or not skip(i))
    picked = list(itertools.islice(candidates, k))
    if len(picked) < k:
        raise LlmkitError(f"{k} few-shot examples asked for but the pool holds only {len(picked)} usable rows "
                          "(the row itself and its duplicates left out); lower num_fewshot or give a larger "
                          "fewshot_data file")
    return picked


def _random_order(rng: random.Random, size: int) -> Iterator[int]:
    """Distinct indices in random order, drawn lazily: cheap when only a few are needed from a large pool."""
    seen: set[int] = set()
    while len(seen) < size:
        if len(seen) > size // 2:  # few left: shuffle the rest rather than draw and miss
            rest = [i for i in range(size) if i not in seen]
            rng.shuffle(rest)
            yield from rest
            return
        candidate = rng.randrange(size)
        if candidate not in seen:
            seen.add(candidate)
            yield candidate


def fewshot_examples(task: Task, index: int, k: int | None = None) -> list[Row]:
    """The few-shot example rows for row `index` (k defaults to the spec's num_fewshot): drawn from the few-shot
    split, or from the task's other rows; never the row itself nor a duplicate of it (that would show the answer)."""
    k = task.spec.num_fewshot if k is None else k
    if k == 0:
        return []
    same_pool = task.fewshot_rows is None
    pool = task.rows if same_pool else task.fewshot_rows
    row = task.rows[index]

    def skip(candidate: int) -> bool:
        return (same_pool and candidate == index) or pool[candidate].fields == row.fields

    return [pool[i] for i in fewshot_indices(len(pool), k, task.spec.fewshot_seed, index, skip)]


def build_context(task: Task, index: int, k: int | None = None) -> str:
    """The full text the model conditions on for row `index`: description, k solved examples, the row's prompt."""
    spec = task.spec
    shots = [render_prompt(task, example) + spec.target_delimiter + example_target(task, example)
             for example in fewshot_examples(task, index, k)]
    prompt = render_prompt(task, task.rows[index])
    return spec.description + "".join(shot + spec.fewshot_separator for shot in shots) + prompt


def random_baseline(task: Task, rows: Sequence[Row]) -> float:
    """The score of guessing: the spec's value, else mean 1/len(choices) for multiple choice, else 0."""
    if task.spec.random_baseline is not None:
        return task.spec.random_baseline
    if task.spec.kind == "multiple_choice":
        return sum(1 / len(row_choices(task, row)[0]) for row in rows) / len(rows)
    return 0.0

