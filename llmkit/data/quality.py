"""Heuristic document quality rules for pretraining text, each switchable, with its threshold in `QualityRules`.

Rules and default thresholds follow the MassiveText quality filters of Gopher (Rae et al. 2021, "Scaling Language
Models: Methods, Analysis & Insights from Training Gopher", appendix A): word count 50..100,000, mean word length
3..10, '#' and ellipsis each at most 0.1 per word, at most 30% of lines ending in an ellipsis, at most 90% of lines
starting with a bullet, at least 80% of words with a letter, at least 2 of the stop words (the, be, to, of, and, that,
have, with); repetition: duplicate lines / paragraphs at most 30% of them and 20% of the characters, the most
frequent 2/3/4-gram at most 20/18/16% of the characters, duplicated 5..10-grams at most 15..10% of the characters.
The "lorem ipsum" page rule comes from C4 (Raffel et al. 2020, "Exploring the Limits of Transfer Learning with a
Unified Text-to-Text Transformer", section 2.2).

Words are whitespace-separated pieces; n-gram rules work on lowercased words and count word characters (no
spaces). A duplicate (line, paragraph, n-gram occurrence) is one seen earlier in the document: the first
occurrence is not counted, so a text said twice has duplicate fraction 1/2.
"""

from __future__ import annotations

import json
import re
from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

import numpy as np

from llmkit.errors import LlmkitError

STOP_WORDS = frozenset({"the", "be", "to", "of", "and", "that", "have", "with"})  # Gopher's list
BULLETS = ("•", "‣", "⁃", "◦", "▪", "▫", "●", "○", "■", "□", "➢", "►", "-", "–", "—", "*")
ELLIPSES = ("...", "…")
PUNCTUATION = "!\"#$%&'()*+,-./:;<=>?@[\\]^_`{|}~“”‘’«»…"
LOREM_IPSUM = "lorem ipsum"
RULES_FILE_SUFFIXES = (".json", ".yaml", ".yml")

_HAS_LETTER = re.compile(r"[^\W\d_]").search
_PARAGRAPH_BREAK = re.compile(r"\n\s*\n")
_NGRAM_MULTIPLIER = np.uint64(0x9E3779B97F4A7C15)  # odd 64-bit constant of the rolling n-gram hash


@dataclass
class QualityRules:
    """Thresholds of every rule (defaults: Gopher's); name rules in `disabled` to skip them (see `rule_names`)."""

    # size and words
    min_words: int = 50
    max_words: int = 100_000
    min_mean_word_length: float = 3.0
    max_mean_word_length: float = 10.0
    max_symbol_to_word_ratio: float = 0.1  # '#' per word, and '...'/'…' per word, each
    max_ellipsis_line_fraction: float = 0.3  # lines ending in '...' or '…'
    max_bullet_line_fraction: float = 0.9  # lines starting with a bullet (BULLETS)
    min_alpha_word_fraction: float = 0.8  # words holding at least one letter
    min_stop_words: int = 2  # occurrences of STOP_WORDS
    # repetition
    max_duplicate_line_fraction: float = 0.3
    max_duplicate_line_char_fraction: float = 0.2
    max_duplicate_paragraph_fraction: float = 0.3
    max_duplicate_paragraph_char_fraction: float = 0.2
    max_top_ngram_char_fraction: dict[int, float] = field(default_factory=lambda: {2: 0.20, 3: 0.18, 4: 0.16})
    max_duplicate_ngram_char_fraction: dict[int, float] = field(
        default_factory=lambda: {5: 0.15, 6: 0.14, 7: 0.13, 8: 0.12, 9: 0.11, 10: 0.10}
    )
    # rules to skip, by name
    disabled: frozenset[str] = frozenset()

    def __post_init__(self) -> None:
        for item in fields(self):
            value = getattr(self, item.name)
            if item.type in ("int", "float") and (isinstance(value, bool) or not isinstance(value, (int, float))):
                raise LlmkitError(f"quality rule threshold {item.name} must be a number, not {value!r}")
        for name in ("max_top_ngram_char_fraction", "max_duplicate_ngram_char_fraction"):
            setattr(self, name, _ngram_thresholds(name, getattr(self, name)))
        self.disabled = frozenset(self.disabled)
        unknown = sorted(self.disabled - set(self.rule_names()))
        if unknown:
            raise LlmkitError(f"unknown quality rule(s) {unknown}: valid names are {', '.join(self.rule_names())}")

    def checks(self) -> list[tuple[str, str, str, float]]:
        """(rule name, measure name, 'min' or 'max', threshold) of every rule, in checking order."""
        checks = [
            ("min_words", "words", "min", self.min_words),
            ("max_words", "words", "max", self.max_words),
            ("min_mean_word_length", "mean_word_length", "min", self.min_mean_word_length),
            ("max_mean_word_length", "mean_word_length", "max", self.max_mean_word_length),
            ("symbol_to_word_ratio", "symbol_to_word_ratio", "max", self.max_symbol_to_word_ratio),
            ("ellipsis_lines", "ellipsis_line_fraction", "max", self.max_ellipsis_line_fraction),
            ("bullet_lines", "bullet_line_fraction", "max", self.max_bullet_line_fraction),
            ("alpha_words", "alpha_word_fraction", "min", self.min_alpha_word_fraction),
            ("stop_words", "stop_words", "min", self.min_stop_words),
            ("lorem_ipsum", "lorem_ipsum", "max", 0),
            ("dup_lines", "duplicate_line_fraction", "max", self.max_duplicate_line_fraction),
            ("dup_line_chars", "duplicate_line_char_fraction", "max", self.max_duplicate_line_char_fraction),
            ("dup_paragraphs", "duplicate_paragraph_fraction", "max", self.max_duplicate_paragraph_fraction),
            ("dup_paragraph_chars", "duplicate_paragraph_char_fraction", "max", self.max_duplicate_paragraph_char_fraction),
        ]
        for n, threshold in sorted(self.max_top_ngram_char_fraction.items()):
            checks.append((f"top_{n}gram", f"top_{n}gram_char_fraction", "max", threshold))
        for n, threshold in sorted(self.max_duplicate_ngram_char_fraction.items()):
            checks.append((f"dup_{n}gram", f"duplicate_{n}gram_char_fraction", "max", threshold))
        return checks

    def rule_names(self) -> list[str]:
        """Names of all rules (disabled ones too), in checking order."""
        return [name for name, *_ in self.checks()]

    def enabled_rule_names(self) -> list[str]:
        return [name for name in self.rule_names() if name not in self.disabled]


