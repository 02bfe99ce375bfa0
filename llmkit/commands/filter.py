"""`llmkit filter`: quality rules and deduplication over pretraining documents (the rules are in llmkit/data/)."""

from __future__ import annotations

import gzip
import json
from pathlib import Path

from llmkit.commands.common import as_paths, refuse_existing_file, refuse_writing_onto_inputs
from llmkit.data.filter import OUTPUT_SUFFIXES, REPORT_SUFFIX, FilterReport, filter_documents
from llmkit.data.quality import load_quality_rules
from llmkit.data.safety import SAFETY_FIELDS, HarmfulMode, PiiMode, load_safety_rules
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


def findings_path(output: str | Path) -> Path:
    """OUTPUT.pii.jsonl beside the output (filtered.jsonl -> filtered.pii.jsonl): the PII found with --pii report."""
    path = report_path(output)
    return path.with_name(path.name[: -len(REPORT_SUFFIX)] + ".pii.jsonl")


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
    pii: PiiMode | None = None,
    pii_types: list[str] | None = None,
    pii_allow: list[str] | None = None,
    harmful: HarmfulMode | None = None,
    harmful_method: str | None = None,
    harmful_threshold: float | None = None,
    overwrite: bool = False,
) -> FilterReport:
    """Filter pretraining documents: drop low-quality ones (Gopher/C4 rules), harmful ones, exact and near
    duplicates; redact personal data and secrets.

    Example: llmkit filter --data "[web.jsonl.gz, books/]" --output clean.jsonl
             llmkit filter --data crawl.parquet --text_field content --disable "[stop_words, bullet_lines]"
             llmkit filter --data raw/ --rules my_rules.yaml --near_dedup_threshold 0.7 --tokenizer model.gguf
             llmkit filter --data web.jsonl --pii redact --pii_allow "[press@example.org]" --harmful drop
             llmkit filter --data chats.jsonl --harmful report --harmful_method both --harmful_threshold 0.8

    Each document is checked by the quality rules first, then the safety rules (harmful content, then PII), then
    against the kept documents for an exact duplicate (same text ignoring case and whitespace), then for a near
    duplicate (MinHash LSH over word 5-grams, estimated Jaccard >= threshold). Writes the kept documents as JSONL
    ({TEXT_FIELD: text} per line) to OUTPUT and the report to OUTPUT.report.json (filtered.jsonl ->
    filtered.report.json), and prints the report as a Markdown table; with --pii report, the findings (document
    index, start, end, type; never the text) go to OUTPUT.pii.jsonl. OUTPUT is never one of the inputs, and an
    existing OUTPUT is replaced only with --overwrite.

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
        pii: personal data and secrets (e-mail, phone, IP, Luhn-checked card, checksummed IBAN, API keys):
            redact (typed placeholders such as <EMAIL>), drop the document, report them, or off (the default).
        pii_types: which PII detectors run (default all: email, phone, ip, credit_card, iban, secret).
        pii_allow: findings kept as they are, compared case-insensitively (e.g. a project's public address).
        harmful: drop or report harmful documents, or off (the default).
        harmful_method: blocklist (C4's rule: any word of the LDNOOBW list), classifier (a fastText-style model
            trained on HH-RLHF's harmless-base; needs ../shared/data), or both (either one flags).
        harmful_threshold: the classifier flags a document when p(harmful) >= this (default 0.5).
        overwrite: replace an existing OUTPUT (and its report).

    A --rules file may set the same safety keys (pii, pii_types, pii_allow, harmful, harmful_method,
    harmful_threshold) beside the quality thresholds; flags override the file.
    """
    from tqdm import tqdm

    from llmkit.data.sources import read_documents

    output_path, inputs = Path(output), as_paths(data)
    if not output_path.name.endswith(OUTPUT_SUFFIXES):
        raise LlmkitError(f"--output {output} must end in {' or '.join(OUTPUT_SUFFIXES)}: filtered documents are JSONL")
    safety = load_safety_rules(rules, pii=pii, pii_types=pii_types, pii_allow=pii_allow, harmful=harmful,
                               harmful_method=harmful_method, harmful_threshold=harmful_threshold)
    findings_file = findings_path(output_path)
    for path in (output_path, report_path(output_path)) + ((findings_file,) if safety.pii == "report" else ()):
        refuse_writing_onto_inputs(path, inputs)
        refuse_existing_file(path, overwrite)
    quality_rules = load_quality_rules(rules, disable, other_keys=SAFETY_FIELDS)
    count_tokens = None
    if tokenizer is not None:
        from llmkit.checkpoints import load_tokenizer

        loaded = load_tokenizer(tokenizer)
        count_tokens = lambda text: len(loaded.encode(text, add_bos=False))
    documents = tqdm(read_documents(inputs, text_field=text_field, document_separator=document_separator),
                     desc="filtering", unit="doc", disable=None)
    kept, report = filter_documents(documents, quality_rules, exact_dedup, near_dedup, near_dedup_threshold, count_tokens,
                                    safety)

    def write(path: Path) -> None:
        opener = gzip.open if output_path.name.endswith(".gz") else open
        with opener(path, "wt", encoding="utf-8") as file:
            for text in kept:
                file.write(json.dumps({text_field: text}, ensure_ascii=False) + "\n")

    atomic_write(output_path, write)
    report_file = report_path(output_path)
    written = {**report.to_dict(), **({"safety": safety.to_dict()} if safety.active else {})}
    atomic_write_text(report_file, json.dumps(written, indent=2) + "\n")
    if safety.pii == "report":
        atomic_write_text(findings_file, "".join(
            json.dumps({"document": index, "spans": [[span.start, span.end, span.kind] for span in spans]}) + "\n"
            for index, spans in report.pii_findings))
    print(report.to_markdown())
    findings = f" and {findings_file}" if safety.pii == "report" else ""
    print(f"\nkept {report.kept_documents:,} of {report.total_documents:,} documents: wrote {output_path}, {report_file}"
          + findings)
    return report
