"""Instruction / SFT data: read rows from JSONL, JSON arrays, CSV or Parquet, check each one, render it through a
template (llmkit.data.templates) and tokenize it so the loss falls on the completion only.

Row kinds (names mapped with `FieldMap`): Alpaca `instruction`/`input`/`output`; `prompt`/`completion`;
chat `messages` [{role, content}, ...] ending with the assistant reply to learn.

An `SFTExample` holds the prompt tokens then the completion tokens (which end with EOS); its `labels` are
IGNORE_INDEX on the prompt and the token itself on the completion (Hugging Face's convention; the batches in
llmkit.data.sft_batches shift them to next-token targets). Over-long examples (`max_length`): with
truncation="left" the prompt loses tokens from its start (after BOS) and the completion is kept whole; an
example whose completion alone does not fit beside one prompt token is dropped. truncation="drop" drops every
over-long example. Both are counted in the SFTReport.
"""

from __future__ import annotations

import csv
import dataclasses
import gzip
import json
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from llmkit.data.batch import IGNORE_INDEX
from llmkit.data.filter import DocumentFilter, FilterReport
from llmkit.data.jsonl import GZIP_ERRORS, JSONL_SUFFIXES, parse_object, read_lines
from llmkit.data.pii import redact
from llmkit.data.safety import SafetyRules
from llmkit.data.templates import CHAT, FieldMap, SFTRecord, Template, check_template, render
from llmkit.errors import LlmkitError
from llmkit.tokenizer import Tokenizer

JSON_SUFFIXES = (".json", ".json.gz")
CSV_SUFFIXES = (".csv",)
PARQUET_SUFFIXES = (".parquet",)
SFT_SUFFIXES = JSONL_SUFFIXES + JSON_SUFFIXES + CSV_SUFFIXES + PARQUET_SUFFIXES
PARQUET_BATCH_ROWS = 1024
REPORTED_ERRORS = 5  # bad-row messages kept in the report (the count covers all of them)
DIALOGSUM_DIR = "dialogsum"
DIALOGSUM_FILE = "dialogsum.{split}.jsonl.gz"
DIALOGSUM_SPLITS = ("train", "dev", "test")
Truncation = Literal["left", "drop"]


@dataclass(frozen=True)
class SFTExample:
    input_ids: list[int]  # prompt tokens, then completion tokens ending with EOS
    labels: list[int]  # IGNORE_INDEX on the prompt, = input_ids on the completion


@dataclass
class SFTReport:
    """What loading and tokenizing did: rows read, bad rows skipped (first messages kept), examples truncated or
    dropped for length."""

    rows: int = 0
    skipped: int = 0
    errors: list[str] = field(default_factory=list)
    truncated: int = 0
    dropped: int = 0
    examples: int = 0

    def skip(self, message: str) -> None:
        self.skipped += 1
        if len(self.errors) < REPORTED_ERRORS:
            self.errors.append(message)

    def summary(self) -> str:
        text = (f"{self.rows:,} rows -> {self.examples:,} examples; {self.skipped:,} bad rows skipped, "
                f"{self.truncated:,} prompts truncated, {self.dropped:,} examples dropped as too long")
        return text + "".join(f"\n  skipped: {message}" for message in self.errors)


# ---- reading rows ---------------------------------------------------------------------------------------------------


def read_rows(path: str | Path) -> Iterator[tuple[str, dict[str, Any] | str]]:
    """(origin, row) for each row of one file: "file, line N" (JSONL, CSV), "file, record N" (JSON), "file, row N"
    (Parquet). A JSONL row comes as its line's text."""
    path = Path(path)
    name = path.name.lower()
    if not path.is_file():
        raise LlmkitError(f"SFT data file {path} does not exist: check the path")
    opener = gzip.open if name.endswith(".gz") else open
    try:
        if name.endswith(JSONL_SUFFIXES):
            for number, line in read_lines(path):
                yield f"{path}, line {number}", line  # parsed by parse_row: a bad line is one bad row
        elif name.endswith(JSON_SUFFIXES):
            with opener(path, "rt", encoding="utf-8") as file:
                records = _parse_json_list(file.read(), str(path))
            yield from ((f"{path}, record {number}", record) for number, record in enumerate(records, start=1))
        elif name.endswith(CSV_SUFFIXES):
            with open(path, encoding="utf-8", newline="") as file:
                reader = csv.DictReader(file)
                for row in reader:
                    yield f"{path}, line {reader.line_num}", row
        elif name.endswith(PARQUET_SUFFIXES):
            yield from _read_parquet(path)
        else:
            raise LlmkitError(f"{path}: unsupported file type; SFT data may be {', '.join(SFT_SUFFIXES)}")
    except (UnicodeDecodeError, *GZIP_ERRORS, csv.Error) as error:
        raise LlmkitError(f"{path} cannot be read ({error}): check that it is UTF-8 and its compression") from None


