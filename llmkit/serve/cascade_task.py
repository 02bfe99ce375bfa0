"""A cascade on a labelled multiple-choice task: record each model's answers once (cached), fit on one split,
report on the other: accuracy and cost of the weak, the strong, the fitted cascade and the router, the frontier,
APGR, and the cost to recover 50% / 80% / 100% of the gap. `llmkit cascade` and benchmarks/cascade.py run this.

Costs default to prices proportional to each model's parameter count: one unit per million parameters per token,
input and output alike, no fee (a stand-in for serving cost, since compute per token scales with parameters).
"""

from __future__ import annotations

import hashlib
import json
import random
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from fractions import Fraction
from pathlib import Path
from typing import Any

from llmkit.errors import LlmkitError
from llmkit.io import atomic_write, atomic_write_text
from llmkit.serve.cascade import (
    Outcomes,
    Point,
    Price,
    all_points,
    apgr,
    area_under_curve,
    best_within_budget,
    cost_to_recover,
    evaluate_cascade,
    pareto_frontier,
    single_model_point,
)
from llmkit.serve.cascade_stages import Answer, Scorer, choice_answers
from llmkit.serve.router import router_points

GAP_FRACTIONS = (0.5, 0.8, 1.0)
FITTED_FORMAT = "llmkit-cascade/1"


@dataclass(frozen=True)
class ChoiceTask:
    """A multiple-choice task made concrete: the full prompt of each row, the options (shared by all rows), the gold
    option index of each row."""

    name: str
    prompts: tuple[str, ...]
    options: tuple[str, ...]
    gold: tuple[int, ...]


def choice_task(task: Any, limit: int | None = None, num_fewshot: int | None = None) -> ChoiceTask:  # an eval Task
    """The first `limit` rows of an llmkit.eval multiple-choice task, prompts built as `llmkit evaluate` builds them."""
    from llmkit.eval.tasks import build_context, row_choices

    if getattr(task, "spec", None) is None or task.spec.kind != "multiple_choice":
        raise LlmkitError(f"--task {getattr(task, 'name', task)} is not a multiple-choice task; a cascade compares "
                          "answers against labels: use sst2 or a task spec with kind: multiple_choice")
    k = task.spec.num_fewshot if num_fewshot is None else num_fewshot
    indices = range(min(len(task.rows), limit or len(task.rows)))
    prompts, gold, options = [], [], None
    for index in indices:
        choices, answer = row_choices(task, task.rows[index])
        row_options = tuple(task.spec.target_delimiter + choice for choice in choices)
        if options is not None and row_options != options:
            raise LlmkitError(f"{task.rows[index].where()}: its choices {list(choices)} differ from the first row's; a "
                              "cascade task needs the same options on every row")
        options = row_options
        prompts.append(build_context(task, index, k))
        gold.append(answer)
    return ChoiceTask(task.name, tuple(prompts), options, tuple(gold))


def answer_to_json(answer: Answer) -> dict:
    return asdict(answer)


def answer_from_json(data: dict) -> Answer:
    return Answer(data["text"], data["input_tokens"], data["output_tokens"], tuple(data["token_logprobs"]),
                  tuple(data.get("samples", ())), data.get("margin", 0.0))


def record_answers(load: Callable[[], tuple[Any, Any]], task: ChoiceTask, cache: Path | None = None,
                   batch_size: int = 8, progress: bool = False) -> list[Answer]:
    """The answer of the model `load()` gives (model, tokenizer) to every prompt of `task`; with `cache` (a JSON
    file), answers already there are reused (keyed by the prompt and options' sha256) and new ones are added, so a
    re-run neither loads the model nor calls it."""
    known: dict[str, dict] = json.loads(cache.read_text(encoding="utf-8")) if cache and cache.is_file() else {}
    keys = [hashlib.sha256(json.dumps([prompt, task.options]).encode()).hexdigest() for prompt in task.prompts]
    missing = [i for i, key in enumerate(keys) if key not in known]
    if missing:
        model, tokenizer = load()
        fresh = choice_answers(model, tokenizer, [task.prompts[i] for i in missing], task.options, batch_size, progress)
        known.update({keys[i]: answer_to_json(answer) for i, answer in zip(missing, fresh)})
        if cache:
            cache.parent.mkdir(parents=True, exist_ok=True)
            atomic_write_text(cache, json.dumps(known))
    return [answer_from_json(known[key]) for key in keys]


