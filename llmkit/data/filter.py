"""`llmkit filter`: drop low-quality, duplicate and near-duplicate documents, and report what each rule removed."""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any

from llmkit.data.dedup import ExactDeduplicator, MinHashDeduplicator
from llmkit.data.jsonl import JSONL_SUFFIXES
from llmkit.data.quality import QualityRules, check_document
from llmkit.errors import LlmkitError

EXACT_DUPLICATE = "exact_duplicate"
NEAR_DUPLICATE = "near_duplicate"
REPORT_SUFFIX = ".report.json"
OUTPUT_SUFFIXES = JSONL_SUFFIXES  # filtered documents are written as JSONL


@dataclass
class FilterReport:
    """Documents and words (or tokens) seen, kept, and dropped per reason.

    `dropped_*` counts a document under its first failed check only (so kept + dropped = total); `failed_documents`
    counts every quality rule a document fails, i.e. what each rule would remove on its own. Duplicate checks run
    only on documents that pass the quality rules.
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
                }
                for reason in self.reasons
            },
        }

    def to_markdown(self) -> str:
        """A table: one row per check, then kept and total; percentages are of all documents / units seen."""

        def percent(part: int, whole: int) -> str:
            return f"{100 * part / whole:.1f}%" if whole else "-"

        documents, units = self.total_documents, self.total_units
        lines = [
            f"| reason | dropped documents | % | dropped {self.unit} | % | failed (rule alone) |",
            "| --- | ---: | ---: | ---: | ---: | ---: |",
        ]
        for reason in self.reasons:
            dropped, dropped_units = self.dropped_documents.get(reason, 0), self.dropped_units.get(reason, 0)
            failed = self.failed_documents.get(reason, 0)
            lines.append(f"| {reason} | {dropped:,} | {percent(dropped, documents)} | {dropped_units:,} | "
                         f"{percent(dropped_units, units)} | {failed:,} |")
        lines.append(f"| **kept** | {self.kept_documents:,} | {percent(self.kept_documents, documents)} | "
                     f"{self.kept_units:,} | {percent(self.kept_units, units)} | |")
        lines.append(f"| **total** | {documents:,} | | {units:,} | | |")
        return "\n".join(lines)


class DocumentFilter:
    """Decides keep or drop for each document in turn: quality rules, then exact, then near duplicates of the
    documents kept so far. Its `report` counts every decision."""

    def __init__(
        self,
        rules: QualityRules | None,
        exact_dedup: bool = True,
        near_dedup: bool = True,
        near_dedup_threshold: float = 0.8,
        count_tokens: Callable[[str], int] | None = None,
    ) -> None:
        if near_dedup and not 0 < near_dedup_threshold <= 1:
            raise LlmkitError(f"near_dedup_threshold must be in (0, 1], not {near_dedup_threshold}: e.g. 0.8")
        self.rules = rules
        self.exact = ExactDeduplicator() if exact_dedup else None
        self.near = MinHashDeduplicator(threshold=near_dedup_threshold) if near_dedup else None
        self.count_units = count_tokens or (lambda text: len(text.split()))
        reasons = rules.enabled_rule_names() if rules is not None else []
        reasons += [EXACT_DUPLICATE] * exact_dedup + [NEAR_DUPLICATE] * near_dedup
        self.report = FilterReport(reasons=reasons, unit="tokens" if count_tokens else "words")

    def check(self, text: str) -> str | None:
        """The reason to drop `text` (a rule name, 'exact_duplicate' or 'near_duplicate'), or None to keep it."""
        failed = check_document(text, self.rules) if self.rules is not None else []
        reason = failed[0] if failed else None
        if reason is None and self.exact is not None and self.exact.is_duplicate(text):
            reason = EXACT_DUPLICATE
        if reason is None and self.near is not None:
            if self.near.add_or_find(text, key=self.report.total_documents) is not None:
                reason = NEAR_DUPLICATE
        duplicate = [reason] if reason in (EXACT_DUPLICATE, NEAR_DUPLICATE) else []
        self.report.record(self.count_units(text), failed + duplicate, reason)
        return reason


def filter_documents(
    documents: Iterable[str],
    rules: QualityRules | None,
    exact_dedup: bool = True,
    near_dedup: bool = True,
    near_dedup_threshold: float = 0.8,
    count_tokens: Callable[[str], int] | None = None,
) -> tuple[Iterator[str], FilterReport]:
    """(the kept documents, streamed; their report). The report fills as the iterator is consumed.

    `rules=None` skips the quality rules; `count_tokens` makes the report count tokens instead of words.
    """
    document_filter = DocumentFilter(rules, exact_dedup, near_dedup, near_dedup_threshold, count_tokens)

    def kept() -> Iterator[str]:
        for text in documents:
            if document_filter.check(text) is None:
                yield text

    return kept(), document_filter.report


