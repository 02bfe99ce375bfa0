"""Data augmentation: each method changes about `rate` of the words on a large text, typos use only QWERTY
neighbours, synonyms come from the shipped table, a seed fixes the output, and the `augment` verb's JSONL files."""

from __future__ import annotations

import gzip
import json
import random
import re

import pytest

from llmkit.commands.augment import augment
from llmkit.data.augment import (
    KEYBOARD_NEIGHBOURS,
    SYNONYMS_FILE,
    augment_text,
    keyboard_typos,
    random_deletion,
    random_swap,
    synonym_replacement,
    synonym_table,
)
from llmkit.errors import LlmkitError
from tests.helpers import shakespeare_text

N_WORDS = 20_000
# With n = 20,000 independent draws at p = 0.1 the share's standard deviation is sqrt(p(1-p)/n) = 0.0021:
# 0.01 is almost 5 standard deviations, while a wrong rule (a rate per letter, a rate applied twice) misses it.
RATE, SHARE_TOLERANCE = 0.1, 0.01


@pytest.fixture(scope="module")
def large_text() -> str:
    """The first 20,000 words of Tiny Shakespeare, its line breaks kept."""
    text = shakespeare_text()
    end = [match.end() for match in re.finditer(r"\S+", text)][N_WORDS - 1]
    return text[:end]


def whitespace(text: str) -> list[str]:
    return re.findall(r"\s+", text)


def test_deletion_removes_about_rate_of_the_words(large_text):
    result = random_deletion(large_text, RATE, random.Random(0))
    assert abs(1 - len(result.split()) / N_WORDS - RATE) < SHARE_TOLERANCE
    words = iter(large_text.split())
    assert all(any(word == kept for word in words) for kept in result.split())  # kept words, in their order
    assert random_deletion("only words here", 1.0, random.Random(0)).count(" ") == 0  # one word always stays
    assert random_deletion(large_text, 0.0, random.Random(0)) == large_text


def test_swap_exchanges_round_rate_times_words_and_keeps_whitespace(large_text):
    words = [f"w{index}" for index in range(1000)]  # distinct words, so each swap is visible
    text = " ".join(words[:500]) + "\n" + " ".join(words[500:])
    result = random_swap(text, RATE, random.Random(0))
    assert sorted(result.split()) == sorted(words) and whitespace(result) == whitespace(text)
    moved = sum(a != b for a, b in zip(result.split(), words))
    assert 0 < moved <= 2 * round(RATE * len(words))  # 100 swaps move at most 200 words
    shakespeare = random_swap(large_text, RATE, random.Random(0))
    assert whitespace(shakespeare) == whitespace(large_text) and sorted(shakespeare.split()) == sorted(large_text.split())


def test_typos_change_about_rate_of_the_words_by_one_keyboard_neighbour(large_text):
    result = keyboard_typos(large_text, RATE, random.Random(0))
    assert whitespace(result) == whitespace(large_text)
    before, after = large_text.split(), result.split()
    changed = [(a, b) for a, b in zip(before, after) if a != b]
    eligible = sum(any(char.lower() in KEYBOARD_NEIGHBOURS for char in word) for word in before)
    assert abs(len(changed) / eligible - RATE) < SHARE_TOLERANCE
    for original, typo in changed:
        [position] = [i for i, (x, y) in enumerate(zip(original, typo)) if x != y]  # exactly one letter differs
        old, new = original[position], typo[position]
        assert new.lower() in KEYBOARD_NEIGHBOURS[old.lower()] and old.isupper() == new.isupper()


def test_keyboard_neighbours_are_the_touching_qwerty_keys():
    assert KEYBOARD_NEIGHBOURS["g"] == "bfhtvy" and KEYBOARD_NEIGHBOURS["q"] == "aw" and KEYBOARD_NEIGHBOURS["m"] == "jkn"
    assert all(key in KEYBOARD_NEIGHBOURS[near] for key, nears in KEYBOARD_NEIGHBOURS.items() for near in nears)


def test_synonyms_come_from_the_table_at_about_rate_with_case_and_punctuation_kept(large_text):
    table = synonym_table()
    result = synonym_replacement(large_text, RATE, random.Random(0))
    before, after = large_text.split(), result.split()
    assert len(before) == len(after) and whitespace(result) == whitespace(large_text)
    core = re.compile(r"^(\W*)(.*?)(\W*)$")
    eligible = [(a, b) for a, b in zip(before, after) if core.match(a).group(2).lower() in table]
    changed = [(a, b) for a, b in eligible if a != b]
    assert len(eligible) > 1000 and abs(len(changed) / len(eligible) - RATE) < 2.5 * SHARE_TOLERANCE  # n ~ 1,400
    assert all(a == b for a, b in zip(before, after) if core.match(a).group(2).lower() not in table)
    for original, replaced in changed:
        (lead, word, tail), (new_lead, synonym, new_tail) = core.match(original).groups(), core.match(replaced).groups()
        assert (lead, tail) == (new_lead, new_tail) and synonym.lower() in table[word.lower()]
        assert word[0].isupper() == synonym[0].isupper()
    assert synonym_replacement("Happy, happy day!", 1.0, random.Random(0), {"happy": ("glad",)}) == "Glad, glad day!"