def to_outcomes(name: str, answers: Sequence[Answer], task: ChoiceTask, price: Price, scorer: Scorer) -> Outcomes:
    """A model's Outcomes on the task: right when its option is the gold one, its scorer's score, its priced cost."""
    return Outcomes(name, tuple(answer.text == task.options[gold] for answer, gold in zip(answers, task.gold)),
                    tuple(float(scorer(answer)) for answer in answers),
                    tuple(price.cost(answer.input_tokens, answer.output_tokens) for answer in answers))


def split_indices(n: int, fit_fraction: float, seed: int = 0) -> tuple[list[int], list[int]]:
    """A seeded random split of range(n) into (fit, held-out) with round(n * fit_fraction) fit rows."""
    if not 0 < fit_fraction < 1:
        raise LlmkitError(f"--fit_fraction {fit_fraction} must be between 0 and 1 (e.g. 0.5)")
    order = list(range(n))
    random.Random(seed).shuffle(order)
    cut = round(n * fit_fraction)
    if cut < 1 or cut >= n:
        raise LlmkitError(f"{n} rows split at {fit_fraction} leave an empty side; use more rows (--limit)")
    return sorted(order[:cut]), sorted(order[cut:])


def _point_json(name: str, point: Point) -> dict:
    return {"method": name, "thresholds": [_threshold_json(t) for t in point.thresholds], "accuracy": float(point.accuracy),
            "cost": float(point.cost), "answered": list(point.answered)}


def cascade_report(fit: Sequence[Outcomes], held: Sequence[Outcomes], budget: Fraction,
                   easiness_fit: Sequence[float], easiness_held: Sequence[float],
                   router_cost_fit: Sequence[Fraction] | None = None,
                   router_cost_held: Sequence[Fraction] | None = None) -> dict:
    """Fit the cascade (under `budget`) and the router on `fit`; measure everything on `held`. The router routes by
    `easiness` (per row, costing router_cost to compute) and its threshold is fitted under the same budget."""
    from llmkit.serve.cascade import fit_cascade
    from llmkit.serve.router import route

    fitted = fit_cascade(fit, budget)
    router_fit = best_within_budget(pareto_frontier(router_points(fit[0], fit[-1], easiness_fit, router_cost_fit)),
                                    budget)
    weak, strong = held[0], held[-1]
    cascade_held = evaluate_cascade(held, fitted.thresholds)
    router_held = route(weak, strong, easiness_held, router_fit.thresholds[0], router_cost_held)
    curves = {"cascade": pareto_frontier(all_points(held)),
              "router": pareto_frontier(router_points(weak, strong, easiness_held, router_cost_held))}
    summary = {}
    gap = strong.accuracy > weak.accuracy and strong.mean_cost > weak.mean_cost  # else APGR is undefined
    for name, points in {**curves, "weak": [single_model_point(weak)], "strong": [single_model_point(strong)]}.items():
        summary[name] = {"apgr": apgr(points, weak, strong) if gap else None,
                         "auc": area_under_curve(points, weak, strong) if gap else None,
                         **{f"cost_to_recover_{int(f * 100)}":
                            _maybe_float(cost_to_recover(points, weak, strong, f)) if gap else None
                            for f in GAP_FRACTIONS}}
    return {
        "budget": float(budget), "thresholds": [_threshold_json(t) for t in fitted.thresholds],
        "router_threshold": _threshold_json(router_fit.thresholds[0]),
        "n_fit": len(fit[0]), "n_held_out": len(weak),
        "held_out": [_point_json(weak.name, single_model_point(weak)), _point_json(strong.name, single_model_point(strong)),
                     _point_json("cascade (fitted)", cascade_held), _point_json("router (fitted)", router_held)],
        "fit": _point_json("cascade (fitted)", fitted),
        "curves": {name: [_point_json(name, p) for p in points] for name, points in curves.items()},
        "summary": summary,
    }


