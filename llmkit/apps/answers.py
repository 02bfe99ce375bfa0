"""Answer extraction for math word problems: the number a model's reply (or a GSM8K reference solution) ends on.

Where the number is looked for, in order:
1. GSM8K's own marker, "#### 42" (the reference solutions' last line; a model shown such solutions copies it);
2. the last "The answer is 42" (the phrase the chain-of-thought exemplars of Wei et al. 2022 end on);
3. the last number in the text (what lm-evaluation-harness's "flexible-extract" falls back to).

Numbers are read the way people write them: "1,000" is 1000, "$18" and "18 dollars" and "18%" are 18, "42." at the
end of a sentence is 42, "-3" is negative. They are kept as exact fractions, so "42.0" == "42" and 0.1 + 0.2 is 0.3:
GSM8K scores exact match on the final number, and no float tolerance blurs it.
"""

from __future__ import annotations

import re
from fractions import Fraction

from llmkit.errors import LlmkitError

GSM8K_MARKER = "####"
ANSWER_PHRASE = "The answer is"

# A number: an optional minus that is not a hyphen between words or digits ("5-3", "well-known"), an optional $,
# then either digits in comma-separated thousands ("12,345.5") or plain digits ("12345.5", ".5").
_NUMBER = r"(?<![\w.])-?\$?(?:\d{1,3}(?:,\d{3})+(?:\.\d+)?|\d+(?:\.\d+)?|\.\d+)(?![\d])"
NUMBER_PATTERN = re.compile(_NUMBER)
_MARKER_PATTERN = re.compile(re.escape(GSM8K_MARKER) + r"\s*(" + _NUMBER + ")")
_PHRASE_PATTERN = re.compile(r"answer is:?\s*\**\s*(" + _NUMBER + ")", re.IGNORECASE)


def parse_number(text: str) -> Fraction:
    """The exact value of one number as written ("1,234", "$5", "-0.50", "42."); raises ValueError if `text`
    holds no number."""
    match = NUMBER_PATTERN.search(text.strip())
    if match is None:
        raise ValueError(f"no number in {text[:60]!r}")
    return Fraction(match.group().replace(",", "").replace("$", ""))


def numbers(text: str) -> list[Fraction]:
    """Every number in `text`, in order."""
    return [parse_number(match.group()) for match in NUMBER_PATTERN.finditer(text)]


def extract_answer(text: str) -> Fraction | None:
    """The answer a reply states: after '####', else after the last 'The answer is', else its last number;
    None when it holds no number at all."""
    for pattern in (_MARKER_PATTERN, _PHRASE_PATTERN):
        found = pattern.findall(text)
        if found:
            return parse_number(found[-1])
    values = numbers(text)
    return values[-1] if values else None


def first_number(text: str) -> Fraction | None:
    """The first number in `text`: how Kojima et al. (2022) read the reply to their answer-extraction prompt
    ("Therefore, the answer (arabic numerals) is"), where the answer comes first and may be followed by more."""
    values = numbers(text)
    return values[0] if values else None


def reference_answer(solution: str) -> Fraction:
    """The final answer of a GSM8K reference solution (its last line, "#### 42")."""
    found = _MARKER_PATTERN.findall(solution)
    if not found:
        raise LlmkitError(f"GSM8K solution {solution[-60:]!r} has no '#### <number>' line; the data file is not "
                          "GSM8K's (restore it from the SOURCE.md beside it)")
    return parse_number(found[-1])


def answers_match(predicted: Fraction | None, reference: Fraction) -> bool:
    """GSM8K exact match: the predicted number equals the reference exactly (a missing answer never does)."""
    return predicted is not None and predicted == reference


def format_number(value: Fraction | None) -> str | None:
    """A number as text for reports and JSON: '42', '-0.5', '1/3' for a value with no finite decimal form."""
    if value is None:
        return None
    if value.denominator == 1:
        return str(value.numerator)
    decimal = float(value)
    return repr(decimal) if Fraction(repr(decimal)) == value else str(value)
