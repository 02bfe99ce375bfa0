"""`llmkit filter`: quality rules and deduplication over pretraining documents (the rules are in llmkit/data/)."""

from __future__ import annotations

import gzip
import json
from pathlib import Path

from llmkit.commands.common import as_paths, refuse_existing_file, refuse_writing_onto_inputs
from llmkit.data.filter import OUTPUT_SUFFIXES, REPORT_SUFFIX, FilterReport, filter_documents
from llmkit.data.quality import load_quality_rules
from llmkit.errors import LlmkitError
from llmkit.io import atomic_write, atomic_write_text


def report_path(output: str | Path) -> Path:
    """OUTPUT.report.json beside the output: filtered.jsonl -> filtered.report.json."""
    output = Path(output)
    name = output.name
    for suffix in sorted(OUTPUT_SUFFIXES, key=len, reverse=True):
        if name.endswith(suffix):
            name = name[: -len(suffix)]
            break
    return output.with_name(name + REPORT_SUFFIX)


def filter_data(
    data: list[str] | str,
    output: str = "filtered.jsonl",
    text_field: str = "text",
    rules: str | None = None,
    disable: list[str] | None = None,
    exact_dedup: bool = True,
    near_dedup: bool = True,
    near_dedup_threshold: float = 0.8,
    tokenizer: str | None = None,
    document_separator: str | None = None,
    overwrite: bool = False,
) -> FilterReport:
    """Filter pretraining documents: drop low-quality ones (Gopher/C4 rules), exact and near duplicates.

    Example: llmkit filter --data "[web.jsonl.gz, books/]" --output clean.jsonl
             llmkit filter --data crawl.parquet --text_field content --disable "[stop_words, bullet_lines]"
             llmkit filter --data raw/ --rules my_rules.yaml --near_dedup_threshold 0.7 --tokenizer model.gguf

    Each document is checked by the quality rules first, then against the kept documents for an exact duplicate
    (same text ignoring case and whitespace), then for a near duplicate (MinHash LSH over word 5-grams, estimated
    Jaccard >= threshold). Writes the kept documents as JSONL ({TEXT_FIELD: text} per line) to OUTPUT and the report
    to OUTPUT.report.json (filtered.jsonl -> filtered.report.json), and prints the report as a Markdown table.
    OUTPUT is never one of the inputs, and an existing OUTPUT is replaced only with --overwrite.

    Args:
        data: .txt/.md, .jsonl(.gz) or .parquet files, or folders of them.
        output: the .jsonl (or .jsonl.gz) file for the kept documents.
        text_field: JSONL field / Parquet column holding the text; also the field written to OUTPUT.
        rules: YAML or JSON file setting QualityRules fields, e.g. `min_words: 20` or
            `max_top_ngram_char_fraction: {2: 0.25}`; unset fields keep Gopher's thresholds.
        disable: rule names to skip (e.g. stop_words, dup_lines, top_2gram; an unknown name lists them all).
        exact_dedup: drop documents equal to a kept one, ignoring case and whitespace.
        near_dedup: drop documents whose word 5-grams nearly match a kept one's (MinHash LSH).
        near_dedup_threshold: estimated Jaccard similarity at or above which a document is a near duplicate.
        tokenizer: model path whose tokenizer counts tokens in the report (default: count words).
        document_separator: split .txt/.md files into documents at this string (default: one file, one document).
        overwrite: replace an existing OUTPUT (and its report).
    """
    from tqdm import tqdm

    from llmkit.data.sources import read_documents

    output_path, inputs = Path(output), as_paths(data)
    if not output_path.name.endswith(OUTPUT_SUFFIXES):
        raise LlmkitError(f"--output {output} must end in {' or '.join(OUTPUT_SUFFIXES)}: filtered documents are JSONL")
    for path in (output_path, report_path(output_path)):
        refuse_writing_onto_inputs(path, inputs)
        refuse_existing_file(path, overwrite)
    quality_rules = load_quality_rules(rules, disable)
    count_tokens = None
    if tokenizer is not None:
        from llmkit.checkpoints import load_tokenizer

        loaded = load_tokenizer(tokenizer)
        count_tokens = lambda text: len(loaded.encode(text, add_bos=False))
    documents = tqdm(read_documents(inputs, text_field=text_field, document_separator=document_separator),
                     desc="filtering", unit="doc", disable=None)
    kept, report = filter_documents(documents, quality_rules, exact_dedup, near_dedup, near_dedup_threshold, count_tokens)

    def write(path: Path) -> None:
        opener = gzip.open if output_path.name.endswith(".gz") else open
        with opener(path, "wt", encoding="utf-8") as file:
            for text in kept:
                file.write(json.dumps({text_field: text}, ensure_ascii=False) + "\n")

    atomic_write(output_path, write)
    report_file = report_path(output_path)
    atomic_write_text(report_file, json.dumps(report.to_dict(), indent=2) + "\n")
    print(report.to_markdown())
    print(f"\nkept {report.kept_documents:,} of {report.total_documents:,} documents: wrote {output_path} and {report_file}")
    return report
