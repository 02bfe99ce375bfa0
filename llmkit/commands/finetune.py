"""`llmkit finetune`: supervised fine-tuning (full, selective or any PEFT method) through the one training loop.
A thin recipe: read and template the data, apply the method, train, save the adapter, compare ROUGE."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

from llmkit.commands.common import as_paths
from llmkit.data.safety import HarmfulMode, PiiMode
from llmkit.data.templates import FieldMap
from llmkit.errors import LlmkitError
from llmkit.peft.settings import (
    SETTINGS,
    AdapterSettings,
    IA3Settings,
    LoraSettings,
    PrefixTuningSettings,
    PromptTuningSettings,
    QLoraSettings,
    SelectiveSettings,
)
from llmkit.train.settings import TrainSettings, check_settings

Method = Literal["lora", "qlora", "prompt", "prefix", "ia3", "adapter", "selective"]
ADAPTER_DIR = "adapter"
MERGED_DIR = "merged"
# Minutes on a laptop CPU for the built-in DialogSum subset and SmolLM2-135M.
FINETUNE_DEFAULTS = TrainSettings(max_steps=60, batch_size=4, lr=1e-3, warmup_steps=6, eval_every=30, eval_batches=5,
                                  checkpoint_every=30, log_every=5, weight_decay=0.0)


def finetune(
    model: str | None = None,
    data: list[str] | str | None = None,
    method: Method = "lora",
    template: str = "flan_dialogue_summary",
    fields: FieldMap = FieldMap(),  # noqa: B008 (frozen)
    limit: int | None = 300,
    max_length: int = 512,
    packing: bool = False,
    skip_bad_rows: bool = False,
    pii: PiiMode = "off",
    pii_types: list[str] | None = None,
    pii_allow: list[str] | None = None,
    harmful: HarmfulMode = "off",
    harmful_method: str = "blocklist",
    harmful_threshold: float = 0.5,
    lora: LoraSettings = LoraSettings(),  # noqa: B008 (each method's settings are typed flags: --lora.rank 16)
    qlora: QLoraSettings = QLoraSettings(),  # noqa: B008
    prompt: PromptTuningSettings = PromptTuningSettings(),  # noqa: B008
    prefix: PrefixTuningSettings = PrefixTuningSettings(),  # noqa: B008
    ia3: IA3Settings = IA3Settings(),  # noqa: B008
    adapter: AdapterSettings = AdapterSettings(),  # noqa: B008
    selective: SelectiveSettings = SelectiveSettings(),  # noqa: B008
    train: TrainSettings = FINETUNE_DEFAULTS,
    output: str = "runs/finetune",
    merge: bool = False,
    rouge_rows: int = 20,
) -> dict[str, Any]:
    """Fine-tune a model on instruction data with full, selective or parameter-efficient training.

    Example: llmkit finetune                              (SmolLM2-135M-Instruct, LoRA, 300 DialogSum dialogues, ROUGE)
             llmkit finetune --model my_model/ --data "[my.jsonl]" --template alpaca --method lora
             llmkit finetune --method lora --lora.rank 16 --lora.alpha 32 --lora.dora true
             llmkit finetune --method qlora --qlora.rank 16 --qlora.alpha 32 --train.max_steps 200
             llmkit finetune --method prefix --prefix.n_virtual_tokens 20
             llmkit finetune --method selective --selective.mode last_blocks --selective.n_blocks 2
             llmkit finetune --data "[chats.jsonl]" --template chat --pii redact --harmful drop
             llmkit chat --model SmolLM2.gguf --adapter runs/finetune/adapter

    Data rows are Alpaca style (instruction/input/output), prompt/completion, or chat `messages`; rename
    columns with --fields.X. The loss counts only completion tokens. Methods: lora (also DoRA / rsLoRA via
    --lora.dora, --lora.rslora), qlora (NF4 base + LoRA), prompt (soft prompt), prefix (per-layer key/value
    prefix), ia3, adapter (Houlsby bottleneck), selective (bitfit, last_blocks, modules, full). Each method's
    settings are the flags --METHOD.X; only the chosen method's are used, and another method's given with it is an
    error. The device and precision are loop settings: --train.device, --train.precision. Writes OUTPUT/adapter/
    (only the trained tensors), OUTPUT/merged/ with --merge (LoRA/IA3), checkpoints, metrics and loss.png.
    With the built-in data it also reports ROUGE on held-out DialogSum test dialogues before and after.

    Args:
        model: .gguf file, Hugging Face directory or llmkit directory (default: SmolLM2-135M-Instruct).
        data: JSONL/JSON/CSV/Parquet files (default: the first LIMIT dialogues of DialogSum's training split).
        method: the fine-tuning method.
        template: flan_dialogue_summary (several phrasings), alpaca, or chat (the model's own chat template).
        fields: column names of your data.
        limit: use at most this many rows.
        max_length: longest example in tokens (longer prompts are cut from the left; the count is reported).
        packing: pack several examples per row (with attention boundaries) instead of padding.
        skip_bad_rows: skip malformed rows (counted) instead of stopping at the first.
        pii: personal data and secrets in the rows (see llmkit filter): redact, drop the row, report, or off.
        pii_types: which PII detectors run (default all: email, phone, ip, credit_card, iban, secret).
        pii_allow: PII findings kept as they are (compared case-insensitively).
        harmful: drop or report harmful rows (see llmkit filter), or off.
        harmful_method: blocklist (C4's rule), classifier (trained on HH-RLHF) or both.
        harmful_threshold: the classifier flags a row when p(harmful) >= this.
        lora: --method lora: rank, alpha, dropout, targets, rslora, dora, init.
        qlora: --method qlora: LoRA's settings plus the NF4 base's (double_quant, compute_dtype, block_size).
        prompt: --method prompt: soft prompt length and initialisation.
        prefix: --method prefix: prefix length and reparameterisation.
        ia3: --method ia3: the scaled linears.
        adapter: --method adapter: bottleneck width and activation.
        selective: --method selective: which parameters train (mode, n_blocks, patterns).
        train: the training loop's settings.
        output: run directory.
        merge: also save the model with the adapter merged into its weights (lora, ia3).
        rouge_rows: built-in data only: DialogSum test dialogues scored with ROUGE before and after (0: skip).
    """
    from llmkit.data.safety import load_safety_rules

    safety = load_safety_rules(None, pii=pii, pii_types=pii_types, pii_allow=pii_allow, harmful=harmful,
                               harmful_method=harmful_method, harmful_threshold=harmful_threshold)  # before heavy work
    import torch

    from llmkit.checkpoints import default_model_path, load_model, load_tokenizer, save_model
    from llmkit.data.packing import sft_batches, sft_validation_batches
    from llmkit.data.sft import SFTReport, builtin_dialogsum, filter_records, load_sft_records, tokenize_records
    from llmkit.device import resolve_device
    from llmkit.peft.core import save_adapter, trainable_table
    from llmkit.peft.registry import apply_method
    from llmkit.train.distributed import init_cluster, shut_down
    from llmkit.train.loop import train as train_loop
    from llmkit.train.objectives import causal_lm_objective

    method_settings = chosen_settings(method, dict(lora=lora, qlora=qlora, prompt=prompt, prefix=prefix, ia3=ia3,
                                                   adapter=adapter, selective=selective))
    if limit is not None and limit < 1:
        raise LlmkitError(f"--limit {limit} must be at least 1 (the most rows to use); pass --limit null for every row")
    if rouge_rows < 0:
        raise LlmkitError(f"--rouge_rows {rouge_rows} must be 0 (no ROUGE) or more")
    check_settings(train)  # one readable line before any data or model work
    cluster = init_cluster(resolve_device(train.device), train.distributed)
    try:
        path = Path(model) if model else default_model_path()
        tokenizer = load_tokenizer(path)
        network = load_model(path, arch="decoder")
        virtual_tokens = getattr(method_settings, "n_virtual_tokens", 0)  # prompt / prefix tuning take context too
        if max_length + virtual_tokens > network.config.max_seq_len:
            raise LlmkitError(f"--max_length {max_length} plus {virtual_tokens} virtual tokens exceeds "
                              f"{network.config.name}'s context window of {network.config.max_seq_len}; pass a smaller "
                              "--max_length")
        if data:
            records, report = load_sft_records(as_paths(data), fields, skip_bad_rows=skip_bad_rows, limit=limit)
            held_out = []
        else:
            records = builtin_dialogsum("train", limit)
            report = SFTReport(rows=len(records))
            held_out = builtin_dialogsum("test", rouge_rows) if rouge_rows else []
        if safety.active:
            records, safety_report = filter_records(records, safety)
            if cluster.is_main:
                print(f"safety rules: kept {len(records):,} of {safety_report.total_documents:,} rows\n"
                      + safety_report.to_markdown())
        n_validation = max(1, len(records) // 20)
        examples, token_report = tokenize_records(records, tokenizer, template, max_length, seed=train.seed,
                                                  skip_bad_rows=skip_bad_rows, report=report)
        if len(examples) < 2:
            raise LlmkitError(f"only {len(examples)} usable examples; fine-tuning needs at least 2 (check --data and "
                              "--limit)")
        validation, examples = examples[:n_validation], examples[n_validation:]
        if cluster.is_main:
            print(token_report.summary())

        torch.manual_seed(train.seed)
        network = apply_method(network, method, method_settings, tokenizer)
        if cluster.is_main:
            print(f"{method}: trainable parameters\n{trainable_table(network)}")
        before = rouge_on(network, tokenizer, held_out, template) if held_out and cluster.is_main else None

        pad_id = tokenizer.pad_id if tokenizer.pad_id is not None else 0
        # Padded batches are as long as their longest example; a fixed width only where shapes must be static (compile).
        width = max_length if packing or train.compile else None
        batches = sft_batches(examples, train.batch_size, seed=train.seed, packing=packing, max_length=width, pad_id=pad_id)
        evals = sft_validation_batches(validation, train.batch_size, packing=packing, max_length=width, pad_id=pad_id)
        result = train_loop(network, causal_lm_objective(train.loss_chunk), batches, train, output, eval_batches=evals,
                            cluster=cluster)

        summary: dict[str, Any] = {"method": method, "steps": result.steps, "train_loss": result.train_loss,
                                   "val_loss": result.val_loss, "rouge_before": before}
        if cluster.is_main:
            adapter_dir = save_adapter(network, Path(output) / ADAPTER_DIR, method, method_settings)
            summary["adapter"] = str(adapter_dir)
            if merge:
                summary["merged"] = str(save_merged(network, method, Path(output) / MERGED_DIR, tokenizer, save_model))
            if held_out:
                summary["rouge_after"] = rouge_on(network, tokenizer, held_out, template)
                print(f"ROUGE-L on {len(held_out)} held-out dialogues: {before['rougeL']:.4f} before, "
                      f"{summary['rouge_after']['rougeL']:.4f} after")
            print(f"adapter: {adapter_dir}  (llmkit chat --model {path} --adapter {adapter_dir})")
        return summary
    finally:
        shut_down(cluster)  # destroys the process group of a torchrun run


def chosen_settings(method: str, given: dict[str, Any]) -> Any:
    """The settings of `method` from the per-method flags; raises when another method's flags were changed from
    their defaults (`--method ia3 --lora.rank 4` would otherwise train IA3 and silently drop the rank)."""
    import dataclasses

    if method not in SETTINGS:
        raise LlmkitError(f"--method {method} is unknown; choose one of {', '.join(SETTINGS)}")
    for name, settings in given.items():
        if name == method or settings is None:
            continue
        default = SETTINGS[name]()
        changed = [field.name for field in dataclasses.fields(default)
                   if getattr(settings, field.name) != getattr(default, field.name)]
        if changed:
            flags = ", ".join(f"--{name}.{field}" for field in changed)
            raise LlmkitError(f"{flags}: settings of method {name}, but --method is {method}; pass --method {name}, or "
                              f"drop {flags}")
    settings = given.get(method)
    return settings if settings is not None else SETTINGS[method]()


def rouge_on(model: Any, tokenizer: Any, records: list, template: str) -> dict[str, float]:
    """ROUGE-1/2/L of greedy completions of the records' prompts against their outputs."""
    from llmkit.data.templates import render_prompt
    from llmkit.eval.metrics import rouge
    from llmkit.generate import generate

    was_training = model.training
    model.eval()
    prompts = [render_prompt(record, template, row=index, tokenizer=tokenizer) for index, record in enumerate(records)]
    predictions = []
    for start in range(0, len(prompts), 8):
        predictions += generate(model, tokenizer, prompts[start:start + 8], max_new_tokens=60)
    model.train(was_training)
    return rouge([text.strip() for text in predictions], [record.output for record in records])


def save_merged(model: Any, method: str, directory: Path, tokenizer: Any, save_model: Any) -> Path:
    """Fold the adapter into the base weights and save a plain llmkit model."""
    if method == "lora":
        from llmkit.peft.lora import merge_and_unload

        merged = merge_and_unload(model)
    elif method == "ia3":
        from llmkit.peft.ia3 import merge_ia3

        merged = merge_ia3(model)
    else:
        raise LlmkitError(f"--merge works for lora and ia3; a {method} adapter cannot be folded into the weights")
    save_model(merged, directory, tokenizer=tokenizer)
    return directory
