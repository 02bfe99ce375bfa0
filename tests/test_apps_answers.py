"""Answer extraction (llmkit.apps.answers): GSM8K's real reference solutions, and replies written the ways models
write numbers."""

import gzip
import json
from fractions import Fraction

import pytest

from llmkit.apps.answers import (
    answers_match,
    extract_answer,
    first_number,
    format_number,
    numbers,
    parse_number,
    reference_answer,
)
from llmkit.data.shared import shared_data_file
from llmkit.errors import LlmkitError


def test_every_gsm8k_test_reference_parses_to_its_number():
    """All 1,319 test solutions: the answer equals the "####" line read independently (commas dropped), and
    extract_answer on the whole solution (which holds many other numbers) finds the same one."""
    with gzip.open(shared_data_file("gsm8k/test.jsonl.gz"), "rt", encoding="utf-8") as file:
        rows = [json.loads(line) for line in file]
    assert len(rows) == 1319
    for row in rows:
        last_line = row["answer"].strip().splitlines()[-1]
        assert last_line.startswith("#### ")
        expected = Fraction(last_line[len("#### "):].replace(",", ""))
        assert reference_answer(row["answer"]) == expected, row["answer"]
        assert extract_answer(row["answer"]) == expected


@pytest.mark.parametrize(("reply", "expected"), [
    ("She pays 3 * $6 = $18.\nThe answer is $1,234.50.", Fraction("1234.5")),
    ("So the total is 42.0", Fraction(42)),  # 42.0 == 42
    ("The answer is 12. Then she buys 15 more.", Fraction(12)),  # the phrase wins over the last number
    ("#### 72\nQ: A farmer has 5 cows", Fraction(72)),  # GSM8K's marker wins over everything after it
    ("It costs 18 dollars.", Fraction(18)),
    ("The temperature fell to -7 degrees.", Fraction(-7)),
    ("5-3=2", Fraction(2)),  # a hyphen between digits is not a minus sign
    ("That is 50% of them", Fraction(50)),
    ("The answer is: **36**", Fraction(36)),
    ("0.1 + 0.2 = 0.3", Fraction(3, 10)),  # exact, no float rounding
    ("I don't know.", None),
])
def test_extract_answer_on_tricky_replies(reply, expected):
    assert extract_answer(reply) == expected


def test_numbers_reads_thousands_lists_and_sentence_ends():
    assert numbers("1,000 apples, 2, 3 and 4.") == [1000, 2, 3, 4]
    assert numbers("well-known 10x faster, 3rd place") == [10, 3]
    assert parse_number(" $1,234. ") == 1234
    with pytest.raises(ValueError, match="no number"):
        parse_number("none here")


def test_first_number_and_matching():
    assert first_number(" 18. Then 5 more") == 18
    assert first_number("nothing") is None
    assert answers_match(Fraction(42), Fraction("42.00"))
    assert not answers_match(None, Fraction(0))  # a missing answer never matches, not even 0
    assert not answers_match(Fraction(41), Fraction(42))


def test_format_number_and_missing_marker():
    assert [format_number(Fraction(v)) for v in ("42", "-0.5", "1/3")] == ["42", "-0.5", "1/3"]
    assert format_number(None) is None
    with pytest.raises(LlmkitError, match="no '#### <number>' line"):
        reference_answer("She has 5 apples.")
