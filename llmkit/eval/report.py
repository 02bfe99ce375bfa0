"""Aggregate report in the spirit of the MosaicML Gauntlet: tasks grouped into categories, each score
rescaled against its random baseline so that 0 means guessing and 1 means perfect,

    rescaled = max(0, (score - baseline) / (1 - baseline))

then averaged within each category, and the category averages averaged into one overall score (each category
weighs the same however many tasks it holds). Several models are reported side by side.
Writes results.json (every metric), report.md (tables) and report.png (bar chart of the category scores).
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from llmkit.errors import LlmkitError
from llmkit.eval.runner import TaskResult
from llmkit.io import atomic_write, atomic_write_text

RESULTS_FILE = "results.json"
MARKDOWN_FILE = "report.md"
CHART_FILE = "report.png"
OVERALL = "overall"


def rescale(score: float, baseline: float) -> float:
    """(score - baseline) / (1 - baseline), clipped at 0: 0 is random guessing, 1 is a perfect score."""
    if not 0 <= baseline < 1:
        raise LlmkitError(f"random baseline {baseline} must lie in [0, 1) to rescale a score against it")
    return max(0.0, (score - baseline) / (1 - baseline))


def aggregate(results: Sequence[TaskResult], model: str = "model") -> dict[str, Any]:
    """One model's report: each task with its rescaled score, category averages (in order of first appearance)
    and the overall average of the categories."""
    if not results:
        raise LlmkitError("no task results to report; run at least one task")
    tasks = [{**result.summary(), "rescaled": None if result.random_baseline is None else
              rescale(result.score, result.random_baseline)} for result in results]
    by_category: dict[str, list[float]] = {}
    for task in tasks:
        if task["rescaled"] is not None:  # perplexity has no 0-1 scale: reported, not averaged
            by_category.setdefault(task["category"], []).append(task["rescaled"])
    categories = {name: sum(values) / len(values) for name, values in by_category.items()}
    overall = sum(categories.values()) / len(categories) if categories else None
    return {"model": model, "tasks": tasks, "categories": categories, OVERALL: overall}


def comparison_table(reports: Sequence[dict[str, Any]]) -> str:
    """A Markdown table, models side by side: each task's score (rescaled), then category and overall averages."""
    header = ["task", "category", "metric", *(report["model"] for report in reports)]
    names = list(dict.fromkeys(task["name"] for report in reports for task in report["tasks"]))
    rows = []
    for name in names:
        found = [next((task for task in report["tasks"] if task["name"] == name), None) for report in reports]
        first = next(task for task in found if task is not None)
        cells = [_score_cell(task) for task in found]
        rows.append([name, first["category"], first["metric"], *cells])
    categories = list(dict.fromkeys(category for report in reports for category in report["categories"]))
    for category in categories:
        cells = [f"{report['categories'][category]:.3f}" if category in report["categories"] else "-" for report in reports]
        rows.append([f"**{category}**", "", "rescaled", *cells])
    rows.append([f"**{OVERALL}**", "", "rescaled", *(_number(report[OVERALL]) for report in reports)])
    return _markdown_table(header, rows)


def _score_cell(task: dict[str, Any] | None) -> str:
    if task is None:
        return "-"
    if task["rescaled"] is None:
        return f"{task['score']:.4g}"
    return f"{task['score']:.3f} ({task['rescaled']:.3f})"


def _number(value: float | None) -> str:
    return "-" if value is None else f"{value:.3f}"


def _markdown_table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    widths = [max(len(str(cell)) for cell in column) for column in zip(header, *rows)]
    lines = [header, ["-" * width for width in widths], *rows]
    return "\n".join("| " + " | ".join(str(cell).ljust(width) for cell, width in zip(line, widths)) + " |"
                     for line in lines)


def markdown_report(reports: Sequence[dict[str, Any]]) -> str:
    """The whole report: the side-by-side table, every metric of every task, and where each task's data comes from."""
    lines = ["# Evaluation report", "",
             "Scores are the task's primary metric; in brackets, rescaled against the random baseline "
             "(0 = guessing, 1 = perfect). Category and overall rows average the rescaled scores.", "",
             comparison_table(reports), "", f"![category scores]({CHART_FILE})", ""]
    for report in reports:
        lines += [f"## {report['model']}", ""]
        rows = [[task["name"], task["kind"], str(task["n_rows"]), str(task["num_fewshot"]),
                 _number(task["random_baseline"]), ", ".join(f"{k}={v:.4g}" for k, v in task["metrics"].items())]
                for task in report["tasks"]]
        lines += [_markdown_table(["task", "kind", "rows", "shots", "baseline", "metrics"], rows), ""]
    sources = {task["name"]: task["source"] for report in reports for task in report["tasks"] if task["source"]}
    if sources:
        lines += ["## Task sources", "", *(f"- `{name}`: {source}" for name, source in sources.items()), ""]
    return "\n".join(lines)


def plot_report(reports: Sequence[dict[str, Any]], path: str | Path) -> None:
    """A grouped bar chart of each model's rescaled category and overall scores, saved as PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    groups = [*dict.fromkeys(category for report in reports for category in report["categories"]), OVERALL]
    if all(report[OVERALL] is None for report in reports):
        groups = []  # perplexity only: nothing on the 0-1 scale to draw
    width = 0.8 / len(reports)
    figure, axes = plt.subplots(figsize=(max(6.0, 1.4 * len(groups) * max(1, len(reports) / 2)), 4.0))
    for index, report in enumerate(reports):
        scores = {**report["categories"], OVERALL: report[OVERALL]}
        offset = (index - (len(reports) - 1) / 2) * width
        present = [position for position, group in enumerate(groups) if scores.get(group) is not None]  # may skip some
        values = [scores[groups[position]] for position in present]
        bars = axes.bar([position + offset for position in present], values, width=width, label=report["model"])
        axes.bar_label(bars, labels=[f"{value:.2f}" for value in values], fontsize=8)
    axes.set_xticks(range(len(groups)), groups, rotation=15)
    if not groups:
        axes.text(0.5, 0.5, "no task on a 0-1 scale (perplexity is in the tables)", ha="center", transform=axes.transAxes)
    axes.set_ylim(0, 1.05)
    axes.set_ylabel("rescaled score (0 = random, 1 = perfect)")
    axes.set_title("llmkit evaluation")
    if groups:
        axes.legend(fontsize=8)
    figure.tight_layout()
    atomic_write(Path(path), lambda tmp: figure.savefig(tmp, format="png", dpi=120))
    plt.close(figure)


def write_report(reports: Sequence[dict[str, Any]], out_dir: str | Path) -> dict[str, Path]:
    """Write results.json, report.md and report.png into `out_dir`; returns their paths."""
    out_dir = Path(out_dir)
    paths = {"json": out_dir / RESULTS_FILE, "markdown": out_dir / MARKDOWN_FILE, "chart": out_dir / CHART_FILE}
    atomic_write_text(paths["json"], json.dumps({"models": list(reports)}, indent=2, ensure_ascii=False) + "\n")
    atomic_write_text(paths["markdown"], markdown_report(reports))
    plot_report(reports, paths["chart"])
    return paths