def _parse_json_list(text: str, origin: str) -> list:
    """A JSON array (a .json file's records, a CSV cell's chat messages); errors name the origin."""
    try:
        value = json.loads(text)
    except json.JSONDecodeError as error:
        raise LlmkitError(f"{origin}: not valid JSON ({error.msg} at line {error.lineno}); fix or delete it") from None
    if not isinstance(value, list):
        raise LlmkitError(f"{origin}: expected one JSON array of objects (or use .jsonl), found a {type(value).__name__}")
    return value


def _read_parquet(path: Path) -> Iterator[tuple[str, dict[str, Any]]]:
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        parquet = pq.ParquetFile(path)
    except (pa.ArrowException, OSError) as error:
        raise LlmkitError(f"{path} is not a readable Parquet file ({error}): check or re-export it") from None
    number = 0
    for batch in parquet.iter_batches(batch_size=PARQUET_BATCH_ROWS):
        for row in batch.to_pylist():
            yield f"{path}, row {number}", row
            number += 1


def parse_row(row: Mapping[str, Any] | str, fields: FieldMap, origin: str) -> SFTRecord:
    """Check one row (a mapping, or a JSONL line's text) and turn it into an SFTRecord; errors name row and field."""
    if isinstance(row, str):
        row = parse_object(row, origin)
    columns = ", ".join(map(str, row)) or "none"
    messages = row.get(fields.messages)
    if messages is not None:
        return SFTRecord(*_parse_messages(messages, fields.messages, origin), origin=origin)
    if row.get(fields.prompt) is not None or row.get(fields.completion) is not None:
        prompt = _text(row, fields.prompt, origin, columns, "prompt")
        return SFTRecord(_text(row, fields.completion, origin, columns, "completion"), instruction=prompt, origin=origin)
    output = _text(row, fields.output, origin, columns, "output")
    instruction = _text(row, fields.instruction, origin, columns, "instruction", required=False)
    text_input = _text(row, fields.input, origin, columns, "input", required=False)
    if not (instruction or text_input):
        raise LlmkitError(f"{origin}: no '{fields.instruction}' or '{fields.input}' text to prompt with (fields: "
                          f"{columns}); map yours with --fields.instruction NAME or --fields.input NAME")
    return SFTRecord(output, instruction, text_input, origin=origin)


def _text(row: Mapping[str, Any], name: str, origin: str, columns: str, role: str, required: bool = True) -> str:
    value = row.get(name)
    if value is None and not required:
        return ""
    if value is None:
        raise LlmkitError(f"{origin}: no field '{name}' (fields: {columns}); name the field that holds the {role} "
                          f"with --fields.{role} NAME")
    if not isinstance(value, str):
        raise LlmkitError(f"{origin}: field '{name}' holds a {type(value).__name__}, not text; fix the row")
    if required and not value.strip():
        raise LlmkitError(f"{origin}: field '{name}' is empty; an empty {role} teaches nothing: fill or drop the row "
                          "(or pass --skip_bad_rows true)")
    return value


def _parse_messages(messages: Any, name: str, origin: str) -> tuple[str, str, str, tuple[dict[str, str], ...]]:
    """(output, instruction, input, earlier messages) of a chat row; the last message must be the assistant's."""
    if isinstance(messages, str):  # CSV cells hold the list as JSON text
        messages = _parse_json_list(messages, f"{origin}, field '{name}'")
    if not isinstance(messages, list) or len(messages) < 2:
        raise LlmkitError(f"{origin}: field '{name}' must be a list of at least 2 messages [{{role, content}}, ...] "
                          "ending with the assistant reply")
    checked = []
    for index, message in enumerate(messages):
        if not (isinstance(message, Mapping) and isinstance(message.get("role"), str)
                and isinstance(message.get("content"), str)):  # fmt: skip
            raise LlmkitError(f"{origin}: {name}[{index}] must be an object with string 'role' and 'content'; "
                              f"got {message!r:.80}")
        checked.append({"role": message["role"], "content": message["content"]})
    if checked[-1]["role"] != "assistant" or not checked[-1]["content"].strip():
        raise LlmkitError(f"{origin}: the last message of '{name}' must be a non-empty 'assistant' reply (the text to "
                          f"learn); it is a {checked[-1]['role']!r} message")
    return checked[-1]["content"], "", "", tuple(checked[:-1])


