"""Text sources: every file format, folder expansion, and the errors that name file, line and field."""

from __future__ import annotations

import hashlib
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from llmkit.data.sources import BUILTIN_CORPUS, builtin_corpus_path, expand_inputs, fingerprint_inputs, read_documents
from llmkit.errors import LlmkitError
from tests.helpers import write_jsonl

UPSTREAM_SHAKESPEARE_SHA256 = "86c4e6aa9db7c042ec79f339dcb96d42b0075e16b8fc2e86bf0ca57e2dc565ed"  # char-rnn input.txt
DOCUMENTS = ["First document.\nWith two lines.", "Ünïcödé 日本語 🤖", "third\n\n\nhas separators inside", "  spaces  "]


def test_text_file_is_one_document_or_split_on_separator(tmp_path: Path) -> None:
    path = tmp_path / "book.txt"
    path.write_text("chapter one\n\n\nchapter two\n\n\n\n\n\nchapter three", encoding="utf-8")
    assert list(read_documents([path])) == [path.read_text(encoding="utf-8")]
    # empty pieces between two separators in a row are dropped
    assert list(read_documents([path], document_separator="\n\n\n")) == ["chapter one", "chapter two", "chapter three"]
    markdown = tmp_path / "notes.md"
    markdown.write_text("# Title\n\nbody", encoding="utf-8")
    assert list(read_documents([markdown])) == ["# Title\n\nbody"]


def test_jsonl_plain_and_gzip_with_text_field(tmp_path: Path) -> None:
    records = [{"content": text, "id": index} for index, text in enumerate(DOCUMENTS)]
    plain = write_jsonl(tmp_path / "a.jsonl", records)
    compressed = write_jsonl(tmp_path / "b.jsonl.gz", records, compress=True)
    assert list(read_documents([plain], text_field="content")) == DOCUMENTS
    assert list(read_documents([compressed, plain], text_field="content")) == DOCUMENTS + DOCUMENTS


def test_parquet_reads_every_row_group_in_order(tmp_path: Path) -> None:
    texts = [f"row {index} {DOCUMENTS[index % len(DOCUMENTS)]}" for index in range(2500)]
    path = tmp_path / "corpus.parquet"
    pq.write_table(pa.table({"id": list(range(len(texts))), "body": texts}), path, row_group_size=700)
    assert pq.ParquetFile(path).num_row_groups == 4  # the reader has to walk several row groups
    assert list(read_documents([path], text_field="body")) == texts


def test_folder_expands_to_supported_files_sorted(tmp_path: Path) -> None:
    (tmp_path / "sub").mkdir()
    (tmp_path / "b.txt").write_text("bee", encoding="utf-8")
    (tmp_path / "a.txt").write_text("ay", encoding="utf-8")
    write_jsonl(tmp_path / "sub" / "c.jsonl", [{"text": "sea"}])
    (tmp_path / "image.png").write_bytes(b"\x89PNG")  # unsupported: skipped inside a folder
    (tmp_path / ".hidden.txt").write_text("skip me", encoding="utf-8")  # hidden: skipped (temp files, .git)
    assert [path.name for path in expand_inputs([tmp_path])] == ["a.txt", "b.txt", "c.jsonl"]
    assert list(read_documents([tmp_path])) == ["ay", "bee", "sea"]


def test_malformed_jsonl_line_names_file_line_and_field(tmp_path: Path) -> None:
    path = tmp_path / "bad.jsonl"
    path.write_text('{"text": "fine"}\n\n{"text": "broken"\n', encoding="utf-8")
    documents = read_documents([path])
    assert next(documents) == "fine"
    with pytest.raises(LlmkitError, match=r"bad\.jsonl, line 3: not valid JSON .*string field 'text'.*fix or delete"):
        next(documents)


def test_jsonl_missing_or_non_string_field(tmp_path: Path) -> None:
    path = write_jsonl(tmp_path / "fields.jsonl", [{"text": "ok"}, {"body": "no text field"}])
    with pytest.raises(LlmkitError, match=r"fields\.jsonl, line 2: no string field 'text' \(fields: body\).*--text_field"):
        list(read_documents([path]))
    numbers = write_jsonl(tmp_path / "numbers.jsonl", [{"text": 7}])
    with pytest.raises(LlmkitError, match=r"numbers\.jsonl, line 1: field 'text' holds a int, not a string; pass --text"):
        list(read_documents([numbers]))
    array = write_jsonl(tmp_path / "array.jsonl", [["text"]])
    with pytest.raises(LlmkitError, match=r"array\.jsonl, line 1: holds a JSON list, not an object; .*string field 'text'"):
        list(read_documents([array]))


def test_parquet_missing_column_lists_available_columns(tmp_path: Path) -> None:
    path = tmp_path / "table.parquet"
    pq.write_table(pa.table({"title": ["a"], "body": ["b"], "score": [1]}), path)
    with pytest.raises(LlmkitError, match=r"table\.parquet has no column 'text' \(columns: title, body, score\)"):
        list(read_documents([path]))
    with pytest.raises(LlmkitError, match=r"column 'score' holds int64, not text"):
        list(read_documents([path], text_field="score"))
    nulls = tmp_path / "nulls.parquet"
    pq.write_table(pa.table({"text": ["a", None]}), nulls)
    with pytest.raises(LlmkitError, match=r"nulls\.parquet, row 1: column 'text' is null"):
        list(read_documents([nulls]))


def test_bad_paths(tmp_path: Path) -> None:
    with pytest.raises(LlmkitError, match=r"input .*missing\.txt does not exist"):
        list(read_documents([tmp_path / "missing.txt"]))
    (tmp_path / "table.csv").write_text("a,b\n", encoding="utf-8")
    with pytest.raises(LlmkitError, match=r"table\.csv: unsupported file type; llmkit reads \.txt, \.md, \.jsonl"):
        list(read_documents([tmp_path / "table.csv"]))
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(LlmkitError, match=r"folder .*empty holds no \.txt"):
        list(read_documents([empty]))
    with pytest.raises(LlmkitError, match="no input files given"):
        list(read_documents([]))
    latin1 = tmp_path / "latin1.txt"
    latin1.write_bytes("café".encode("latin-1"))
    with pytest.raises(LlmkitError, match=r"latin1\.txt is not UTF-8 text.*iconv"):
        list(read_documents([latin1]))


def test_fingerprints_and_builtin_corpus(tmp_path: Path) -> None:
    path = tmp_path / "a.txt"
    path.write_bytes(b"hello")
    assert fingerprint_inputs([tmp_path]) == [
        {"path": str(path.resolve()), "size": 5, "sha256": hashlib.sha256(b"hello").hexdigest()}
    ]
    path.write_bytes(b"hello, changed")  # a new size and mtime: hashed again, not served from the cache
    assert fingerprint_inputs([path])[0]["sha256"] == hashlib.sha256(b"hello, changed").hexdigest()
    assert builtin_corpus_path() == BUILTIN_CORPUS
    assert fingerprint_inputs([BUILTIN_CORPUS])[0]["sha256"] == UPSTREAM_SHAKESPEARE_SHA256  # byte-for-byte upstream