def check_document(text: str, rules: QualityRules) -> list[str]:
    """Names of the enabled rules `text` fails, in checking order; an empty list means keep it."""
    measures = document_measures(text, rules)
    failed = []
    for name, measure, kind, threshold in rules.checks():
        if name in rules.disabled:
            continue
        value = measures[measure]
        if (value < threshold) if kind == "min" else (value > threshold):
            failed.append(name)
    return failed


def document_measures(text: str, rules: QualityRules | None = None) -> dict[str, float]:
    """Every quantity the rules compare with a threshold (the n-gram sizes are those of `rules`): for tuning them."""
    rules = rules or QualityRules()
    words = text.split()
    lower_text = text.lower()
    lower_words = lower_text.split()
    word_count = len(words)
    counts = Counter(lower_words)
    lines = [line for line in map(str.strip, text.splitlines()) if line]
    paragraphs = [paragraph for paragraph in map(str.strip, _PARAGRAPH_BREAK.split(text)) if paragraph]
    per_word = 1 / word_count if word_count else 0.0
    per_line = 1 / len(lines) if lines else 0.0
    symbols = max(text.count("#"), sum(text.count(ellipsis) for ellipsis in ELLIPSES))
    measures = {
        "words": word_count,
        "mean_word_length": sum(map(len, words)) * per_word,
        "symbol_to_word_ratio": symbols * per_word,
        "ellipsis_line_fraction": sum(line.endswith(ELLIPSES) for line in lines) * per_line,
        "bullet_line_fraction": sum(line.startswith(BULLETS) for line in lines) * per_line,
        "alpha_word_fraction": sum(count for word, count in counts.items() if _HAS_LETTER(word)) * per_word,
        "stop_words": sum(count for word, count in counts.items() if word.strip(PUNCTUATION) in STOP_WORDS),
        "lorem_ipsum": lower_text.count(LOREM_IPSUM),
    }
    for unit, items in (("line", lines), ("paragraph", paragraphs)):
        duplicates, duplicate_chars = _duplicates(items)
        measures[f"duplicate_{unit}_fraction"] = duplicates / len(items) if items else 0.0
        total_chars = sum(map(len, items))
        measures[f"duplicate_{unit}_char_fraction"] = duplicate_chars / total_chars if total_chars else 0.0
    measures.update(_ngram_measures(lower_words, counts, rules))
    return measures


def load_quality_rules(path: str | Path | None = None, disable: list[str] | None = None,
                       other_keys: Iterable[str] = ()) -> QualityRules:
    """QualityRules with the fields a YAML/JSON file sets (others keep their defaults) and `disable`d rules added.
    Keys in `other_keys` belong to other rules kept in the same file (the safety rules) and are skipped."""
    values: dict[str, Any] = {}
    if path is not None:
        values = {name: value for name, value in read_rules_file(Path(path)).items() if name not in set(other_keys)}
        valid = [item.name for item in fields(QualityRules)]
        unknown = sorted(set(values) - set(valid))
        if unknown:
            raise LlmkitError(f"{path}: unknown field(s) {unknown}; valid fields are {', '.join(valid)}")
        defaults = QualityRules()
        for name in ("max_top_ngram_char_fraction", "max_duplicate_ngram_char_fraction"):
            if name in values:  # a file sets some n-gram sizes; the others keep their default thresholds
                values[name] = {**getattr(defaults, name), **_ngram_thresholds(f"{path}: {name}", values[name])}
        if isinstance(values.get("disabled"), str):
            values["disabled"] = [values["disabled"]]
    values["disabled"] = frozenset(values.get("disabled") or ()) | frozenset(disable or ())
    return QualityRules(**values)


