"""Run evaluation tasks on a model: build each row's context, then generate (batched, left-padded, KV cache)
or score continuations by log-likelihood, and compute the task's metrics.

Multiple choice follows lm-evaluation-harness: with ll_i = log p(delimiter + choice_i | context),
    acc       = [argmax_i ll_i == gold]
    acc_norm  = [argmax_i ll_i / len(choice_i) == gold]           (length in characters, lm-eval's acc_norm)
    acc_bytes = [argmax_i ll_i / len(utf8(choice_i)) == gold]     (length in UTF-8 bytes)
Loglikelihood rows report acc = [the target is the greedy continuation] and the mean log-probability.
The scorer and the generator are parameters, so a crafted scorer can test the decision rule alone.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from llmkit.errors import LlmkitError
from llmkit.eval.tasks import (
    GENERATION_METRICS,
    Task,
    build_context,
    random_baseline,
    row_choices,
    row_references,
)
from llmkit.io import atomic_write_text

Scorer = Callable[..., Sequence[Any]]  # (model, tokenizer, [(context, continuation)], batch_size, progress) -> scores
Generator = Callable[..., list[str]]  # llmkit.generate.generate's signature


@dataclass
class PerplexityTask:
    """Sliding-window perplexity of one fixed text (see llmkit.eval.perplexity); reported beside the tasks but
    not rescaled into the category averages, since perplexity has no random baseline on a 0-1 scale."""

    name: str
    text: str
    window: int = 512
    stride: int = 256
    max_tokens: int | None = 2048  # the first tokens of the text
    category: str = "language_modeling"
    source: str = ""


@dataclass
class TaskResult:
    """One task's outcome on one model: every metric, the primary one, its baseline, and each row's prompt."""

    name: str
    category: str
    kind: str
    metric: str
    score: float  # the primary metric, in [0, 1] (perplexity: >= 1)
    random_baseline: float | None  # None: not rescaled into the category averages (perplexity)
    metrics: dict[str, float]
    n_rows: int
    num_fewshot: int
    source: str = ""
    samples: list[dict[str, Any]] = field(default_factory=list, repr=False)  # prompt, target, prediction per row

    def summary(self) -> dict[str, Any]:
        """Everything but the samples, as JSON-able values."""
        return {key: value for key, value in self.__dict__.items() if key != "samples"}


def run_task(
    task: Task | PerplexityTask,
    model: torch.nn.Module,
    tokenizer: Any,
    limit: int | None = None,
    num_fewshot: int | None = None,
    batch_size: int = 8,
    progress: bool = False,
    truncate_prompt: bool = False,
    scorer: Scorer | None = None,
    generator: Generator | None = None,
) -> TaskResult:
    """Evaluate `task` on its first `limit` rows (all by default) with `num_fewshot` examples (default: the spec's).
    A PerplexityTask ignores limit and num_fewshot (its text is fixed)."""
    if isinstance(task, PerplexityTask):
        return _run_perplexity(task, model, tokenizer, batch_size, progress)
    if limit is not None and limit < 1:
        raise LlmkitError(f"limit={limit} must be >= 1 (or None for every row)")
    if batch_size < 1:
        raise LlmkitError(f"batch_size={batch_size} must be >= 1")
    k = task.spec.num_fewshot if num_fewshot is None else num_fewshot
    if k < 0:
        raise LlmkitError(f"num_fewshot={k} must be >= 0")
    indices = range(min(len(task.rows), limit or len(task.rows)))
    contexts = [build_context(task, index, k) for index in indices]
    rows = [task.rows[index] for index in indices]
    kind = task.spec.kind
    if kind == "generation":
        metrics, samples = _run_generation(task, model, tokenizer, rows, contexts, batch_size, progress,
                                           truncate_prompt, generator)
    elif kind == "multiple_choice":
        metrics, samples = _run_multiple_choice(task, model, tokenizer, rows, contexts, batch_size, progress, scorer)
    else:
        metrics, samples = _run_loglikelihood(task, model, tokenizer, rows, contexts, batch_size, progress, scorer)
    return TaskResult(
        name=task.name, category=task.spec.category, kind=kind, metric=task.spec.metric,
        score=metrics[task.spec.metric], random_baseline=random_baseline(task, rows), metrics=metrics,
        n_rows=len(rows), num_fewshot=k, source=task.spec.source, samples=samples,
    )  # fmt: skip


def evaluate_model(
    model: torch.nn.Module,
    tokenizer: Any,
    tasks: Sequence[Task | PerplexityTask],
    limit: int | None = None,
    num_fewshot: int | None = None,
    batch_size: int = 8,
    progress: bool = False,
    truncate_prompt: bool = False,
) -> list[TaskResult]:
    """Run every task on one loaded model (what fine-tuning and compression benchmarks call from Python)."""
    return [run_task(task, model, tokenizer, limit, num_fewshot, batch_size, progress, truncate_prompt) for task in tasks]


def _run_perplexity(task: PerplexityTask, model, tokenizer, batch_size: int, progress: bool) -> TaskResult:  # noqa: ANN001
    from llmkit.eval.perplexity import perplexity

    window = min(task.window, model.config.max_seq_len)  # a shorter context than the task's window: use all of it
    stride = task.stride if window == task.window else max(window // 2, 1)
    result = perplexity(model, tokenizer, task.text, window=window, stride=stride, batch_size=batch_size,
                        progress=progress, max_tokens=task.max_tokens)
    metrics = {name: float(getattr(result, name)) for name in ("perplexity", "bits_per_byte", "byte_perplexity",
                                                                "mean_nll", "n_tokens", "n_bytes", "window", "stride")}
    return TaskResult(name=task.name, category=task.category, kind="perplexity", metric="perplexity",
                      score=result.perplexity, random_baseline=None, metrics=metrics, n_rows=result.n_tokens,
                      num_fewshot=0, source=task.source)


def _default_scorer() -> Scorer:
    from llmkit.eval.scoring import continuation_logprobs

    return continuation_logprobs


def _score(scorer: Scorer | None, model, tokenizer, requests, batch_size: int, progress: bool) -> list[Any]:  # noqa: ANN001
    scores = list((scorer or _default_scorer())(model, tokenizer, requests, batch_size=batch_size, progress=progress))
    if len(scores) != len(requests):
        raise LlmkitError(f"the scorer returned {len(scores)} scores for {len(requests)} requests; it must return one each")
    return scores


def _run_multiple_choice(task, model, tokenizer, rows, contexts, batch_size, progress, scorer):  # noqa: ANN001, ANN202
    delimiter = task.spec.target_delimiter
    parsed = [row_choices(task, row) for row in rows]
    requests = [(context, delimiter + choice) for context, (choices, _) in zip(contexts, parsed) for choice in choices]
    scores = iter(_score(scorer, model, tokenizer, requests, batch_size, progress))
    totals = {"acc": 0.0, "acc_norm": 0.0, "acc_bytes": 0.0}
    samples = []
    for context, (choices, gold) in zip(contexts, parsed):
        logprobs = [next(scores).logprob for _ in choices]
        picks = {
            "acc": _argmax(logprobs),
            "acc_norm": _argmax([lp / len(choice) for lp, choice in zip(logprobs, choices)]),
            "acc_bytes": _argmax([lp / len(choice.encode("utf-8")) for lp, choice in zip(logprobs, choices)]),
        }
        for name, pick in picks.items():
            totals[name] += pick == gold
        samples.append({"prompt": context, "target": choices[gold], "prediction": choices[picks["acc"]],
                        "choices": choices, "logprobs": logprobs, "answer": gold, "correct": picks["acc"] == gold})
    return {name: total / len(rows) for name, total in totals.items()}, samples


def _argmax(values: Sequence[float]) -> int:
    return max(range(len(values)), key=values.__getitem__)  # the first of equal values, as numpy's argmax


def _run_loglikelihood(task, model, tokenizer, rows, contexts, batch_size, progress, scorer):  # noqa: ANN001, ANN202
    targets = [row_references(task, row)[0] for row in rows]
    requests = [(context, task.spec.target_delimiter + target) for context, target in zip(contexts, targets)]
    scores = _score(scorer, model, tokenizer, requests, batch_size, progress)
    samples = [{"prompt": context, "target": target, "prediction": None, "logprob": score.logprob,
                "is_greedy": score.is_greedy} for context, target, score in zip(contexts, targets, scores)]
    n_tokens = sum(score.n_tokens for score in scores)
    n_bytes = sum(score.n_bytes for score in scores)
    metrics = {
        "acc": sum(score.is_greedy for score in scores) / len(scores),
        "logprob": sum(score.logprob for score in scores) / len(scores),
        "logprob_per_token": sum(score.logprob for score in scores) / n_tokens,
        "bits_per_byte": -sum(score.logprob for score in scores) / (n_bytes * math.log(2)),
    }
    return metrics, samples


def _run_generation(task, model, tokenizer, rows, contexts, batch_size, progress, truncate_prompt, generator):  # noqa: ANN001, ANN202
    from llmkit.generate import SamplingSettings

    if generator is None:
        from llmkit.generate import generate as generator
    spec = task.spec
    settings = SamplingSettings(temperature=spec.temperature, top_p=spec.top_p, seed=spec.seed)
    references = [row_references(task, row) for row in rows]
    order = sorted(range(len(contexts)), key=lambda i: -len(contexts[i]))  # similar lengths share a batch: less padding
    batches = [order[start : start + batch_size] for start in range(0, len(order), batch_size)]
    predictions: list[str] = [""] * len(contexts)
    for batch in _progress(batches, progress, f"{task.name} (generate)"):
        texts = generator(model, tokenizer, [contexts[i] for i in batch], max_new_tokens=spec.max_new_tokens,
                          settings=settings, stop_strings=spec.stop, truncate_prompt=truncate_prompt)
        for i, text in zip(batch, texts):
            predictions[i] = text.strip()
    metrics = generation_metrics(predictions, references)
    samples = [{"prompt": context, "target": refs if len(refs) > 1 else refs[0], "prediction": prediction}
               for context, refs, prediction in zip(contexts, references, predictions)]
    return metrics, samples


def generation_metrics(predictions: Sequence[str], references: Sequence[Sequence[str]]) -> dict[str, float]:
    """Every generation metric, each in [0, 1]: exact match and token F1 (best reference), ROUGE (best reference,
    stemmed), BLEU and chrF (sacrebleu's corpus scores, divided by 100)."""
    from llmkit.eval import metrics as library

    values = {
        "exact_match": library.exact_match(predictions, references),
        "f1": library.token_f1(predictions, references),
        **library.rouge(predictions, references, use_stemmer=True),
        "bleu": library.bleu(predictions, references) / 100,
        "chrf": library.chrf(predictions, references) / 100,
    }
    return {name: float(values[name]) for name in GENERATION_METRICS}


def _progress(items: Sequence[Any], enabled: bool, description: str):  # noqa: ANN202
    if not enabled:
        return items
    from tqdm.auto import tqdm

    return tqdm(items, desc=description, unit="batch")


def write_samples(result: TaskResult, path: str | Path) -> None:
    """The exact prompts, targets and predictions of a run, one JSON object per line (written atomically)."""
    import json

    lines = [json.dumps({"index": index, **sample}, ensure_ascii=False) for index, sample in enumerate(result.samples)]
    atomic_write_text(Path(path), "\n".join(lines) + "\n")

