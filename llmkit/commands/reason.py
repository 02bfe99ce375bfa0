"""`llmkit reason`: prompting methods (direct, chain of thought, self-consistency, PAL) side by side on GSM8K."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

from llmkit.commands.common import Device, Dtype
from llmkit.errors import LlmkitError

DEFAULT_METHODS = "direct,zero_shot_cot,fewshot_cot,self_consistency,pal"
RESULTS_FILE, TABLE_FILE, SAMPLES_DIR = "results.json", "table.md", "samples"


def reason(
    model: str | None = None,
    methods: str = DEFAULT_METHODS,
    limit: int = 20,
    split: Literal["test", "train"] = "test",
    shots: int = 4,
    selection: Literal["random", "similar", "fixed"] = "random",
    samples: int = 5,
    temperature: float = 0.7,
    cot_tokens: int = 256,
    chat: bool | None = None,
    seed: int = 1234,
    batch_size: int = 8,
    output: str = "reason_out",
    progress: bool = True,
    weights: Literal["float", "quantized"] = "float",
    dtype: Dtype = "float32",
    device: Device = "auto",
) -> list[dict[str, Any]]:
    """Compare prompting methods on GSM8K math word problems: exact-match accuracy of each, on the same problems.

    Example: llmkit reason                                   (SmolLM2-135M-Instruct, every method, 20 test problems)
             llmkit reason --methods direct,fewshot_cot --limit 100 --shots 8 --selection similar
             llmkit reason --model gemma-3-270m.gguf --chat false --methods fewshot_cot

    Methods: direct (few-shot, answer only), zero_shot_cot ("Let's think step by step.", Kojima et al. 2022),
    fewshot_cot (worked rationales from the train split, Wei et al. 2022), self_consistency (the few-shot CoT
    prompt, SAMPLES chains at TEMPERATURE, majority vote; Wang et al. 2023), pal (the model writes a Python
    program, a sandbox runs it, the printed number is the answer; Gao et al. 2022). Prints the table and writes
    OUTPUT/results.json, OUTPUT/table.md and OUTPUT/samples/METHOD.jsonl (every prompt, reply and answer).
    Small models score near 0 on GSM8K: compare the methods with each other on one model.

    Args:
        model: .gguf file, Hugging Face directory or llmkit directory (default: SmolLM2-135M-Instruct).
        methods: comma-separated methods to run, in table order.
        limit: the first N problems of the split.
        split: GSM8K split the problems come from (few-shot examples always come from train, never the problem itself).
        shots: few-shot examples per prompt (direct, fewshot_cot, self_consistency).
        selection: how examples are chosen: random (seeded, per problem), similar (nearest questions by
            all-MiniLM-L6-v2 embeddings) or fixed (the first train problems).
        samples: self-consistency chains per problem.
        temperature: self-consistency sampling temperature.
        cot_tokens: new tokens a reasoning chain may take.
        chat: lay prompts out as chat turns (default: when the model has a chat template; false for base models).
        seed: seed of the example draw and of the sampling.
        batch_size: problems per batched generation.
        output: folder for results.json, table.md and samples/.
        progress: show a progress bar per method.
        weights: a .gguf's matrices dequantized at load (float) or kept in their blocks (quantized: less memory,
            but few-shot prompts are long and the quantized path dequantizes every matrix on each prefill forward).
        dtype: weights' dtype.
        device: auto, cpu, cuda or cuda:N.
    """
    import json
    from functools import partial

    from llmkit.apps.gsm8k import METHODS, Setup, load_gsm8k, method_budget, method_table, prediction_record, run_method
    from llmkit.commands.common import local_model, model_path
    from llmkit.io import atomic_write_text

    names = [name.strip() for name in methods.split(",") if name.strip()]
    unknown = [name for name in names if name not in METHODS]
    if unknown or not names:
        raise LlmkitError(f"--methods {methods!r}: {', '.join(unknown) or 'none given'} is not a method; choose from "
                          f"{', '.join(METHODS)}")
    if batch_size < 1:
        raise LlmkitError(f"--batch_size {batch_size} must be >= 1")
    if limit is not None and limit < 1:
        raise LlmkitError(f"--limit {limit} must be >= 1 (or leave it out for the whole split)")
    problems = load_gsm8k(split, limit)
    setup = Setup(shots=shots, selection=selection, seed=seed, chat=chat, cot_tokens=cot_tokens, samples=samples,
                  temperature=temperature)
    path = model_path(model)
    llm = local_model(model, dtype, device, weights, batch_size)
    if progress:
        layout = "chat turns" if setup.uses_chat(llm) else "plain Q/A"
        print(f"GSM8K {split}: {len(problems)} problems, {shots}-shot ({selection}), {layout} prompts, {path.name}",
              flush=True)
    results = [run_method(name, partial(METHODS[name], setup=setup), llm, problems, batch_size, progress,
                          method_budget(name, setup)) for name in names]
    out = Path(output)
    for result in results:
        lines = [json.dumps(prediction_record(problem, prediction))
                 for problem, prediction in zip(problems, result.predictions)]
        atomic_write_text(out / SAMPLES_DIR / f"{result.method}.jsonl", "\n".join(lines) + "\n")
    summaries = [result.summary() for result in results]
    info = {"model": str(path), "split": split, "n_problems": len(problems), "setup": {
        key: getattr(setup, key) for key in ("shots", "selection", "seed", "cot_tokens", "samples", "temperature")}}
    atomic_write_text(out / RESULTS_FILE, json.dumps({**info, "methods": summaries}, indent=2) + "\n")
    table = method_table(results)
    atomic_write_text(out / TABLE_FILE, table + "\n")
    print(table)
    print(f"\nwrote {out / RESULTS_FILE}, {out / TABLE_FILE} and {out / SAMPLES_DIR}/")
    return summaries
