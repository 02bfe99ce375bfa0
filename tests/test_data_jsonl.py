"""The one JSONL reader (llmkit.data.jsonl): line numbers across blank lines and gzip, and one readable error naming
file and line for every kind of bad input -- also through the `augment` and `evaluate` verbs, which printed a
traceback for a non-UTF-8 or damaged .gz file before they used it."""

from __future__ import annotations

import gzip
import re
from pathlib import Path

import pytest

from llmkit.data.jsonl import parse_object, read_jsonl, read_lines
from llmkit.errors import LlmkitError
from tests.helpers import run_cli, write_jsonl

GZIP_HEADER = bytes([0x1F, 0x8B, 8, 0, 0, 0, 0, 0, 0, 0xFF])  # magic, deflate, no flags, no time, unknown OS


def test_rows_come_with_their_line_numbers_plain_and_gzip(tmp_path):
    rows = [{"a": 1}, "", "   ", {"a": "ü"}]
    for path in (write_jsonl(tmp_path / "rows.jsonl", rows), write_jsonl(tmp_path / "rows.jsonl.gz", rows, compress=True)):
        assert list(read_jsonl(path)) == [(1, {"a": 1}), (4, {"a": "ü"})]


def test_windows_line_ends_and_a_byte_order_mark_are_read(tmp_path):
    path = tmp_path / "windows.jsonl"
    path.write_bytes(b'\xef\xbb\xbf{"a": 1}\r\n{"a": 2}\r\n')
    assert list(read_jsonl(path)) == [(1, {"a": 1}), (2, {"a": 2})]


def test_the_file_is_streamed_not_read_whole(tmp_path):
    path = write_jsonl(tmp_path / "rows.jsonl", [{"a": 1}, "{broken"])
    rows = read_jsonl(path)
    assert next(rows) == (1, {"a": 1})  # the bad line 2 is not read yet
    with pytest.raises(LlmkitError, match=r"rows\.jsonl, line 2: not valid JSON"):
        next(rows)


@pytest.mark.parametrize(
    "line, fields, message",
    [
        ('{"a": 1', (), r"w, line 3: not valid JSON \(Expecting ',' delimiter at column 8\); each line must be one "
                       r"JSON object: fix or delete that line"),
        ("[1, 2]", ("text",), r"w, line 3: holds a JSON list, not an object; each line must be one JSON object with "
                              r"a string field 'text'$"),
        ("7", ("a", "b"), r"w, line 3: holds a JSON int, not an object; each line must be one JSON object with string "
                          r"fields 'a', 'b'$"),
        ('{"body": "x"}', ("text",), r"w, line 3: no string field 'text' \(fields: body\); HINT$"),
        ("{}", ("text",), r"w, line 3: no string field 'text' \(fields: none\); HINT$"),
        ('{"text": null}', ("text",), r"w, line 3: field 'text' holds a NoneType, not a string; HINT$"),
    ],
)
def test_parse_errors_name_the_place_the_problem_and_the_fix(line, fields, message):
    with pytest.raises(LlmkitError, match=message):
        parse_object(line, "w, line 3", fields, hint="HINT")


def test_a_good_row_with_its_fields_passes():
    assert parse_object('{"text": "t", "n": 2}', "w, line 1", ("text",)) == {"text": "t", "n": 2}


def bad_files(directory: Path) -> dict[str, tuple[Path, str]]:
    """name -> (file, the message it must give): each kind of unreadable JSONL."""
    latin1 = directory / "latin1.jsonl"
    latin1.write_bytes(b'{"text": "fine"}\n{"text": "caf\xe9"}\n')
    not_gzip = write_jsonl(directory / "plain.jsonl.gz", [{"text": "not compressed"}])
    truncated = write_jsonl(directory / "truncated.jsonl.gz", [{"text": f"row {n}"} for n in range(2000)], compress=True)
    truncated.write_bytes(truncated.read_bytes()[:200])
    corrupt = directory / "corrupt.jsonl.gz"
    corrupt.write_bytes(GZIP_HEADER + b"\xff" * 32)  # a deflate block of the reserved type 3: zlib.error
    latin1_gz = directory / "latin1.jsonl.gz"
    latin1_gz.write_bytes(gzip.compress(b'{"text": "\xe9t\xe9"}\n'))
    return {
        "latin1": (latin1, r"latin1\.jsonl, line 2: not UTF-8 \(invalid continuation byte at byte 13 of the line\); "
                           r"convert the file"),
        "latin1_gz": (latin1_gz, r"latin1\.jsonl\.gz, line 1: not UTF-8"),
        "not_gzip": (not_gzip, r"plain\.jsonl\.gz, line 1: damaged gzip data \(Not a gzipped file"),
        "truncated": (truncated, r"truncated\.jsonl\.gz, line \d+: damaged gzip data \(Compressed file ended"),
        "corrupt": (corrupt, r"corrupt\.jsonl\.gz, line 1: damaged gzip data \(.*invalid block type"),
    }


@pytest.mark.parametrize("kind", ["latin1", "latin1_gz", "not_gzip", "truncated", "corrupt"])
def test_unreadable_files_give_one_error_naming_file_and_line(tmp_path, kind):
    path, message = bad_files(tmp_path)[kind]
    with pytest.raises(LlmkitError, match=message):
        list(read_lines(path))


def test_a_missing_file_or_a_folder_is_named(tmp_path):
    with pytest.raises(LlmkitError, match=r"missing\.jsonl does not exist: check the path"):
        list(read_lines(tmp_path / "missing.jsonl"))
    with pytest.raises(LlmkitError, match=r"is a folder, not a file"):
        list(read_lines(tmp_path))


def task_spec(directory: Path, data: Path) -> Path:
    spec = directory / "task.yaml"
    spec.write_text(f"name: t\nkind: generation\nprompt: '{{{{ text }}}}'\ntarget: text\ndata: {data.name}\n")
    return spec


@pytest.mark.parametrize("verb", ["augment", "evaluate"])
@pytest.mark.parametrize("kind", ["latin1", "not_gzip", "truncated", "corrupt"])
def test_verbs_reading_jsonl_print_one_line_and_exit_2_on_unreadable_files(tmp_path, capsys, verb, kind):
    path, message = bad_files(tmp_path)[kind]
    if verb == "augment":
        argv = ["augment", "--data", str(path), "--output", str(tmp_path / "out.jsonl"), "--text_field", "text"]
    else:
        argv = ["evaluate", "--model", str(tmp_path / "unused"), "--tasks", str(task_spec(tmp_path, path)),
                "--output", str(tmp_path / "eval")]  # fmt: skip
    code, _, err = run_cli(capsys, *argv)
    assert code == 2
    assert err.startswith("error: ") and err.count("\n") == 1 and "Traceback" not in err
    assert re.search(message, err)
    assert not (tmp_path / "out.jsonl").exists() and not (tmp_path / "eval").exists()
