"""The one JSONL reader: (line number, object) for each line of a .jsonl or .jsonl.gz file, streamed.

Every JSONL input of llmkit (SFT data, text corpora, augmentation input, evaluation task rows) comes through
here, so every bad file fails the same way: one LlmkitError naming the file, the line and the fix, for a line
that is not UTF-8, not JSON, not an object or lacks a required string field, and for damaged gzip data
(a truncated or corrupt .gz). Blank lines are skipped; a UTF-8 byte-order mark on the first line is allowed.

Lines are decoded one at a time (not through a text-mode stream), so a decoding error knows its line.
"""

from __future__ import annotations

import gzip
import json
import zlib
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

from llmkit.errors import LlmkitError

JSONL_SUFFIXES = (".jsonl", ".jsonl.gz")
GZIP_ERRORS = (gzip.BadGzipFile, EOFError, zlib.error)  # not gzip / truncated / corrupt deflate data


def read_lines(path: str | Path) -> Iterator[tuple[int, str]]:
    """(line number, text) of each non-blank line, gunzipped when the name ends in .gz; the caller parses them
    (the SFT reader counts a line that is not JSON as one bad row it may skip)."""
    path = Path(path)
    if not path.is_file():
        raise LlmkitError(f"{path} {'is a folder, not a file' if path.is_dir() else 'does not exist'}: check the path")
    opener = gzip.open if path.name.lower().endswith(".gz") else open
    number = 0
    try:
        with opener(path, "rb") as lines:
            for number, raw in enumerate(lines, start=1):
                text = _decode(raw, path, number)
                if text.strip():
                    yield number, text
    except GZIP_ERRORS as error:
        raise LlmkitError(f"{path}, line {number + 1}: damaged gzip data ({error or type(error).__name__}); the file "
                          "is truncated or corrupt: compress or download it again") from None


def _decode(raw: bytes, path: Path, number: int) -> str:
    try:
        return raw.decode("utf-8-sig" if number == 1 else "utf-8")
    except UnicodeDecodeError as error:
        raise LlmkitError(f"{path}, line {number}: not UTF-8 ({error.reason} at byte {error.start} of the line); "
                          f"convert the file, e.g. `iconv -f latin1 -t UTF-8`") from None


def parse_object(text: str, where: str, fields: Sequence[str] = (), hint: str = "") -> dict[str, Any]:
    """One line's JSON object, with each of `fields` a string; errors start with `where` ("file, line N") and end
    with `hint`, the caller's fix for a missing field (e.g. "pass --text_field with the field that holds the text")."""
    named = ", ".join(f"'{name}'" for name in fields)
    shape = "one JSON object" + ("" if not fields else f" with a string field {named}" if len(fields) == 1
                                 else f" with string fields {named}")
    try:
        row = json.loads(text)
    except json.JSONDecodeError as error:
        raise LlmkitError(f"{where}: not valid JSON ({error.msg} at column {error.colno}); each line must be {shape}: "
                          "fix or delete that line") from None
    if not isinstance(row, dict):
        raise LlmkitError(f"{where}: holds a JSON {type(row).__name__}, not an object; each line must be {shape}")
    fix = hint or "fix that line"
    for name in fields:
        if name not in row:
            raise LlmkitError(f"{where}: no string field '{name}' (fields: {', '.join(row) or 'none'}); {fix}")
        if not isinstance(row[name], str):
            raise LlmkitError(f"{where}: field '{name}' holds a {type(row[name]).__name__}, not a string; {fix}")
    return row


def read_jsonl(path: str | Path, fields: Sequence[str] = (), hint: str = "") -> Iterator[tuple[int, dict[str, Any]]]:
    """(line number, object) of each non-blank line, checked as `parse_object` does."""
    for number, text in read_lines(path):
        yield number, parse_object(text, f"{path}, line {number}", fields, hint)