def _maybe_float(value: Fraction | None) -> float | None:
    return None if value is None else float(value)


def report_table(report: dict) -> str:
    """Markdown: the held-out operating points, then APGR / AUC / cost to recover the gap per method."""
    lines = ["| method | accuracy | mean cost / query | answered by stage |", "| --- | ---: | ---: | --- |"]
    lines += [f"| {p['method']} | {p['accuracy']:.3f} | {p['cost']:.2f} | {p['answered']} |" for p in report["held_out"]]
    lines += ["", "| curve | APGR | AUC | cost to 50% of gap | 80% | 100% (strong's accuracy) |",
              "| --- | ---: | ---: | ---: | ---: | ---: |"]
    for name, s in report["summary"].items():
        costs = [f"{s[f'cost_to_recover_{int(f * 100)}']:.2f}" if s[f"cost_to_recover_{int(f * 100)}"] is not None
                 else "never" if s["apgr"] is not None else "n/a" for f in GAP_FRACTIONS]
        apgr_auc = " | ".join("n/a" if s[key] is None else f"{s[key]:.3f}" for key in ("apgr", "auc"))
        lines.append(f"| {name} | {apgr_auc} | " + " | ".join(costs) + " |")
    if report["summary"]["weak"]["apgr"] is None:
        lines.append("\nAPGR, AUC and costs to recover the gap are n/a: on the held-out rows the last model is not "
                     "both more accurate and dearer than the first (no gap to recover)")
    return "\n".join(lines)


def plot_report(report: dict, path: Path) -> None:
    """The held-out cost-accuracy curves (cascade frontier, router), the two models, the fitted points; PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(figsize=(7, 4.5))
    for name, style in (("cascade", "-o"), ("router", "--s")):
        points = report["curves"][name]
        axes.plot([p["cost"] for p in points], [p["accuracy"] for p in points], style, markersize=3, drawstyle="steps-post",
                  label=f"{name} frontier" + ("" if report["summary"][name]["apgr"] is None else
                                              f" (APGR {report['summary'][name]['apgr']:.2f})"))
    for point, marker in zip(report["held_out"], ("v", "^", "*", "P")):
        axes.plot(point["cost"], point["accuracy"], marker, markersize=11, label=point["method"])
    axes.set_xlabel("mean cost per query (price units)")
    axes.set_ylabel("held-out accuracy")
    axes.set_title(f"cost vs accuracy, {report['n_held_out']} held-out rows (fitted at budget {report['budget']:.3g})")
    axes.legend(fontsize=8)
    axes.grid(alpha=0.3)
    figure.tight_layout()
    atomic_write(Path(path), lambda temporary: figure.savefig(temporary, dpi=120, format="png"))
    plt.close(figure)


def fitted_cascade_json(models: Sequence[str], names: Sequence[str], prices: Sequence[Price],
                        thresholds: Sequence[float], scorer: str, options: Sequence[str]) -> dict:
    """What `llmkit serve --cascade` reads: each stage's model path, name, price and threshold, the scorer, options."""
    return {"format": FITTED_FORMAT, "scorer": scorer, "options": list(options),
            "stages": [{"name": name, "model": str(model), "price": price.to_json(),
                        "threshold": _threshold_json(threshold) if index < len(models) - 1 else None}
                       for index, (model, name, price, threshold) in enumerate(
                           zip(models, names, prices, [*thresholds, None]))]}


def _threshold_json(threshold: float) -> float | str:
    """A threshold for JSON: +inf (always escalate) as the string "inf", which strict JSON readers accept."""
    return "inf" if threshold == float("inf") else threshold
