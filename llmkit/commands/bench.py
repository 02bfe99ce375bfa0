"""`llmkit bench peft`: the fine-tuning shoot-out. Every method trains the same model on the same DialogSum
dialogues, in the same order, for the same steps; each then answers the same held-out dialogues (ROUGE) and scores
the same general text (perplexity, to see what fine-tuning made the model forget).

Each method runs in its own fresh process, so its peak memory is its own and nothing leaks between methods; its
result is written to OUTPUT/<arm>/result.json as soon as it is done, so an interrupted shoot-out resumes where it
stopped (a half-trained arm resumes from its last checkpoint).
"""

from __future__ import annotations

import dataclasses
import json
import shutil
import statistics
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from llmkit.commands.common import Device
from llmkit.errors import LlmkitError
from llmkit.io import atomic_write, atomic_write_text, read_json_object

RESULT_FILE = "result.json"
ADAPTER_DIR = "adapter"
TABLE_FILE = "shootout.md"
JSON_FILE = "shootout.json"
PLOT_FILE = "shootout.png"
BASE_ARM = "base"  # the model before fine-tuning: the "before" of every method
TEMPLATE = "flan_dialogue_summary"
PROMPT_INIT_TEXT = "Summarize the following dialogue in one sentence."


@dataclass(frozen=True)
class Arm:
    """One contender: a fine-tuning method, its settings, and the learning rate it is trained with."""

    method: str
    settings: dict[str, Any]
    lr: float


# Learning rates are each method's usual ones (full fine-tuning small; soft prompts large, as in their papers and
# peft's examples), scaled up a little for a run of a few dozen steps. Prefix tuning is the exception: at peft's
# 1e-2 its reparameterisation MLP (512 -> 2 x n_layers x kv_dim) moved the keys and values so far that training
# diverged (loss 3.2 -> 13.5 in 24 steps), so it gets 3e-4.
ARMS: dict[str, Arm] = {
    "full": Arm("selective", {"mode": "full"}, 5e-5),
    "last_2_blocks": Arm("selective", {"mode": "last_blocks", "n_blocks": 2}, 2e-4),
    "lora": Arm("lora", {"rank": 8, "alpha": 16.0}, 2e-3),
    "dora": Arm("lora", {"rank": 8, "alpha": 16.0, "dora": True}, 2e-3),
    "qlora": Arm("qlora", {"rank": 8, "alpha": 16.0}, 2e-3),
    "ia3": Arm("ia3", {}, 1e-2),
    "adapter": Arm("adapter", {"bottleneck": 64}, 2e-3),
    "prefix": Arm("prefix", {"n_virtual_tokens": 20}, 3e-4),
    "prompt": Arm("prompt", {"n_virtual_tokens": 20, "init": "text", "init_text": PROMPT_INIT_TEXT}, 3e-2),
}


@dataclass(frozen=True)
class Shootout:
    """What every arm shares; a result on disk is reused only when it was made with the same values."""

    model: str
    train_rows: int
    test_rows: int
    steps: int
    batch_size: int
    max_length: int
    perplexity_tokens: int
    seed: int
    device: str


