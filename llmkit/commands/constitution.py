"""`llmkit constitution`: constitutional AI data from a model and a list of principles: critique -> revision rounds
that write an SFT set (SL-CAI), and AI-feedback preference labels (RLAIF) that `llmkit reward train` and `llmkit dpo`
read."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any, Literal

from llmkit.commands.common import Device, Dtype, as_paths
from llmkit.errors import LlmkitError

# The stage helpers take torch-side objects as Any: a TYPE_CHECKING import would still be run by jsonargparse when it
# builds --help, which must never import torch.
Model = Tokenizer = Principle = GenerationSettings = Any

SL_CAI_FILE = "sl_cai.jsonl"
RLAIF_FILE = "rlaif.jsonl"
SUMMARY_FILE = "summary.json"
SETTINGS_FILE = "settings.json"  # the settings a run started with: a resumed run must use the same
DEMO_PROMPTS = 8  # red-team prompts the no-argument demo revises and labels
AGREEMENT_MAX_CHARS = 1200  # HH-RLHF pairs judged for the agreement figure are the first this short
SHOWN_CHARS = 300
Stage = Literal["both", "revise", "label"]


def constitution(
    model: str | None = None,
    prompts: list[str] | str | None = None,
    principles: str | None = None,
    output: str = "runs/constitution",
    stage: Stage = "both",
    rounds: int = 1,
    seed: int = 0,
    max_new_tokens: int = 64,
    temperature: float = 0.7,
    limit: int | None = None,
    batch_size: int = 8,
    position_average: bool = True,
    agreement_pairs: int = 24,
    dtype: Dtype = "float32",
    device: Device = "auto",
) -> dict[str, Any]:
    """Constitutional AI (Bai et al. 2022): the model critiques and revises its own replies under written principles
    (SL-CAI), and labels which of two of its replies follows a principle better (RLAIF).

    Example: llmkit constitution                  (demo: SmolLM2-135M-Instruct, the built-in constitution, 8 HH-RLHF
                                                   red-team prompts, agreement with 24 human-labelled pairs)
             llmkit constitution --model my_model/ --prompts prompts.jsonl --principles principles.yaml --rounds 2
             llmkit finetune --model my_model/ --data runs/constitution/sl_cai.jsonl --template chat
             llmkit dpo --model my_model/ --data runs/constitution/rlaif.jsonl

    SL-CAI: each prompt's reply is critiqued and revised --rounds times, each round under a principle drawn with
    --seed; OUTPUT/sl_cai.jsonl holds one SFT row per prompt (`messages`: the prompt and the final revision) with
    the whole trace (initial reply, principles, critiques, revisions). RLAIF: two replies are sampled per prompt and
    the model answers a multiple-choice question under a drawn principle; the label is read from the log-probs of
    the option tokens " (A)" / " (B)", averaged over both orders of the replies with --position_average;
    OUTPUT/rlaif.jsonl holds prompt/chosen/rejected rows with the preference probability. Rerunning with the same
    --output continues where a run stopped (no row is written twice). --agreement_pairs HH-RLHF pairs labelled by
    people are labelled by the model too, and the share that agrees is printed (0.5 is chance).

    Args:
        model: .gguf file, Hugging Face directory or llmkit directory (default: SmolLM2-135M-Instruct).
        prompts: JSONL files with a "prompt" field per line (default: the first human turns of Anthropic HH-RLHF
            harmless-base conversations, red-team requests).
        principles: YAML file of principles (name, critique, revision, comparison; see llmkit.align.constitution);
            default: the built-in constitution of 8 principles.
        output: run directory (sl_cai.jsonl, rlaif.jsonl, summary.json); an existing one is resumed.
        stage: both, revise (SL-CAI only) or label (RLAIF only).
        rounds: critique -> revision rounds per prompt.
        seed: seeds the principles drawn and the sampling.
        max_new_tokens: longest reply, critique or revision in tokens.
        temperature: sampling temperature (0: greedy; RLAIF needs > 0 for two different replies).
        limit: use at most this many prompts (null: all; the built-in prompts: 8).
        batch_size: prompts generated together (a fixed chunk of the prompt file, so a resumed run writes the same
            rows).
        position_average: ask each RLAIF question with the replies in both orders and average.
        agreement_pairs: HH-RLHF pairs to measure agreement with human labels on (0: skip).
        dtype: activations' dtype.
        device: auto, cpu, cuda or cuda:N.
    """
    from llmkit.align.constitution import DEFAULT_CONSTITUTION, GenerationSettings, load_principles
    from llmkit.checkpoints import load_tokenizer
    from llmkit.commands.common import load_decoder, model_path

    if stage not in ("both", "revise", "label"):
        raise LlmkitError(f"--stage {stage} must be both, revise or label")
    if limit is not None and limit < 1:
        raise LlmkitError(f"--limit {limit} must be at least 1 prompt (null: all)")
    if agreement_pairs < 0:
        raise LlmkitError(f"--agreement_pairs {agreement_pairs} must be 0 (skip) or more")
    if stage != "revise" and temperature <= 0:
        raise LlmkitError(f"--temperature {temperature}: RLAIF samples two replies per prompt, which greedy decoding "
                          "makes identical; pass e.g. --temperature 0.7 (or --stage revise)")
    constitution_ = load_principles(principles) if principles else list(DEFAULT_CONSTITUTION)
    prompt_list, limit = prompt_texts(as_paths(prompts), limit)
    path = model_path(model)
    settings = GenerationSettings(max_new_tokens, temperature, seed=seed)
    run = Path(output)
    check_resume_settings(run, {"model": str(path), "prompts": as_paths(prompts), "principles": fingerprint(
        constitution_), "rounds": rounds, "seed": seed, "max_new_tokens": max_new_tokens, "temperature": temperature,
        "batch_size": batch_size, "position_average": position_average, "dtype": dtype})
    print(f"{min(limit or len(prompt_list), len(prompt_list)):,} prompts; {len(constitution_)} principles; model: "
          f"{path}", flush=True)
    tokenizer = load_tokenizer(path)
    llm = load_decoder(path, dtype, device, weights="float").eval()  # batched decode: fp32 beat Q4 blocks here
    summary: dict[str, Any] = {"model": str(path), "principles": [p.name for p in constitution_], "rounds": rounds}
    if stage in ("both", "revise"):
        summary["sl_cai"] = revise_stage(llm, tokenizer, prompt_list, constitution_, rounds, settings, run, limit,
                                         batch_size)
    if stage in ("both", "label"):
        summary["rlaif"] = label_stage(llm, tokenizer, prompt_list, constitution_, settings, run, limit, batch_size,
                                       position_average)
    if agreement_pairs:
        summary["human_agreement"] = agreement_stage(llm, tokenizer, constitution_, agreement_pairs, seed, batch_size)
    from llmkit.align.runs import write_summary

    write_summary(run / SUMMARY_FILE, summary)
    return summary


def prompt_texts(paths: list[str], limit: int | None) -> tuple[list[str], int | None]:
    """Every prompt of the files (chunks are cut from the whole file), and the limit: the built-in red-team prompts
    with no files (at most DEMO_PROMPTS unless --limit says otherwise)."""
    from llmkit.align.constitution_feedback import red_team_prompts
    from llmkit.align.preference import builtin_hh_rlhf
    from llmkit.align.rollout import load_prompts

    if paths:
        return load_prompts(paths), limit
    return red_team_prompts(builtin_hh_rlhf()), limit or DEMO_PROMPTS


def fingerprint(principles: list[Principle]) -> str:
    """A short hash of the principles' texts: a resumed run must use the same constitution."""
    text = json.dumps([[p.name, p.critique, p.revision, p.comparison] for p in principles])
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def check_resume_settings(run: Path, settings: dict[str, Any]) -> None:
    """Record the run's settings; an existing run directory must have been started with the same ones, or its
    rows would mix two runs."""
    from llmkit.io import atomic_write_text

    recorded = run / SETTINGS_FILE
    if recorded.is_file() and ((run / SL_CAI_FILE).exists() or (run / RLAIF_FILE).exists()):
        before = json.loads(recorded.read_text(encoding="utf-8"))
        for key, value in settings.items():
            if before.get(key) != value:
                flag = "--" + key if key != "model" else "--model"
                raise LlmkitError(f"--output {run} holds a run started with {flag} {before.get(key)!r}, not {value!r}; "
                                  "rerun with its settings to resume it, or choose another --output")
    atomic_write_text(recorded, json.dumps(settings, indent=2) + "\n")