def load_sft_records(
    paths: str | Path | Sequence[str | Path],
    field_map: FieldMap | None = None,
    skip_bad_rows: bool = False,
    limit: int | None = None,
    report: SFTReport | None = None,
) -> tuple[list[SFTRecord], SFTReport]:
    """Checked records of every file in order (at most `limit`); bad rows raise, or with `skip_bad_rows` are
    counted in the report and skipped."""
    fields, report = field_map or FieldMap(), report or SFTReport()
    records: list[SFTRecord] = []
    for path in [paths] if isinstance(paths, (str, Path)) else paths:
        for origin, row in read_rows(path):
            if limit is not None and len(records) >= limit:
                return records, report
            report.rows += 1
            try:
                records.append(parse_row(row, fields, origin))
            except LlmkitError as error:
                if not skip_bad_rows:
                    raise
                report.skip(str(error))
    if not records:
        raise LlmkitError(f"no usable rows in {paths}" + (f" (first problem: {report.errors[0]})" if report.errors else ""))
    return records, report


def builtin_dialogsum(split: str = "train", limit: int | None = None) -> list[SFTRecord]:
    """DialogSum (Chen et al. 2021, CC BY-NC-SA 4.0) read in place from the shared data (like llmkit.eval.builtin,
    not bundled: non-commercial share-alike). Dialogue -> `input`, summary -> `output` (test: the first reference)."""
    from llmkit.data.shared import shared_data_dir

    if split not in DIALOGSUM_SPLITS:
        raise LlmkitError(f"DialogSum has no split {split!r}; choose one of {', '.join(DIALOGSUM_SPLITS)}")
    path = shared_data_dir() / DIALOGSUM_DIR / DIALOGSUM_FILE.format(split=split)
    if not path.is_file():
        raise LlmkitError(f"{path} is missing from the shared data; restore it (see the folder's SOURCE.md)")
    summary = "summary1" if split == "test" else "summary"
    return load_sft_records(path, FieldMap(input="dialogue", output=summary), limit=limit)[0]


# ---- tokenizing ------------------------------------------------------------------------------------------------------


def tokenize_records(
    records: Sequence[SFTRecord],
    tokenizer: Tokenizer,
    template: Template = "alpaca",
    max_length: int = 1024,
    truncation: Truncation = "left",
    seed: int = 0,
    skip_bad_rows: bool = False,
    report: SFTReport | None = None,
) -> tuple[list[SFTExample], SFTReport]:
    """Render each record (record i with template phrasing (seed + i) mod n) and tokenize it into an SFTExample."""
    template, report = check_template(template), report or SFTReport()
    if max_length < 2:
        raise LlmkitError(f"--max_length {max_length} must be at least 2 (one prompt and one completion token)")
    if truncation not in ("left", "drop"):
        raise LlmkitError(f"truncation={truncation!r} must be 'left' (cut the prompt's start) or 'drop'")
    if tokenizer.eos_id is None:
        raise LlmkitError("the tokenizer has no EOS token, so completions cannot end: set tokenizer.eos_id")
    examples = []
    for row, record in enumerate(records):
        try:
            prompt, completion = render(record, template, row, seed, tokenizer)
        except LlmkitError as error:
            if not skip_bad_rows:
                raise
            report.skip(str(error))
            continue
        if len(completion) > max_length * tokenizer.max_token_chars:  # surely over max_length tokens: not tokenized
            report.dropped += 1
            continue
        prompt_ids, completion_ids = encode_pair(prompt, completion, tokenizer, chat=template == CHAT,
                                                 max_prompt_tokens=max_length)
        if len(prompt_ids) + len(completion_ids) > max_length:
            bos = 1 if prompt_ids[:1] == [tokenizer.bos_id] else 0
            room = max_length - len(completion_ids) - bos  # prompt tokens that fit after BOS
            if truncation == "drop" or room < 1:
                report.dropped += 1
                continue
            prompt_ids = prompt_ids[:bos] + prompt_ids[len(prompt_ids) - room:]
            report.truncated += 1
        examples.append(SFTExample(prompt_ids + completion_ids, [IGNORE_INDEX] * len(prompt_ids) + completion_ids))
    report.examples += len(examples)
    if not examples:
        raise LlmkitError(f"no example is left of {len(records):,} records ({report.dropped:,} longer than "
                          f"--max_length {max_length}, {report.skipped:,} bad): raise --max_length or check the data")
    return examples, report


