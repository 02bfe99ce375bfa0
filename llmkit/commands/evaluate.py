"""`llmkit evaluate`: run tasks on one or more models, print them side by side, write the report and the prompts."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

from llmkit.commands.common import Device, Dtype
from llmkit.errors import LlmkitError

DEFAULT_TASKS = "perplexity,sst2,dialogsum,hh_rlhf_harmless"
PROMPTS_DIR = "prompts"


def evaluate(
    model: list[str] | str | None = None,
    tasks: str = DEFAULT_TASKS,
    limit: int | None = None,
    num_fewshot: int | None = None,
    batch_size: int = 8,
    output: str = "eval_out",
    truncate_prompt: bool = False,
    progress: bool = True,
    dtype: Dtype = "float32",
    device: Device = "auto",
) -> list[dict[str, Any]]:
    """Evaluate models on benchmark tasks; print a side-by-side table and write JSON, Markdown and a bar chart.

    Example: llmkit evaluate --limit 40                    (SmolLM2-135M-Instruct, every built-in task, 40 rows each)
             llmkit evaluate --model my_model/ --tasks perplexity,sst2,dialogsum
             llmkit evaluate --model "[base.gguf, tuned/]" --tasks sst2,my_task.yaml --num_fewshot 2 --output compare/

    Built-in tasks: sst2 (sentiment, multiple choice), dialogsum (summarization, ROUGE), hh_rlhf_harmless
    (chosen vs rejected reply), perplexity (of a fixed Shakespeare text; reported, not averaged). A task spec
    file (.json/.yaml) adds your own (see docs/evaluation.md). Writes OUTPUT/results.json, report.md,
    report.png, and OUTPUT/prompts/MODEL/TASK.jsonl with every prompt, target and prediction.

    Args:
        model: .gguf file, Hugging Face directory or llmkit directory, or a list of them to compare
            (default: SmolLM2-135M-Instruct).
        tasks: comma-separated built-in task names and/or task spec files.
        limit: evaluate only the first N rows of each task (quick runs).
        num_fewshot: few-shot examples per prompt for every task (default: each task's own).
        batch_size: prompts per forward pass (left-padded batches).
        output: folder for results.json, report.md, report.png and prompts/.
        truncate_prompt: keep the last tokens of a prompt longer than the context window instead of failing.
        progress: show progress bars.
        dtype: weights' dtype.
        device: auto, cpu, cuda or cuda:N.
    """
    from llmkit.checkpoints import default_model_path, load_tokenizer
    from llmkit.commands.common import load_decoder
    from llmkit.eval.report import aggregate, comparison_table, write_report
    from llmkit.eval.runner import evaluate_model, write_samples

    paths = [Path(path) for path in ([model] if isinstance(model, str) else model or [])] or [default_model_path()]
    task_list = load_tasks(tasks)
    labels = model_labels(paths)
    reports = []
    for path, label in zip(paths, labels):
        tokenizer = load_tokenizer(path)
        llm = load_decoder(path, dtype, device)
        if progress:
            print(f"evaluating {label} ({path}) on {', '.join(task.name for task in task_list)}", flush=True)
        results = evaluate_model(llm, tokenizer, task_list, limit=limit, num_fewshot=num_fewshot, batch_size=batch_size,
                                 progress=progress, truncate_prompt=truncate_prompt)
        del llm
        for result in results:
            if result.samples:  # perplexity has no prompts of its own
                write_samples(result, Path(output) / PROMPTS_DIR / _file_name(label) / f"{result.name}.jsonl")
        report = aggregate(results, model=label)
        report["path"] = str(path)
        reports.append(report)
    written = write_report(reports, output)
    print(comparison_table(reports))
    print(f"\nwrote {', '.join(str(p) for p in written.values())} and the prompts under {Path(output) / PROMPTS_DIR}")
    return reports


def load_tasks(tasks: str | list[str]) -> list:
    """Tasks from a comma-separated string (or list) of built-in names and spec file paths."""
    from llmkit.eval.builtin import BUILTIN_TASKS, load_builtin
    from llmkit.eval.tasks import load_task

    names = [name.strip() for name in (tasks.split(",") if isinstance(tasks, str) else tasks) if name.strip()]
    if not names:
        raise LlmkitError(f"no tasks given; pass --tasks with built-in names ({', '.join(BUILTIN_TASKS)}) or spec files")
    loaded = [load_builtin(name) if name in BUILTIN_TASKS or not Path(name).suffix else load_task(name) for name in names]
    seen = [task.name for task in loaded]
    duplicates = sorted({name for name in seen if seen.count(name) > 1})
    if duplicates:
        raise LlmkitError(f"task name(s) {duplicates} appear more than once; give each task once, with a unique name")
    return loaded


def model_labels(paths: list[Path]) -> list[str]:
    """Short, unique names for the models: the file or folder name, numbered when two are the same."""
    names = [path.stem if path.is_file() else path.name for path in paths]
    return [f"{name}#{names[:index].count(name) + 1}" if names.count(name) > 1 else name for index, name in enumerate(names)]


def _file_name(label: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "_", label)
