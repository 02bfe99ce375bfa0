"""`llmkit prepare`: tokenize text into token shards for pretraining, training a tokenizer first when none is given."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from llmkit.commands.common import as_paths, refuse_writing_onto_inputs
from llmkit.data.prepare import TOKENIZER_DIR, manifest_header, prepare, previous_manifest
from llmkit.data.safety import HarmfulMode, PiiMode, SafetyRules, load_safety_rules
from llmkit.errors import LlmkitError

REPLACE_HINT = "pass --overwrite to replace it, or choose another --output"


def prepare_data(
    data: list[str] | str | None = None,
    output: str = "data",
    tokenizer: str | None = None,
    text_field: str = "text",
    val_fraction: float = 0.1,
    vocab_size: int = 8192,
    min_frequency: int = 2,
    shard_tokens: int = 100_000_000,
    document_separator: str | None = None,
    seed: int = 0,
    progress: bool = True,
    special_tokens: list[str] | None = None,
    pii: PiiMode = "off",
    pii_types: list[str] | None = None,
    pii_allow: list[str] | None = None,
    harmful: HarmfulMode = "off",
    harmful_method: str = "blocklist",
    harmful_threshold: float = 0.5,
    overwrite: bool = False,
) -> None:
    """Tokenize text into token shards for pretraining (training a tokenizer first unless you give one).

    Example: llmkit prepare                                  (built-in Tiny Shakespeare, new 8,192-token BPE)
             llmkit prepare --data "[books/, web.jsonl.gz]" --output data --vocab_size 32000
             llmkit prepare --data corpus.parquet --tokenizer SmolLM2-135M-Instruct.Q4_1.gguf
             llmkit prepare --data web.jsonl.gz --pii redact --harmful drop     (safety rules, as in llmkit filter)

    Writes OUTPUT/train-00000.bin ... (raw uint16 ids, uint32 above 65,536 tokens), val-*.bin and manifest.json;
    without --tokenizer also OUTPUT/tokenizer/. Each document ends with EOS. With 20 or more documents each one
    goes wholly to train or validation; with fewer (one book), validation is the last VAL_FRACTION of the tokens.
    Running it again with the same data, tokenizer and settings does nothing; data prepared from other inputs,
    tokenizer or settings is replaced only with --overwrite.

    Args:
        data: .txt/.md, .jsonl/.jsonl.gz, .parquet files or folders (default: the built-in Tiny Shakespeare).
        output: folder for the shards and manifest.json.
        tokenizer: .gguf file, Hugging Face / llmkit model directory or tokenizer directory (default: train one).
        text_field: JSONL field / Parquet column that holds the text.
        val_fraction: share of the data kept for validation (0 for none).
        vocab_size: size of the tokenizer to train when --tokenizer is not given.
        min_frequency: BPE training: a pair seen fewer times than this is never merged.
        shard_tokens: most tokens per shard file.
        document_separator: split .txt/.md files into documents at this string (bash: $'\\n\\n\\n').
        seed: seed of the document-level train/validation split.
        progress: show progress bars.
        special_tokens: special tokens of the tokenizer trained when --tokenizer is not given; the first is EOS
            (default: <|endoftext|>; masked-LM pretraining adds [MASK]).
        pii: personal data and secrets (see llmkit filter): redact, drop the document, report, or off.
        pii_types: which PII detectors run (default all: email, phone, ip, credit_card, iban, secret).
        pii_allow: PII findings kept as they are (compared case-insensitively).
        harmful: drop or report harmful documents (see llmkit filter), or off.
        harmful_method: blocklist (C4's rule), classifier (trained on HH-RLHF) or both.
        harmful_threshold: the classifier flags a document when p(harmful) >= this.
        overwrite: replace data in OUTPUT that was prepared from other inputs, tokenizer or settings.

    The safety rules run on each document before it is tokenized, and manifest.json's "safety_report" counts what
    they dropped and redacted; a tokenizer trained here still learns from the unfiltered text.
    """
    safety = load_safety_rules(None, pii=pii, pii_types=pii_types, pii_allow=pii_allow, harmful=harmful,
                               harmful_method=harmful_method, harmful_threshold=harmful_threshold)
    prepare_corpus(as_paths(data), output, tokenizer, text_field=text_field, val_fraction=val_fraction,
                   vocab_size=vocab_size, min_frequency=min_frequency, shard_tokens=shard_tokens,
                   document_separator=document_separator, seed=seed, progress=progress, special_tokens=special_tokens,
                   overwrite=overwrite, replace_hint=REPLACE_HINT, safety=safety)


def prepare_corpus(
    paths: list[str],
    output: str | Path,
    tokenizer: str | None = None,
    text_field: str = "text",
    val_fraction: float = 0.1,
    vocab_size: int = 8192,
    min_frequency: int = 2,
    shard_tokens: int = 100_000_000,
    document_separator: str | None = None,
    seed: int = 0,
    progress: bool = True,
    special_tokens: list[str] | None = None,
    overwrite: bool = False,
    replace_hint: str = REPLACE_HINT,
    safety: SafetyRules | None = None,
) -> dict[str, Any]:
    """`llmkit prepare` for callers (pretrain too): returns the manifest. Data already in OUTPUT that was prepared
    from other inputs, tokenizer or settings raises (naming `replace_hint`, the fix in the caller's flags) unless
    `overwrite`; the check runs before a tokenizer is trained into OUTPUT/tokenizer, so nothing is replaced."""
    from llmkit.checkpoints import load_tokenizer
    from llmkit.data.sources import builtin_corpus_path, fingerprint_inputs
    from llmkit.data.tokenizer_train import (
        DEFAULT_SPECIAL_TOKENS,
        check_vocab_size,
        reusable_tokenizer,
        save_trained,
        train_tokenizer,
        training_record,
    )

    special = tuple(special_tokens) if special_tokens else DEFAULT_SPECIAL_TOKENS
    if tokenizer is None:
        check_vocab_size(vocab_size, len(special))  # before any file is read
    paths = list(paths) or [str(builtin_corpus_path())]
    refuse_writing_onto_inputs(output, paths)
    previous = None if overwrite else previous_manifest(Path(output))
    if previous is not None and previous.get("inputs") != fingerprint_inputs(paths):
        _refuse_replacing(output, ["inputs"], replace_hint)
    if tokenizer is None:
        tokenizer_path = str(Path(output) / TOKENIZER_DIR)
        record = training_record(paths, vocab_size, text_field, min_frequency, special)
        loaded = reusable_tokenizer(tokenizer_path, record)
        if loaded is None:
            if previous is not None:
                _refuse_replacing(output, ["tokenizer"], replace_hint)  # before retraining over OUTPUT/tokenizer
            loaded = train_tokenizer(paths, vocab_size, text_field, special_tokens=special, min_frequency=min_frequency,
                                     show_progress=progress)
            save_trained(loaded, tokenizer_path, record)
            print(f"trained a {loaded.vocab_size:,}-token byte-level BPE tokenizer -> {tokenizer_path}")
    else:
        tokenizer_path, loaded = tokenizer, load_tokenizer(tokenizer)
    if previous is not None:
        header = manifest_header(paths, output, loaded, tokenizer_path, text_field=text_field, val_fraction=val_fraction,
                                 shard_tokens=shard_tokens, document_separator=document_separator, seed=seed,
                                 safety=safety)
        differing = [key for key in header if previous.get(key) != header[key]]
        if differing:
            _refuse_replacing(output, differing, replace_hint)
    manifest = prepare(paths, output, loaded, tokenizer_path, text_field=text_field, val_fraction=val_fraction,
                       shard_tokens=shard_tokens, document_separator=document_separator, seed=seed, show_progress=progress,
                       safety=safety)
    print(summary(manifest, output))
    return manifest


def _refuse_replacing(output: str | Path, differing: list[str], hint: str) -> None:
    """The one-line refusal to replace prepared data made from something else."""
    names = {"inputs": "inputs", "settings": "settings"}
    what = sorted({names.get(key, "tokenizer") for key in differing})
    raise LlmkitError(f"{output} already holds data prepared from other {' and '.join(what)}; {hint}")


def summary(manifest: dict[str, Any], output: str | Path) -> str:
    """Documents, tokens and shards per split, as `llmkit prepare` prints them."""
    lines = [f"{output}: {manifest['vocab_size']:,}-token vocabulary, {manifest['dtype']} ids, "
             f"split by {'document' if manifest['split_mode'] == 'documents' else 'token-stream tail'}"]
    for name, split in manifest["splits"].items():
        lines.append(f"  {name:5} {split['n_documents']:>12,} documents {split['n_tokens']:>15,} tokens "
                     f"{len(split['files']):>5,} shard(s)")
    return "\n".join(lines)