def test_the_shipped_synonym_table_is_a_few_hundred_single_words():
    table = synonym_table()
    assert len(table) >= 300 and table == synonym_table(SYNONYMS_FILE)
    for word, synonyms in table.items():
        assert synonyms and all(s.isalpha() and s.islower() and s != word for s in synonyms), word


def test_same_seed_same_text_other_seed_other_text(large_text):
    sample = large_text[:5000]
    first = augment_text(sample, "deletion,swap,typo,synonym", RATE, seed=3)
    assert first == augment_text(sample, ["deletion", "swap", "typo", "synonym"], RATE, seed=3)
    assert first != augment_text(sample, "deletion,swap,typo,synonym", RATE, seed=4) and first != sample
    assert augment_text(sample, "typo", 0.0, seed=3) == sample
    with pytest.raises(LlmkitError, match="unknown augmentation method.*backtranslate; choose from deletion, swap"):
        augment_text(sample, "typo,backtranslate")
    with pytest.raises(LlmkitError, match="rate=1.5 must be between 0 and 1"):
        augment_text(sample, "typo", 1.5)


def test_augment_verb_writes_originals_and_seeded_copies(tmp_path, capsys):
    rows = [{"id": index, "instruction": f"Please describe a quick and happy trip number {index}.", "output": "ok"}
            for index in range(5)]
    source = tmp_path / "in.jsonl.gz"
    with gzip.open(source, "wt", encoding="utf-8") as file:
        file.write("".join(json.dumps(row) + "\n" for row in rows))
    out = augment([str(source)], str(tmp_path / "out.jsonl"), text_field="instruction", rate=0.3, copies=2, seed=1)
    written = [json.loads(line) for line in out.read_text(encoding="utf-8").splitlines()]
    assert len(written) == 15 and written[0::3] == rows  # each original, then its two copies
    for index, row in enumerate(rows):
        copies = written[3 * index + 1 : 3 * index + 3]
        assert all(copy["id"] == row["id"] and copy["output"] == "ok" for copy in copies)  # other fields unchanged
        assert copies[0]["instruction"] != copies[1]["instruction"]  # copies differ from each other
    assert "5 rows -> 15 rows" in capsys.readouterr().out
    again = augment([str(source)], str(tmp_path / "again.jsonl.gz"), text_field="instruction", rate=0.3, copies=2, seed=1)
    assert gzip.open(again, "rt", encoding="utf-8").read() == out.read_text(encoding="utf-8")
    assert sorted(path.name for path in tmp_path.iterdir()) == ["again.jsonl.gz", "in.jsonl.gz", "out.jsonl"]


def test_augment_verb_errors_name_the_file_line_and_field(tmp_path):
    source = tmp_path / "in.jsonl"
    source.write_text('{"text": "fine"}\n{"body": "no text field"}\n', encoding="utf-8")
    with pytest.raises(LlmkitError, match=r"in.jsonl, line 2: no string field 'text' \(fields: body\); pass --text_field"):
        augment([str(source)], str(tmp_path / "out.jsonl"))
    with pytest.raises(LlmkitError, match="must end with .jsonl or .jsonl.gz"):
        augment([str(source)], str(tmp_path / "out.csv"))
    with pytest.raises(LlmkitError, match="does not exist"):
        augment([str(tmp_path / "missing.jsonl")], str(tmp_path / "out.jsonl"))
    assert not (tmp_path / "out.jsonl").exists()


def test_augment_never_writes_over_its_input_or_an_existing_output(tmp_path, capsys):
    from llmkit.cli import main

    source = tmp_path / "in.jsonl"
    text = '{"text": "one two three four five"}\n'
    source.write_text(text, encoding="utf-8")
    for argv, message in [
        (["--output", str(source), "--overwrite", "true"], f"--output {source} is also an input (--data)"),
        (["--output", str(tmp_path / "old.jsonl")], f"--output {tmp_path / 'old.jsonl'} already exists; pass --overwrite"),
    ]:
        (tmp_path / "old.jsonl").write_text("old\n")
        with pytest.raises(SystemExit) as exit:
            main(["augment", "--data", str(source), *argv])
        err = capsys.readouterr().err
        assert exit.value.code == 2 and err.startswith(f"error: {message}") and err.count("\n") == 1
    assert source.read_text(encoding="utf-8") == text and (tmp_path / "old.jsonl").read_text() == "old\n"
    augment(str(source), str(tmp_path / "old.jsonl"), copies=1, overwrite=True)
    assert len((tmp_path / "old.jsonl").read_text().splitlines()) == 2