def bench_peft(
    model: str | None = None,
    methods: list[str] | None = None,
    train_rows: int = 96,
    test_rows: int = 20,
    steps: int = 24,
    batch_size: int = 4,
    max_length: int = 384,
    perplexity_tokens: int = 2048,
    seed: int = 1337,
    output: str = "runs/bench_peft",
    device: Device = "auto",
) -> dict[str, Any]:
    """Fine-tune one model with every method on the same data and compare them: size, memory, speed, quality.

    Example: llmkit bench peft                                  (SmolLM2-135M-Instruct, every method; ~30 min on 2 CPU cores)
             llmkit bench peft --methods "[lora, qlora, ia3]" --steps 12
             llmkit bench peft --model my_model/ --output runs/my_shootout

    Each method trains on the first TRAIN_ROWS dialogues of DialogSum's training split (FLAN-style prompts, loss on
    the summary only) for STEPS steps of BATCH_SIZE, in the same order. Reported per method: trainable parameters
    (count and % of the base model), adapter file size, weights and peak memory, training tokens/s, ROUGE-1/2/L
    of greedy summaries of TEST_ROWS held-out test dialogues, and perplexity on the first PERPLEXITY_TOKENS tokens
    of tinyshakespeare (general text: how much the method made the model forget). The "base" row is the model
    before fine-tuning. Writes OUTPUT/shootout.md, shootout.json, shootout.png; rerun to resume after a stop.

    Args:
        model: .gguf file, Hugging Face directory or llmkit directory (default: SmolLM2-135M-Instruct).
        methods: arms to run, from: full, last_2_blocks, lora, dora, qlora, ia3, adapter, prefix, prompt (default: all).
        train_rows: DialogSum training dialogues to train on.
        test_rows: DialogSum test dialogues scored with ROUGE.
        steps: optimizer steps per method.
        batch_size: examples per step.
        max_length: longest training example in tokens (longer prompts are cut from the left).
        perplexity_tokens: tokens of general text scored for forgetting.
        seed: random seed (data order, initialisation).
        output: directory for the per-method runs and the report.
        device: auto, cpu, cuda or cuda:N (each method trains in float32, as the shoot-out compares them).
    """
    from llmkit.checkpoints import default_model_path

    arms = list(ARMS) if methods is None else list(methods)
    unknown = [name for name in arms if name not in ARMS]
    if unknown or not arms:
        raise LlmkitError(f"unknown methods {unknown or arms}; choose from {', '.join(ARMS)}")
    for name, value in (("train_rows", train_rows), ("test_rows", test_rows), ("steps", steps),
                        ("batch_size", batch_size), ("perplexity_tokens", perplexity_tokens)):
        if value < 1:
            raise LlmkitError(f"{name}={value} must be at least 1")
    if batch_size > train_rows:
        raise LlmkitError(f"batch_size={batch_size} is more than train_rows={train_rows}; lower --batch_size")
    path = Path(model) if model else default_model_path()
    if not path.exists():
        raise LlmkitError(f"model not found: {path}; pass a .gguf file or a model directory")
    setup = Shootout(str(path.resolve()), train_rows, test_rows, steps, batch_size, max_length, perplexity_tokens, seed,
                     device)
    output_dir = Path(output)
    results = {name: run_in_fresh_process(name, setup, output_dir) for name in [BASE_ARM, *arms]}
    table = markdown_table(results)
    report = {"setup": dataclasses.asdict(setup), "arms": {name: dataclasses.asdict(ARMS[name]) for name in arms},
              "results": results}
    atomic_write_text(output_dir / TABLE_FILE, table + "\n")
    atomic_write_text(output_dir / JSON_FILE, json.dumps(report, indent=2) + "\n")
    plot_shootout(results, output_dir / PLOT_FILE, f"{Path(setup.model).name}: {steps} steps x {batch_size} DialogSum "
                  f"examples per method")
    print(table)
    print(f"wrote {output_dir / TABLE_FILE}, {output_dir / JSON_FILE} and {output_dir / PLOT_FILE}")
    return report


def run_in_fresh_process(name: str, setup: Shootout, output_dir: Path) -> dict[str, Any]:
    """One arm's result: read from its result.json when that was made with `setup`, else computed in a new process."""
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor
    from concurrent.futures.process import BrokenProcessPool

    from llmkit.train.checkpoint import CHECKPOINTS_DIR

    result_path = output_dir / name / RESULT_FILE
    if result_path.is_file():
        saved = read_json_object(result_path)
        if saved.get("setup") == arm_setup(name, setup) and saved.get("arm") == arm_record(name):
            print(f"{name}: reusing {result_path}")
            return saved["result"]
        raise LlmkitError(f"{result_path} was made with other settings; pass another --output or delete "
                          f"{output_dir / name} to run it again")
    print(f"{name}: running in a fresh process")
    context = multiprocessing.get_context("spawn")
    try:
        with ProcessPoolExecutor(max_workers=1, mp_context=context) as pool:
            result = pool.submit(run_arm, name, setup, output_dir / name).result()
    except BrokenProcessPool:
        raise LlmkitError(f"the {name} arm's process died (out of memory, or killed); rerun the same command to resume "
                          "from its last checkpoint, or lower --batch_size") from None
    record = {"setup": arm_setup(name, setup), "arm": arm_record(name), "result": result}
    atomic_write_text(result_path, json.dumps(record, indent=2) + "\n")
    shutil.rmtree(output_dir / name / CHECKPOINTS_DIR, ignore_errors=True)  # only needed to resume; the adapter stays
    return result


def arm_record(name: str) -> dict[str, Any] | None:
    """What defines an arm's training (None for the base model)."""
    return dataclasses.asdict(ARMS[name]) if name in ARMS else None


