"""`llmkit augment`: write augmented copies of JSONL rows (the techniques are in llmkit/data/augment.py)."""

from __future__ import annotations

import gzip
import json
from collections.abc import Callable
from pathlib import Path

from llmkit.commands.common import as_paths, refuse_existing_file, refuse_writing_onto_inputs
from llmkit.data.augment import augment_text, parse_methods
from llmkit.data.jsonl import JSONL_SUFFIXES, read_jsonl
from llmkit.errors import LlmkitError
from llmkit.io import atomic_write


def augment(
    data: list[str] | str,
    output: str,
    text_field: str = "text",
    methods: str = "deletion,swap,typo,synonym",
    rate: float = 0.1,
    copies: int = 1,
    seed: int = 0,
    overwrite: bool = False,
) -> Path:
    """Write each JSONL row and `copies` augmented copies of it (word deletion, swap, keyboard typos, synonyms).

    Example: llmkit augment --data train.jsonl --output train_aug.jsonl --text_field instruction,input --copies 2
             llmkit augment --data notes.jsonl.gz --output noisy.jsonl --methods typo --rate 0.05

    Each copy applies the chosen methods in order, each changing about `rate` of the words; other fields are
    copied unchanged. The same seed gives the same output. The file is written atomically; it is never one of the
    inputs, and an existing OUTPUT is replaced only with --overwrite.

    Args:
        data: .jsonl or .jsonl.gz files (one JSON object per line).
        output: the .jsonl or .jsonl.gz file to write (originals first, then their copies, row by row).
        text_field: the text field(s) to augment, comma-separated.
        methods: comma-separated methods: deletion, swap, typo, synonym.
        rate: share of words each method changes (0 to 1).
        copies: augmented copies per row.
        seed: random seed; the copy k of row i uses seed, i and k.
        overwrite: replace an existing OUTPUT.
    """
    names, fields = parse_methods(methods), [name.strip() for name in text_field.split(",") if name.strip()]
    if copies < 0 or not fields:
        raise LlmkitError(f"--copies {copies} must be 0 or more and --text_field {text_field!r} must name at least one "
                          "field")
    if not str(output).lower().endswith(JSONL_SUFFIXES):
        raise LlmkitError(f"--output {output} must end with .jsonl or .jsonl.gz")
    refuse_writing_onto_inputs(output, as_paths(data))
    refuse_existing_file(output, overwrite)
    augment_text("", names, rate)  # checks the rate before any reading
    rows = []
    for path in as_paths(data):
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
    if not path.name.lower().endswith(JSONL_SUFFIXES):
        raise LlmkitError(f"{path}: augment reads JSONL (.jsonl or .jsonl.gz), one JSON object per line")
    return [row for _, row in read_jsonl(path, fields, hint="pass --text_field with the field(s) to augment")]
