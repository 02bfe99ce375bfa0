"""Data safety settings and the pass that applies them to one document: PII (llmkit/data/pii.py) and harmful
content (llmkit/data/harmful.py), shared by `llmkit filter`, `prepare` and `finetune`.

Modes. PII: "redact" replaces each finding with a typed placeholder and keeps the document; "drop" drops a document
holding any; "report" changes nothing and records the findings. Harmful: "drop" drops a flagged document; "report"
only counts it. "off" skips the rule.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, Literal

from llmkit.data.pii import PII_TYPES, PiiFinder, PiiSpan, redact
from llmkit.data.quality import read_rules_file
from llmkit.errors import LlmkitError

PiiMode = Literal["off", "redact", "drop", "report"]
HarmfulMode = Literal["off", "drop", "report"]
PII_MODES = ("off", "redact", "drop", "report")
HARMFUL_MODES = ("off", "drop", "report")
HARMFUL_METHODS = ("blocklist", "classifier", "both")


@dataclass
class SafetyRules:
    """What the safety pass does; the same names are CLI flags and keys of a `--rules` YAML/JSON file."""

    pii: PiiMode = "off"
    pii_types: tuple[str, ...] = PII_TYPES  # which detectors run (email, phone, ip, credit_card, iban, secret)
    pii_allow: tuple[str, ...] = ()  # findings to keep as they are (e.g. a project's public contact address)
    harmful: HarmfulMode = "off"
    harmful_method: str = "blocklist"  # blocklist (C4), classifier (HH-RLHF), both (either one flags)
    harmful_threshold: float = 0.5  # the classifier flags a document when p(harmful) >= this

    def __post_init__(self) -> None:
        if self.pii not in PII_MODES:
            raise LlmkitError(f"--pii {self.pii!r} is not one of {', '.join(PII_MODES)}")
        if self.harmful not in HARMFUL_MODES:
            raise LlmkitError(f"--harmful {self.harmful!r} is not one of {', '.join(HARMFUL_MODES)}")
        if self.harmful_method not in HARMFUL_METHODS:
            raise LlmkitError(f"--harmful_method {self.harmful_method!r} is not one of {', '.join(HARMFUL_METHODS)}")
        for name in ("pii_types", "pii_allow"):
            value = getattr(self, name)
            setattr(self, name, (value,) if isinstance(value, str) else tuple(value))

    @property
    def active(self) -> bool:
        return self.pii != "off" or self.harmful != "off"

    def rule_names(self) -> list[str]:
        """Report rows, in the order the pass checks them."""
        names = HarmfulRule.names_for(self.harmful_method) if self.harmful != "off" else []
        return names + ([f"pii_{kind}" for kind in self.pii_types] if self.pii != "off" else [])

    def to_dict(self) -> dict[str, Any]:
        return {item.name: list(value) if isinstance(value := getattr(self, item.name), tuple) else value
                for item in fields(self)}


SAFETY_FIELDS = tuple(item.name for item in fields(SafetyRules))


def load_safety_rules(path: str | Path | None = None, **flags: Any) -> SafetyRules:
    """SafetyRules from the safety keys of a `--rules` YAML/JSON file (the one that also sets the quality rules),
    overridden by the CLI flags that were given (not None)."""
    values = {name: value for name, value in read_rules_file(Path(path)).items() if name in SAFETY_FIELDS} if path else {}
    values.update({name: value for name, value in flags.items() if value is not None})
    unknown = sorted(set(values) - set(SAFETY_FIELDS))
    if unknown:
        raise LlmkitError(f"unknown safety setting(s) {unknown}: valid ones are {', '.join(SAFETY_FIELDS)}")
    return SafetyRules(**values)


@dataclass
class SafetyResult:
    """One document after the pass: `text` (redacted, or None when dropped), the rule that dropped it, every rule it
    failed, and its PII findings (positions in the original text)."""

    text: str | None
    dropped_by: str | None = None
    failed: list[str] = field(default_factory=list)
    spans: list[PiiSpan] = field(default_factory=list)


class SafetyFilter:
    """Applies SafetyRules to documents one at a time: the harmful rules first (on the original text), then PII."""

    def __init__(self, rules: SafetyRules) -> None:
        self.rules = rules
        self.harmful = HarmfulRule(rules.harmful_method, rules.harmful_threshold) if rules.harmful != "off" else None
        self.pii = PiiFinder(rules.pii_types, rules.pii_allow) if rules.pii != "off" else None

    def apply(self, text: str) -> SafetyResult:
        failed = self.harmful.check(text) if self.harmful is not None else []
        dropped_by = failed[0] if failed and self.rules.harmful == "drop" else None
        spans = self.pii.find(text) if self.pii is not None else []
        pii_failed = list(dict.fromkeys(f"pii_{span.kind}" for span in spans))
        failed += pii_failed
        if dropped_by is None and pii_failed and self.rules.pii == "drop":
            dropped_by = pii_failed[0]
        if dropped_by is not None:
            return SafetyResult(None, dropped_by, failed, spans)
        return SafetyResult(redact(text, spans) if spans and self.rules.pii == "redact" else text, None, failed, spans)


class HarmfulRule:
    """Decides whether a document is harmful by the block list, the classifier (score >= threshold), or both
    (either one). `check` returns the names of the tests a document fails: "harmful_blocklist",
    "harmful_classifier"."""

    def __init__(self, method: str = "blocklist", threshold: float = 0.5, blocklist: Iterable[str] | None = None) -> None:
        if method not in HARMFUL_METHODS:
            raise LlmkitError(f"--harmful_method {method!r} is not one of {', '.join(HARMFUL_METHODS)}")
        if not 0 <= threshold <= 1:
            raise LlmkitError(f"--harmful_threshold must be in [0, 1] (a probability), not {threshold}")
        self.method, self.threshold = method, threshold
        from llmkit.data.harmful import Blocklist, builtin_classifier  # torch: only when a harmful rule runs

        self.blocklist = Blocklist(blocklist) if method in ("blocklist", "both") else None
        self.classifier = builtin_classifier()[0] if method in ("classifier", "both") else None

    @staticmethod
    def names_for(method: str) -> list[str]:
        """The report rows of a method: both -> harmful_blocklist, harmful_classifier."""
        return ["harmful_blocklist"] * (method != "classifier") + ["harmful_classifier"] * (method != "blocklist")

    def check(self, text: str) -> list[str]:
        failed = []
        if self.blocklist is not None and self.blocklist.hits(text):
            failed.append("harmful_blocklist")
        if self.classifier is not None and self.classifier.scores([text])[0] >= self.threshold:
            failed.append("harmful_classifier")
        return failed
