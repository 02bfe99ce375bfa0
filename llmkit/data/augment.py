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

import random
import re
from collections.abc import Callable, Sequence
from functools import cache
from pathlib import Path

from llmkit.errors import LlmkitError

SYNONYMS_FILE = Path(__file__).resolve().parent / "builtin" / "synonyms.tsv"
METHODS = ("deletion", "swap", "typo", "synonym")
KEYBOARD_ROWS = ("qwertyuiop", "asdfghjkl", "zxcvbnm")
WORD = re.compile(r"^(\W*)(.*?)(\W*)$", re.DOTALL)  # leading punctuation, the word, trailing punctuation


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


