"""Text data augmentation: noisy copies of training text that keep its meaning (EDA, Wei & Zou 2019, plus
keyboard typos). Each method touches a share `rate` of the words, with its own seeded generator:

- deletion: each word is removed with probability rate (at least one word is kept);
- swap: round(rate * words) times, two random words trade places;
- typo: each word, with probability rate, has one letter replaced by a neighbouring QWERTY key;
- synonym: each word found in the shipped synonym table (builtin/synonyms.tsv) is, with probability rate,
  replaced by one of its synonyms (case of the first letter kept).

Whitespace between words is kept as it was (dialogue line breaks survive), and punctuation stays attached
outside the word it surrounds. The same seed, row and copy always give the same text.
"""

from __future__ import annotations

import gzip
import json
import random
import re
from collections.abc import Callable, Sequence
from functools import cache
from pathlib import Path

from llmkit.errors import LlmkitError
from llmkit.io import atomic_write

SYNONYMS_FILE = Path(__file__).resolve().parent / "builtin" / "synonyms.tsv"
METHODS = ("deletion", "swap", "typo", "synonym")
KEYBOARD_ROWS = ("qwertyuiop", "asdfghjkl", "zxcvbnm")
WORD = re.compile(r"^(\W*)(.*?)(\W*)$", re.DOTALL)  # leading punctuation, the word, trailing punctuation
OUTPUT_SUFFIXES = (".jsonl", ".jsonl.gz")


def _keyboard_neighbours() -> dict[str, str]:
    """Letters next to each letter on a QWERTY keyboard: same row left/right, and the keys touching it in the rows
    above and below (a row is offset half a key to the right of the one above it)."""
    neighbours: dict[str, set[str]] = {}
    for row_index, row in enumerate(KEYBOARD_ROWS):
        for column, key in enumerate(row):
            near = {row[column - 1]} if column > 0 else set()
            near |= {row[column + 1]} if column + 1 < len(row) else set()
            if row_index > 0:  # the row above: keys at the same column and one to the right
                above = KEYBOARD_ROWS[row_index - 1]
                near |= {above[c] for c in (column, column + 1) if c < len(above)}
            if row_index + 1 < len(KEYBOARD_ROWS):  # the row below: keys at the same column and one to the left
                below = KEYBOARD_ROWS[row_index + 1]
                near |= {below[c] for c in (column - 1, column) if 0 <= c < len(below)}
            neighbours[key] = near
    return {key: "".join(sorted(near)) for key, near in neighbours.items()}


KEYBOARD_NEIGHBOURS = _keyboard_neighbours()  # e.g. "g" -> "bfhtvy"


@cache
def synonym_table(path: Path = SYNONYMS_FILE) -> dict[str, tuple[str, ...]]:
    """word -> synonyms, from a `word<TAB>syn,syn,...` file (lines starting with # are comments)."""
    table = {}
    for number, line in enumerate(Path(path).read_text(encoding="utf-8").splitlines(), start=1):
        if not line.strip() or line.startswith("#"):
            continue
        word, _, synonyms = line.partition("\t")
        if not synonyms:
            raise LlmkitError(f"{path}, line {number}: expected 'word<TAB>synonym,synonym'; fix the line")
        table[word.strip().lower()] = tuple(synonym.strip() for synonym in synonyms.split(",") if synonym.strip())
    return table


def _split(text: str) -> tuple[str, list[str], list[str]]:
    """(leading whitespace, words, the whitespace after each word): text == lead + sum(word + space)."""
    body = text.lstrip()
    pieces = re.split(r"(\s+)", body)  # word, space, word, space, ..., word or ""
    if pieces[-1] == "":
        pieces.pop()
    words, spaces = pieces[0::2], pieces[1::2]
    return text[: len(text) - len(body)], words, spaces + [""] * (len(words) - len(spaces))


def _join(lead: str, words: list[str], spaces: list[str]) -> str:
    return lead + "".join(word + space for word, space in zip(words, spaces))


def random_deletion(text: str, rate: float, rng: random.Random) -> str:
    """Drop each word with probability `rate` (with the whitespace after it); at least one word stays."""
    lead, words, spaces = _split(text)
    keep = [index for index in range(len(words)) if rng.random() >= rate]
    if not keep and words:
        keep = [rng.randrange(len(words))]
    # the kept words keep their following whitespace; the text's own ending whitespace stays at the end
    body = _join("", [words[i] for i in keep], [spaces[i] for i in keep]).rstrip()
    return lead + body + (spaces[-1] if words else "")


def random_swap(text: str, rate: float, rng: random.Random) -> str:
    """round(rate * words) swaps of two random words; whitespace stays in place."""
    lead, words, spaces = _split(text)
    if len(words) >= 2:
        for _ in range(round(rate * len(words))):
            first, second = rng.sample(range(len(words)), 2)
            words[first], words[second] = words[second], words[first]
    return _join(lead, words, spaces)


def keyboard_typos(text: str, rate: float, rng: random.Random) -> str:
    """In each word with probability `rate`, one letter becomes a neighbouring QWERTY key (same case)."""
    lead, words, spaces = _split(text)
    for index, word in enumerate(words):
        letters = [position for position, char in enumerate(word) if char.lower() in KEYBOARD_NEIGHBOURS]
        if letters and rng.random() < rate:
            position = rng.choice(letters)
            typo = rng.choice(KEYBOARD_NEIGHBOURS[word[position].lower()])
            typo = typo.upper() if word[position].isupper() else typo
            words[index] = word[:position] + typo + word[position + 1:]
    return _join(lead, words, spaces)