def revise_stage(llm: Model, tokenizer: Tokenizer, prompts: list[str], principles: list[Principle], rounds: int,
                 settings: GenerationSettings, run: Path, limit: int | None, batch_size: int) -> dict[str, Any]:
    """SL-CAI into OUTPUT/sl_cai.jsonl; prints one before/after sample."""
    from llmkit.align.constitution import run_sl_cai

    counts = run_sl_cai(llm, tokenizer, prompts, principles, rounds, settings, run / SL_CAI_FILE, limit, batch_size,
                        progress=lambda line: print(line, flush=True))
    rows = read_rows(run / SL_CAI_FILE)
    if rows:
        row = rows[0]
        print(f"\nprompt:    {shown(row['messages'][0]['content'])}\nbefore:    {shown(row['initial'])}\n"
              f"principle: {row['principles'][-1]}\ncritique:  {shown(row['critiques'][-1])}\n"
              f"after:     {shown(row['revisions'][-1])}\n")
    changed = sum(row["initial"] != row["revisions"][-1] for row in rows)
    print(f"SL-CAI: {len(rows)} rows in {run / SL_CAI_FILE} ({counts.written} written now, resumed at prompt "
          f"{counts.resumed_from}, {counts.skipped} skipped for an empty revision); {changed} revisions differ from "
          "the initial reply", flush=True)
    return {"file": str(run / SL_CAI_FILE), "rows": len(rows), "written": counts.written,
            "skipped_empty": counts.skipped, "changed": changed}