def arm_setup(name: str, setup: Shootout) -> dict[str, Any]:
    """The shared values an arm's result depends on: the untrained base ignores the training ones."""
    values = dataclasses.asdict(setup)
    if name == BASE_ARM:
        values = {key: values[key] for key in ("model", "test_rows", "perplexity_tokens", "seed", "device")}
    return values


def run_arm(name: str, setup: Shootout, run_dir: Path) -> dict[str, Any]:
    """Train arm `name` (none for the base) and measure it; runs inside its own process."""
    import torch

    from llmkit.checkpoints import load_model, load_tokenizer
    from llmkit.commands.finetune import rouge_on
    from llmkit.data.packing import sft_batches
    from llmkit.data.sft import builtin_dialogsum, tokenize_records
    from llmkit.device import resolve_device
    from llmkit.eval.builtin import shakespeare_perplexity
    from llmkit.eval.perplexity import perplexity
    from llmkit.peft.core import count_parameters, save_adapter
    from llmkit.peft.registry import apply_method, settings_from_dict
    from llmkit.train.loop import train
    from llmkit.train.objectives import causal_lm_loss
    from llmkit.train.settings import TrainSettings

    device = resolve_device(setup.device)
    tokenizer = load_tokenizer(setup.model)
    model = load_model(setup.model, device=str(device), arch="decoder")
    base_parameters = count_parameters(model)[1]
    result: dict[str, Any] = {"base_parameters": base_parameters}
    if name != BASE_ARM:
        arm = ARMS[name]
        settings = settings_from_dict(arm.method, arm.settings)
        records = builtin_dialogsum("train", setup.train_rows)
        examples, report = tokenize_records(records, tokenizer, TEMPLATE, setup.max_length, seed=setup.seed)
        torch.manual_seed(setup.seed)
        model = apply_method(model, arm.method, settings, tokenizer)
        trainable = count_parameters(model)[0]
        pad_id = tokenizer.pad_id if tokenizer.pad_id is not None else 0
        batches = sft_batches(examples, setup.batch_size, seed=setup.seed, pad_id=pad_id)  # padded to the longest
        train_settings = TrainSettings(max_steps=setup.steps, batch_size=setup.batch_size, lr=arm.lr,
                                       warmup_steps=max(1, setup.steps // 10), weight_decay=0.0, eval_every=0,
                                       log_every=1, checkpoint_every=max(1, setup.steps // 2), keep_last=1,
                                       seed=setup.seed, device=setup.device)
        reset_peak_memory(device)
        trained = train(model, causal_lm_loss, batches, train_settings, run_dir)
        adapter = save_adapter(model, run_dir / ADAPTER_DIR, arm.method, settings)
        result.update({
            "trainable_parameters": trainable, "trainable_percent": 100 * trainable / base_parameters,
            "adapter_bytes": sum(file.stat().st_size for file in adapter.iterdir()),
            "peak_memory_mb": peak_memory_mb(device), "tokens_per_s": tokens_per_second(run_dir),
            "train_tokens": trained.tokens, "final_train_loss": trained.train_loss,
            "truncated_examples": report.truncated,
        })
    result["weights_mb"] = weights_mb(model)
    held_out = builtin_dialogsum("test", setup.test_rows)
    result["rouge"] = rouge_on(model, tokenizer, held_out, TEMPLATE)
    text = shakespeare_perplexity()
    with torch.no_grad():
        scored = perplexity(model.eval(), tokenizer, text.text, window=text.window, stride=text.stride,
                            max_tokens=setup.perplexity_tokens)
    result["general_perplexity"] = scored.perplexity
    return result


def reset_peak_memory(device: Any) -> None:
    """Start the peak-memory count now: CUDA's allocator peak, or (CPU) the process's peak resident set on Linux
    (elsewhere the peak since the process started, which includes loading the model)."""
    import torch

    from llmkit.memory import reset_peak_rss

    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    else:
        reset_peak_rss()


def peak_memory_mb(device: Any) -> float:
    """Peak memory since reset_peak_memory: CUDA allocated bytes, or the process's peak resident set (VmHWM)."""
    import torch

    from llmkit.memory import peak_rss_mb

    return torch.cuda.max_memory_allocated(device) / 2**20 if device.type == "cuda" else peak_rss_mb()


def tokens_per_second(run_dir: Path) -> float:
    """Median training throughput over steps 3..N from the loop's metrics.jsonl (steps 1-2 warm up; a resumed run's
    restart gap is skipped)."""
    from llmkit.train.metrics import METRICS_FILE

    rows = [json.loads(line) for line in (run_dir / METRICS_FILE).read_text().splitlines() if line.strip()]
    rows = [row for row in rows if row.get("kind") == "train"]
    rates = [(after["tokens"] - before["tokens"]) / (after["elapsed_s"] - before["elapsed_s"])
             for before, after in zip(rows, rows[1:])
             if after["step"] == before["step"] + 1 and after["step"] > 2 and after["elapsed_s"] > before["elapsed_s"]]
    if not rates:
        raise LlmkitError(f"{run_dir / METRICS_FILE} has too few training steps to measure speed; use --steps 4 or more")
    return statistics.median(rates)


def weights_mb(model: Any) -> float:
    """Bytes of the model's parameters and buffers (NF4 codes and scales are buffers), a shared tensor once."""
    tensors = {id(tensor): tensor for tensor in [*model.parameters(), *model.buffers()]}
    return sum(tensor.numel() * tensor.element_size() for tensor in tensors.values()) / 2**20


def markdown_table(results: dict[str, dict[str, Any]]) -> str:
    """One row per arm; the base row gives the "before" ROUGE and perplexity."""
    header = ("| method | trainable | % of base | adapter file | weights MB | peak memory MB | train tokens/s | "
              "ROUGE-1 | ROUGE-2 | ROUGE-L | general ppl |")
    lines = [header, "|" + "---|" * (header.count("|") - 1)]
    for name, result in results.items():
        rouge = result["rouge"]
        trained = name != BASE_ARM
        cells = [
            f"{name} ({ARMS[name].method})" if trained and ARMS[name].method != name else name,
            f"{result['trainable_parameters']:,}" if trained else "-",
            f"{result['trainable_percent']:.3f}" if trained else "-",
            human_bytes(result["adapter_bytes"]) if trained else "-",
            f"{result['weights_mb']:.0f}",
            f"{result['peak_memory_mb']:.0f}" if trained else "-",
            f"{result['tokens_per_s']:.0f}" if trained else "-",
            f"{rouge['rouge1']:.4f}", f"{rouge['rouge2']:.4f}", f"{rouge['rougeL']:.4f}",
            f"{result['general_perplexity']:.2f}",
        ]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def human_bytes(count: int) -> str:
    """1,234,567 -> '1.2 MB' (decimal units, as file browsers show file sizes)."""
    for unit, size in (("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if count >= size:
            return f"{count / size:.1f} {unit}"
    return f"{count} B"


def plot_shootout(results: dict[str, dict[str, Any]], path: Path, title: str) -> None:
    """Six panels, one bar per method: ROUGE-L and general perplexity (the base model as a dashed line), training
    tokens/s, peak memory, trainable share and adapter size (log scales where methods differ by orders)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    base = results[BASE_ARM]
    names = [name for name in results if name != BASE_ARM]
    panels = [
        ("ROUGE-L on held-out dialogues (higher is better)", [results[n]["rouge"]["rougeL"] for n in names],
         base["rouge"]["rougeL"], False, "{:.3f}"),
        ("perplexity on general text (lower: less forgetting)", [results[n]["general_perplexity"] for n in names],
         base["general_perplexity"], False, "{:.1f}"),
        ("training tokens/s", [results[n]["tokens_per_s"] for n in names], None, False, "{:.0f}"),
        ("peak memory while training (MB)", [results[n]["peak_memory_mb"] for n in names], None, False, "{:.0f}"),
        ("trainable parameters (% of base, log)", [results[n]["trainable_percent"] for n in names], None, True, "{:.3g}"),
        ("adapter file (MB, log)", [results[n]["adapter_bytes"] / 1e6 for n in names], None, True, "{:.3g}"),
    ]
    figure, axes = plt.subplots(2, 3, figsize=(16, 8.5))
    for axis, (label, values, before, log_scale, fmt) in zip(axes.flat, panels):
        bars = axis.bar(range(len(names)), values, color="tab:blue")
        axis.bar_label(bars, labels=[fmt.format(value) for value in values], fontsize=7)
        if before is not None:
            axis.axhline(before, color="tab:red", linestyle="--", linewidth=1, label=f"before fine-tuning: {before:.3g}")
            axis.legend(fontsize=8, loc="best")
        if log_scale:
            axis.set_yscale("log")
        axis.set_xticks(range(len(names)), names, rotation=30, ha="right", fontsize=8)
        axis.set_title(label, fontsize=10)
        axis.grid(axis="y", alpha=0.3)
    figure.suptitle(title)
    figure.tight_layout()
    atomic_write(path, lambda tmp: figure.savefig(tmp, dpi=100, format="png"))
    plt.close(figure)
