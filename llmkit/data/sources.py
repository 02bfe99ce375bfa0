"""Text sources: read documents from .txt/.md, .jsonl(.gz) and .parquet files (or folders of them), one at a time,
so a corpus larger than memory streams through tokenizer training and `prepare`."""

from __future__ import annotations

import hashlib
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

from llmkit.data.jsonl import JSONL_SUFFIXES, read_jsonl
from llmkit.errors import LlmkitError

BUILTIN_CORPUS = Path(__file__).resolve().parent / "builtin" / "tinyshakespeare.txt"

TEXT_SUFFIXES = (".txt", ".md")
PARQUET_SUFFIXES = (".parquet",)
SUPPORTED_SUFFIXES = TEXT_SUFFIXES + JSONL_SUFFIXES + PARQUET_SUFFIXES
PARQUET_BATCH_ROWS = 1024  # rows per read from a Parquet file: memory stays one batch, whatever the file size
HASH_CHUNK_BYTES = 1 << 20

_sha256_cache: dict[tuple[str, int, int], str] = {}  # (path, size, mtime_ns) -> sha256: hash each file once per process


def builtin_corpus_path() -> Path:
    """The packaged Tiny Shakespeare text (1.1 MB, public domain): the corpus `llmkit prepare` uses by default."""
    if not BUILTIN_CORPUS.is_file():
        raise LlmkitError(f"the built-in corpus {BUILTIN_CORPUS} is missing: reinstall llmkit, or pass --data FILES")
    return BUILTIN_CORPUS


def expand_inputs(paths: Sequence[str | Path]) -> list[Path]:
    """Input files in order: each file as given, each folder's supported files (recursively, sorted, hidden ones skipped)."""
    if isinstance(paths, (str, Path)):
        paths = [paths]
    if not paths:
        raise LlmkitError("no input files given: pass one or more .txt, .md, .jsonl, .jsonl.gz or .parquet files or folders")
    files: list[Path] = []
    for path in map(Path, paths):
        if path.is_dir():
            found = sorted(
                file for file in path.rglob("*")
                if file.is_file() and _kind(file) is not None
                and not any(part.startswith(".") for part in file.relative_to(path).parts)
            )  # fmt: skip
            if not found:
                raise LlmkitError(f"folder {path} holds no {', '.join(SUPPORTED_SUFFIXES)} files: pass others")
            files.extend(found)
        elif path.is_file():
            if _kind(path) is None:
                raise LlmkitError(
                    f"{path}: unsupported file type; llmkit reads {', '.join(SUPPORTED_SUFFIXES)} "
                    "(convert it, e.g. to JSONL with one {\"text\": ...} object per line)"
                )
            files.append(path)
        else:
            raise LlmkitError(f"input {path} does not exist: check the path")
    return files


def read_documents(
    paths: Sequence[str | Path], text_field: str = "text", document_separator: str | None = None
) -> Iterator[str]:
    """Yield documents: a whole .txt/.md file (or its pieces between `document_separator`s, empty pieces skipped),
    the `text_field` string of each JSONL line, the `text_field` column of each Parquet row."""
    for path in expand_inputs(paths):
        kind = _kind(path)
        if kind == "text":
            yield from _read_text(path, document_separator)
        elif kind == "jsonl":
            yield from _read_jsonl(path, text_field)
        else:
            yield from _read_parquet(path, text_field)


def fingerprint_inputs(paths: Sequence[str | Path]) -> list[dict[str, Any]]:
    """[{path, size, sha256}] of every input file: `prepare` compares these to know when its shards are up to date."""
    fingerprints = []
    for path in expand_inputs(paths):
        resolved = path.resolve()
        stat = resolved.stat()
        fingerprints.append({"path": str(resolved), "size": stat.st_size, "sha256": file_sha256(resolved)})
    return fingerprints


def file_sha256(path: Path) -> str:
    """Hex sha256 of a file, read in chunks (cached per process by path, size and modification time)."""
    stat = path.stat()
    key = (str(path), stat.st_size, stat.st_mtime_ns)
    if key not in _sha256_cache:
        digest = hashlib.sha256()
        with open(path, "rb") as file:
            while chunk := file.read(HASH_CHUNK_BYTES):
                digest.update(chunk)
        _sha256_cache[key] = digest.hexdigest()
    return _sha256_cache[key]


# ---- readers -------------------------------------------------------------------------------------------------------


def _kind(path: Path) -> str | None:
    name = path.name.lower()
    for kind, suffixes in (("text", TEXT_SUFFIXES), ("jsonl", JSONL_SUFFIXES), ("parquet", PARQUET_SUFFIXES)):
        if name.endswith(suffixes):
            return kind
    return None


def _read_text(path: Path, document_separator: str | None) -> Iterator[str]:
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as error:
        raise LlmkitError(f"{path} is not UTF-8 text ({error}): convert it, e.g. `iconv -t UTF-8 {path}`") from None
    if document_separator is None:
        if text:
            yield text
        return
    if not document_separator:
        raise LlmkitError("document_separator is empty: pass a string such as '\\n\\n\\n', or leave it unset")
    yield from (document for document in text.split(document_separator) if document)


def _read_jsonl(path: Path, text_field: str) -> Iterator[str]:
    hint = "pass --text_field with the field that holds the text, or fix that line"
    for _, row in read_jsonl(path, fields=(text_field,), hint=hint):
        yield row[text_field]


def _read_parquet(path: Path, text_field: str) -> Iterator[str]:
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        parquet = pq.ParquetFile(path)
    except (pa.ArrowException, OSError) as error:
        raise LlmkitError(f"{path} is not a readable Parquet file ({error}): check or re-export it") from None
    columns = parquet.schema_arrow.names
    if text_field not in columns:
        raise LlmkitError(
            f"{path} has no column '{text_field}' (columns: {', '.join(columns)}): pass --text_field with the column "
            "that holds the text"
        )
    column_type = parquet.schema_arrow.field(text_field).type
    if not (pa.types.is_string(column_type) or pa.types.is_large_string(column_type)
            or getattr(pa.types, "is_string_view", lambda _: False)(column_type)):  # fmt: skip
        raise LlmkitError(f"{path}: column '{text_field}' holds {column_type}, not text: pass --text_field of a text column")
    row = 0
    for batch in parquet.iter_batches(batch_size=PARQUET_BATCH_ROWS, columns=[text_field]):
        for text in batch.column(0).to_pylist():
            if text is None:
                raise LlmkitError(f"{path}, row {row}: column '{text_field}' is null: drop or fill the empty rows")
            row += 1
            yield text