# ---- measures -------------------------------------------------------------------------------------------------------


def _duplicates(items: list[str]) -> tuple[int, int]:
    """(how many items repeat an earlier one, their characters)."""
    seen: set[str] = set()
    duplicates = duplicate_chars = 0
    for item in items:
        if item in seen:
            duplicates += 1
            duplicate_chars += len(item)
        else:
            seen.add(item)
    return duplicates, duplicate_chars


def _ngram_measures(words: list[str], counts: Counter, rules: QualityRules) -> dict[str, float]:
    """Top n-gram and duplicate n-gram character fractions, from a rolling hash of word ids (numpy, no Python loop)."""
    top_sizes, duplicate_sizes = rules.max_top_ngram_char_fraction, rules.max_duplicate_ngram_char_fraction
    measures = {f"top_{n}gram_char_fraction": 0.0 for n in top_sizes}
    measures.update({f"duplicate_{n}gram_char_fraction": 0.0 for n in duplicate_sizes})
    vocabulary = {word: index for index, word in enumerate(counts)}
    word_ids = np.fromiter(map(vocabulary.__getitem__, words), dtype=np.uint64, count=len(words))
    lengths = np.fromiter(map(len, words), dtype=np.int64, count=len(words))
    total_chars = int(lengths.sum())
    if total_chars == 0:
        return measures
    offsets = np.concatenate([[0], np.cumsum(lengths)])  # characters before word i
    hashes = word_ids.copy()  # hashes[i] identifies words[i : i + n]; shape (len(words) - n + 1,)
    for n in range(1, max([*top_sizes, *duplicate_sizes], default=0) + 1):
        if n > 1:
            hashes = hashes[:-1] * _NGRAM_MULTIPLIER + word_ids[n - 1:]
        if hashes.size == 0:
            break
        if n not in top_sizes and n not in duplicate_sizes:
            continue
        unique, first, occurrences = np.unique(hashes, return_index=True, return_counts=True)
        if n in top_sizes and occurrences.max() > 1:
            most = np.flatnonzero(occurrences == occurrences.max())  # ties: the n-gram with the most characters
            chars = offsets[first[most] + n] - offsets[first[most]]
            measures[f"top_{n}gram_char_fraction"] = float(occurrences.max() * chars.max() / total_chars)
        if n in duplicate_sizes:
            repeated = np.ones(hashes.size, dtype=bool)
            repeated[first] = False
            starts = np.flatnonzero(repeated)  # occurrences of an n-gram seen earlier; mark their words once
            marks = np.bincount(starts, minlength=len(words) + 1) - np.bincount(starts + n, minlength=len(words) + 1)
            covered = np.cumsum(marks[:-1]) > 0
            measures[f"duplicate_{n}gram_char_fraction"] = float(lengths[covered].sum() / total_chars)
    return measures


def _ngram_thresholds(what: str, thresholds: Any) -> dict[int, float]:
    if not isinstance(thresholds, dict):
        raise LlmkitError(f"{what} must map n-gram sizes to thresholds, e.g. {{2: 0.2, 3: 0.18}}, not {thresholds!r}")
    try:
        converted = {int(n): float(threshold) for n, threshold in thresholds.items()}
    except (TypeError, ValueError):
        raise LlmkitError(
            f"{what}: keys must be n-gram sizes and values fractions, e.g. {{2: 0.2}}; got {thresholds!r}"
        ) from None
    if any(n < 1 for n in converted):
        raise LlmkitError(f"{what}: n-gram sizes must be at least 1; got {sorted(converted)}")
    return converted


def read_rules_file(path: Path) -> dict[str, Any]:
    if path.suffix not in RULES_FILE_SUFFIXES:
        raise LlmkitError(f"{path}: quality rules file must be {', '.join(RULES_FILE_SUFFIXES)}; rename or convert it")
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise LlmkitError(f"quality rules file {path} does not exist; check the path") from None
    import yaml

    try:
        values = json.loads(text) if path.suffix == ".json" else yaml.safe_load(text)
    except (ValueError, yaml.YAMLError) as error:  # json.JSONDecodeError is a ValueError
        raise LlmkitError(f"{path} cannot be parsed ({error}); fix its syntax") from None
    if values is None:
        return {}
    if not isinstance(values, dict):
        raise LlmkitError(f"{path} must hold a mapping of QualityRules fields to values, not a {type(values).__name__}")
    return values