def encode_pair(
    prompt: str, completion: str, tokenizer: Tokenizer, chat: bool = False, max_prompt_tokens: int | None = None
) -> tuple[list[int], list[int]]:
    """Prompt ids (BOS by the model's rule) and completion ids ending with EOS. A chat completion already holds the
    template's end-of-turn token: when that is EOS, whatever the template writes after it is cut. With
    `max_prompt_tokens`, only the prompt's last ids matter (it is cut from the left later): a long prompt (a 48 MB
    instruction peaked at 7.5 GB) is cut to its tail before tokenizing, keeping at least that many tokens, which
    are then the same ids as the whole prompt's last ones."""
    bos_text = tokenizer.id_to_token(tokenizer.bos_id) if tokenizer.bos_id is not None else None
    wrote_bos = bool(chat and bos_text and prompt.startswith(bos_text))
    add_bos = False if wrote_bos else None  # the template wrote BOS itself
    prompt_ids = _encode_prompt(prompt, tokenizer, add_bos, max_prompt_tokens, tokenizer.bos_id if wrote_bos else None)
    completion_ids = tokenizer.encode(completion, add_bos=False)
    if chat and tokenizer.eos_id in completion_ids:
        last = len(completion_ids) - 1 - completion_ids[::-1].index(tokenizer.eos_id)
        return prompt_ids, completion_ids[: last + 1]
    return prompt_ids, completion_ids + [tokenizer.eos_id]


def _encode_prompt(
    prompt: str, tokenizer: Tokenizer, add_bos: bool | None, max_tokens: int | None, written_bos: int | None
) -> list[int]:
    """The prompt's ids; when only its last `max_tokens` matter, tokenized from a tail of the text that surely holds
    them (BOS first as the whole prompt would have it)."""
    from llmkit.tokenizer import text_tail

    if max_tokens is None or len(prompt) <= max_tokens * tokenizer.max_token_chars:
        return tokenizer.encode(prompt, add_bos=add_bos)
    tail = text_tail(prompt, max_tokens * tokenizer.max_token_chars)
    ids = tokenizer.encode(tail, add_bos=add_bos)
    if len(ids) <= max_tokens:  # the cut fell late (few spaces): the whole text decides
        return tokenizer.encode(prompt, add_bos=add_bos)
    return ids if written_bos is None else [written_bos, *ids]


def load_sft_dataset(
    paths: str | Path | Sequence[str | Path],
    tokenizer: Tokenizer,
    template: Template = "alpaca",
    field_map: FieldMap | None = None,
    max_length: int = 1024,
    truncation: Truncation = "left",
    seed: int = 0,
    skip_bad_rows: bool = False,
    limit: int | None = None,
) -> tuple[list[SFTExample], SFTReport]:
    """Read, check, render and tokenize SFT files in one call: (examples, report of rows, skips, truncations)."""
    records, report = load_sft_records(paths, field_map, skip_bad_rows, limit)
    return tokenize_records(records, tokenizer, template, max_length, truncation, seed, skip_bad_rows, report)


# ---- safety rules ----------------------------------------------------------------------------------------------------

FIELD_JOINER = "\x00"  # joins a record's fields into one document for the safety pass; no PII pattern spans it


def filter_records(records: Sequence[SFTRecord], safety: SafetyRules) -> tuple[list[SFTRecord], FilterReport]:
    """The records that pass the safety rules (llmkit/data/safety.py), redacted where PII is redacted, and the report.

    A record is checked as one document (its instruction, input, messages and output joined by NUL): a harmful one
    is dropped whole, and PII is redacted in every field.
    """
    document_filter = DocumentFilter(None, exact_dedup=False, near_dedup=False, safety=safety)
    kept = []
    for record in records:
        parts = [record.instruction, record.input, *(message.get("content", "") for message in record.messages),
                 record.output]
        reason, text = document_filter.process(FIELD_JOINER.join(parts))
        if reason is not None:
            continue
        redacted = text.split(FIELD_JOINER)
        if len(redacted) != len(parts):  # a field held NUL, or a finding spanned two fields: redact each field alone
            finder = document_filter.safety.pii if document_filter.safety is not None else None
            redacted = [redact(part, finder.find(part)) if finder is not None else part for part in parts]
        instruction, input_text, *contents, output = redacted
        messages = tuple({**message, "content": content} for message, content in zip(record.messages, contents))
        kept.append(dataclasses.replace(record, instruction=instruction, input=input_text, messages=messages,
                                        output=output))
    return kept, document_filter.report
