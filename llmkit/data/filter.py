"""`llmkit filter`: drop low-quality, duplicate and near-duplicate documents, and report what each rule removed."""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any

from llmkit.data.dedup import ExactDeduplicator, MinHashDeduplicator
from llmkit.data.jsonl import JSONL_SUFFIXES
from llmkit.data.pii import PiiSpan
from llmkit.data.quality import QualityRules, check_document
from llmkit.data.safety import SafetyFilter, SafetyRules
from llmkit.errors import LlmkitError

EXACT_DUPLICATE = "exact_duplicate"
NEAR_DUPLICATE = "near_duplicate"
REPORT_SUFFIX = ".report.json"
OUTPUT_SUFFIXES = JSONL_SUFFIXES  # filtered documents are written as JSONL


@dataclass
class FilterReport:
    """Documents and words (or tokens) seen, kept, and dropped per reason.

    `dropped_*` counts a document under its first failed check only (so kept + dropped = total); `failed_documents`
    counts every quality rule a document fails, i.e. what each rule would remove on its own (with a safety rule in
    "report" mode: the documents it flags). Duplicate checks run only on documents that pass the quality rules.
    `redacted_*` count, per PII type, the kept documents changed by redaction, the words/tokens of the text
    replaced, and the spans replaced. `pii_findings` lists (document index, spans) when PII is only reported.
    """

    reasons: list[str]
    unit: str = "words"
    total_documents: int = 0
    total_units: int = 0
    kept_documents: int = 0
    kept_units: int = 0
    dropped_documents: dict[str, int] = field(default_factory=dict)
    dropped_units: dict[str, int] = field(default_factory=dict)
    failed_documents: dict[str, int] = field(default_factory=dict)
    redacted_documents: dict[str, int] = field(default_factory=dict)
    redacted_units: dict[str, int] = field(default_factory=dict)
    redacted_spans: dict[str, int] = field(default_factory=dict)
    pii_findings: list[tuple[int, list[PiiSpan]]] = field(default_factory=list)  # "report" mode: (document, spans)

    def record_redaction(self, kind_units: list[tuple[str, int]]) -> None:
        """Count one kept document redacted with spans of (report row, words/tokens replaced)."""
        for reason in dict.fromkeys(reason for reason, _ in kind_units):
            self.redacted_documents[reason] = self.redacted_documents.get(reason, 0) + 1
        for reason, units in kind_units:
            self.redacted_units[reason] = self.redacted_units.get(reason, 0) + units
            self.redacted_spans[reason] = self.redacted_spans.get(reason, 0) + 1

    def record(self, units: int, failed: list[str], reason: str | None) -> None:
        """Count one document of `units` words/tokens that failed `failed` and was dropped for `reason` (None: kept)."""
        self.total_documents += 1
        self.total_units += units
        for name in failed:
            self.failed_documents[name] = self.failed_documents.get(name, 0) + 1
        if reason is None:
            self.kept_documents += 1
            self.kept_units += units
        else:
            self.dropped_documents[reason] = self.dropped_documents.get(reason, 0) + 1
            self.dropped_units[reason] = self.dropped_units.get(reason, 0) + units

    def to_dict(self) -> dict[str, Any]:
        return {
            "unit": self.unit,
            "total": {"documents": self.total_documents, self.unit: self.total_units},
            "kept": {"documents": self.kept_documents, self.unit: self.kept_units},
            "reasons": {
                reason: {
                    "dropped_documents": self.dropped_documents.get(reason, 0),
                    f"dropped_{self.unit}": self.dropped_units.get(reason, 0),
                    "failed_documents": self.failed_documents.get(reason, 0),
                    **({"redacted_documents": self.redacted_documents.get(reason, 0),
                        f"redacted_{self.unit}": self.redacted_units.get(reason, 0),
                        "redacted_spans": self.redacted_spans.get(reason, 0)} if reason.startswith("pii_") else {}),
                }
                for reason in self.reasons
            },
        }

    def to_markdown(self) -> str:
        """A table: one row per check, then kept and total; percentages are of all documents / units seen."""

        def percent(part: int, whole: int) -> str:
            return f"{100 * part / whole:.1f}%" if whole else "-"

        documents, units = self.total_documents, self.total_units
        redacting = bool(self.redacted_documents)
        extra = f" redacted documents | redacted {self.unit} |" if redacting else ""
        lines = [
            f"| reason | dropped documents | % | dropped {self.unit} | % | failed (rule alone) |" + extra,
            "| --- | ---: | ---: | ---: | ---: | ---: |" + " ---: | ---: |" * redacting,
        ]
        for reason in self.reasons:
            dropped, dropped_units = self.dropped_documents.get(reason, 0), self.dropped_units.get(reason, 0)
            failed = self.failed_documents.get(reason, 0)
            redacted = (f" {self.redacted_documents.get(reason, 0):,} | {self.redacted_units.get(reason, 0):,} |"
                        if redacting else "")
            lines.append(f"| {reason} | {dropped:,} | {percent(dropped, documents)} | {dropped_units:,} | "
                         f"{percent(dropped_units, units)} | {failed:,} |" + redacted)
        lines.append(f"| **kept** | {self.kept_documents:,} | {percent(self.kept_documents, documents)} | "
                     f"{self.kept_units:,} | {percent(self.kept_units, units)} | |" + " |" * (2 * redacting))
        lines.append(f"| **total** | {documents:,} | | {units:,} | | |" + " |" * (2 * redacting))
        return "\n".join(lines)