def synonym_replacement(text: str, rate: float, rng: random.Random, table: dict[str, tuple[str, ...]] | None = None) -> str:
    """Each word in the synonym table becomes, with probability `rate`, one of its synonyms (punctuation kept)."""
    table = synonym_table() if table is None else table
    lead, words, spaces = _split(text)
    for index, word in enumerate(words):
        before, core, after = WORD.match(word).groups()
        synonyms = table.get(core.lower())
        if synonyms and rng.random() < rate:
            synonym = rng.choice(synonyms)
            synonym = synonym.upper() if core.isupper() and len(core) > 1 else synonym
            synonym = synonym[0].upper() + synonym[1:] if core[0].isupper() else synonym
            words[index] = before + synonym + after
    return _join(lead, words, spaces)


AUGMENTERS: dict[str, Callable[[str, float, random.Random], str]] = {
    "deletion": random_deletion, "swap": random_swap, "typo": keyboard_typos, "synonym": synonym_replacement,
}  # fmt: skip


def parse_methods(methods: str | Sequence[str]) -> list[str]:
    """Method names from "deletion,swap" or a list; unknown names raise with the choices."""
    names = [name.strip() for name in (methods.split(",") if isinstance(methods, str) else methods) if name.strip()]
    unknown = [name for name in names if name not in AUGMENTERS]
    if unknown or not names:
        raise LlmkitError(f"unknown augmentation method(s) {', '.join(unknown) or '(none given)'}; choose from "
                          f"{', '.join(METHODS)}")
    return names


def augment_text(text: str, methods: str | Sequence[str] = METHODS, rate: float = 0.1, seed: int | str = 0) -> str:
    """`text` after each method in turn, each with its own generator seeded by (seed, method)."""
    if not 0 <= rate <= 1:
        raise LlmkitError(f"rate={rate} must be between 0 and 1 (the share of words each method changes)")
    for name in parse_methods(methods):
        text = AUGMENTERS[name](text, rate, random.Random(f"{seed}:{name}"))
    return text


def augment(
    inputs: list[str] | str,
    output: str,
    field: str = "text",
    methods: str = "deletion,swap,typo,synonym",
    rate: float = 0.1,
    copies: int = 1,
    seed: int = 0,
) -> Path:
    """Write each JSONL row and `copies` augmented copies of it (word deletion, swap, keyboard typos, synonyms).

    Example: llmkit augment --inputs train.jsonl --output train_aug.jsonl --field instruction,input --copies 2
             llmkit augment --inputs notes.jsonl.gz --output noisy.jsonl --methods typo --rate 0.05

    Each copy applies the chosen methods in order, each changing about `rate` of the words; other fields are
    copied unchanged. The same seed gives the same output. The file is written atomically.

    Args:
        inputs: .jsonl or .jsonl.gz files (one JSON object per line).
        output: the .jsonl or .jsonl.gz file to write (originals first, then their copies, row by row).
        field: the text field(s) to augment, comma-separated.
        methods: comma-separated methods: deletion, swap, typo, synonym.
        rate: share of words each method changes (0 to 1).
        copies: augmented copies per row.
        seed: random seed; the copy k of row i uses seed, i and k.
    """
    names, fields = parse_methods(methods), [name.strip() for name in field.split(",") if name.strip()]
    if copies < 0 or not fields:
        raise LlmkitError(f"copies={copies} must be 0 or more and field={field!r} must name at least one field")
    if not str(output).lower().endswith(OUTPUT_SUFFIXES):
        raise LlmkitError(f"output {output} must end with .jsonl or .jsonl.gz")
    augment_text("", names, rate)  # checks the rate before any reading
    rows = []
    for path in [inputs] if isinstance(inputs, str) else inputs:
        rows.extend(_read_rows(Path(path), fields))
    lines = []
    for row_index, row in enumerate(rows):
        lines.append(json.dumps(row, ensure_ascii=False))
        for copy in range(1, copies + 1):
            noisy = {**row, **{name: augment_text(row[name], names, rate, f"{seed}:{row_index}:{copy}") for name in fields}}
            lines.append(json.dumps(noisy, ensure_ascii=False))
    text = "".join(line + "\n" for line in lines)
    opener = gzip.open if str(output).lower().endswith(".gz") else open
    atomic_write(Path(output), lambda tmp: _write(tmp, text, opener))
    print(f"augment: {len(rows):,} rows -> {len(lines):,} rows ({copies} copies each, {', '.join(names)} at rate "
          f"{rate}) in {output}")
    return Path(output)


def _write(path: Path, text: str, opener: Callable) -> None:
    with opener(path, "wt", encoding="utf-8") as file:
        file.write(text)


def _read_rows(path: Path, fields: list[str]) -> list[dict]:
    if not path.is_file():
        raise LlmkitError(f"input {path} does not exist: check the path")
    if not path.name.lower().endswith(OUTPUT_SUFFIXES):
        raise LlmkitError(f"{path}: augment reads JSONL (.jsonl or .jsonl.gz), one JSON object per line")
    rows = []
    opener = gzip.open if path.name.lower().endswith(".gz") else open
    with opener(path, "rt", encoding="utf-8") as lines:
        for number, line in enumerate(lines, start=1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as error:
                raise LlmkitError(f"{path}, line {number}: not valid JSON ({error.msg}); fix or delete that line") from None
            for name in fields:
                if not isinstance(row, dict) or not isinstance(row.get(name), str):
                    found = f"fields: {', '.join(row)}" if isinstance(row, dict) else f"a {type(row).__name__}"
                    raise LlmkitError(f"{path}, line {number}: no text field '{name}' ({found}); pass --field with the "
                                      "field(s) to augment")
            rows.append(row)
    return rows