def label_stage(llm: Model, tokenizer: Tokenizer, prompts: list[str], principles: list[Principle],
                settings: GenerationSettings, run: Path, limit: int | None, batch_size: int, position_average: bool
                ) -> dict[str, Any]:
    """RLAIF into OUTPUT/rlaif.jsonl; prints the count, the mean preference and the position bias."""
    from llmkit.align.constitution_feedback import position_bias, run_rlaif

    counts = run_rlaif(llm, tokenizer, prompts, principles, settings, run / RLAIF_FILE, limit, batch_size,
                       position_average, progress=lambda line: print(line, flush=True))
    rows = read_rows(run / RLAIF_FILE)
    bias = position_bias(rows)
    mean = sum(row["preference"] for row in rows) / len(rows) if rows else None
    print(f"RLAIF: {len(rows)} pairs in {run / RLAIF_FILE} ({counts.skipped} prompts skipped: identical or empty "
          "replies)" + (f"; mean P(chosen) {mean:.3f}" if mean is not None else "")
          + (f"; position bias (mean P(A), 0.5 = none) {bias:.3f}" if bias is not None else ""), flush=True)
    return {"file": str(run / RLAIF_FILE), "pairs": len(rows), "written": counts.written,
            "skipped": counts.skipped, "mean_preference": mean, "position_bias": bias}


def agreement_stage(llm: Model, tokenizer: Tokenizer, principles: list[Principle], n_pairs: int, seed: int,
                    batch_size: int) -> dict[str, float]:
    """The AI labels of human-labelled HH-RLHF pairs: the share that agrees, with its 95% interval."""
    from llmkit.align.constitution_feedback import human_agreement, short_pairs
    from llmkit.align.preference import builtin_hh_rlhf

    pairs = short_pairs(builtin_hh_rlhf(), n_pairs, AGREEMENT_MAX_CHARS)
    print(f"labelling {len(pairs)} human-labelled HH-RLHF pairs (each at most {AGREEMENT_MAX_CHARS} characters)",
          flush=True)
    figures = human_agreement(llm, tokenizer, pairs, principles, seed, batch_size)
    half_width = 1.96 * (0.25 / figures["pairs"]) ** 0.5
    print(f"agreement with the human labels: {figures['agreement']:.3f} (+-{half_width:.2f} at 95%; 0.5 is chance) "
          f"position-averaged, {figures['agreement_one_order']:.3f} with the chosen reply always shown as (A); "
          f"position bias (mean P(A)) {figures['position_bias']:.3f}", flush=True)
    return figures


def read_rows(path: Path) -> list[dict[str, Any]]:
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


def shown(text: str) -> str:
    """One line of at most SHOWN_CHARS characters."""
    text = " ".join(text.split())
    return text if len(text) <= SHOWN_CHARS else text[:SHOWN_CHARS - 3] + "..."