class DocumentFilter:
    """Decides keep or drop for each document in turn: quality rules, then the safety rules (harmful content, PII:
    llmkit/data/safety.py), then exact, then near duplicates of the documents kept so far (compared after redaction).
    Its `report` counts every decision."""

    def __init__(
        self,
        rules: QualityRules | None,
        exact_dedup: bool = True,
        near_dedup: bool = True,
        near_dedup_threshold: float = 0.8,
        count_tokens: Callable[[str], int] | None = None,
        safety: SafetyRules | None = None,
    ) -> None:
        if near_dedup and not 0 < near_dedup_threshold <= 1:
            raise LlmkitError(f"near_dedup_threshold must be in (0, 1], not {near_dedup_threshold}: e.g. 0.8")
        self.rules = rules
        self.exact = ExactDeduplicator() if exact_dedup else None
        self.near = MinHashDeduplicator(threshold=near_dedup_threshold) if near_dedup else None
        self.count_units = count_tokens or (lambda text: len(text.split()))
        self.safety = SafetyFilter(safety) if safety is not None and safety.active else None
        reasons = rules.enabled_rule_names() if rules is not None else []
        reasons += self.safety.rules.rule_names() if self.safety is not None else []
        reasons += [EXACT_DUPLICATE] * exact_dedup + [NEAR_DUPLICATE] * near_dedup
        self.report = FilterReport(reasons=reasons, unit="tokens" if count_tokens else "words")

    def check(self, text: str) -> str | None:
        """The reason to drop `text` (a rule name, 'exact_duplicate' or 'near_duplicate'), or None to keep it."""
        return self.process(text)[0]

    def process(self, text: str) -> tuple[str | None, str]:
        """(the reason to drop `text` or None, the text to keep: redacted when PII is redacted)."""
        original = text
        failed = check_document(text, self.rules) if self.rules is not None else []
        reason = failed[0] if failed else None
        redactions: list[tuple[str, int]] = []
        if self.safety is not None:
            result = self.safety.apply(text)
            failed += result.failed
            reason = reason or result.dropped_by
            if result.spans and self.safety.rules.pii == "report":
                self.report.pii_findings.append((self.report.total_documents, result.spans))
            if reason is None and result.text is not None and result.text != text:
                redactions = [(f"pii_{span.kind}", self.count_units(text[span.start:span.end])) for span in result.spans]
                text = result.text
        if reason is None and self.exact is not None and self.exact.is_duplicate(text):
            reason = EXACT_DUPLICATE
        if reason is None and self.near is not None:
            if self.near.add_or_find(text, key=self.report.total_documents) is not None:
                reason = NEAR_DUPLICATE
        duplicate = [reason] if reason in (EXACT_DUPLICATE, NEAR_DUPLICATE) else []
        self.report.record(self.count_units(original), failed + duplicate, reason)
        if reason is None and redactions:
            self.report.record_redaction(redactions)
        return reason, text


def filter_documents(
    documents: Iterable[str],
    rules: QualityRules | None,
    exact_dedup: bool = True,
    near_dedup: bool = True,
    near_dedup_threshold: float = 0.8,
    count_tokens: Callable[[str], int] | None = None,
    safety: SafetyRules | None = None,
) -> tuple[Iterator[str], FilterReport]:
    """(the kept documents, redacted where PII is redacted, streamed; their report). The report fills as the
    iterator is consumed.

    `rules=None` skips the quality rules; `count_tokens` makes the report count tokens instead of words.
    """
    document_filter = DocumentFilter(rules, exact_dedup, near_dedup, near_dedup_threshold, count_tokens, safety)

    def kept() -> Iterator[str]:
        for text in documents:
            reason, kept_text = document_filter.process(text)
            if reason is None:
                yield kept_text

    return kept(), document_filter.report


