"""The SQLite half of a retrieval index: documents, chunks, settings and an FTS5 table for BM25.

One file, `index.sqlite`, in the index folder (Python's standard sqlite3; FTS5 is built into the SQLite it ships):

    meta(key, value)                      embedding model, dims, chunk settings, the vectors file and its sha256
    documents(id, title, hash, text)      hash = sha256 of title + text: an unchanged document is never re-embedded
    chunks(id, doc_id, position, char_start, char_end, token_start, token_end, text)
    chunks_fts(text)                      FTS5 (porter stemming), rowid = chunk id, ranked with bm25()

Chunk ids are AUTOINCREMENT, never reused, and are also the vectors' ids in the faiss file.
"""

from __future__ import annotations

import re
import sqlite3
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from llmkit.apps.chunking import Chunk, Document
from llmkit.errors import LlmkitError

SQLITE_FILE = "index.sqlite"
SCHEMA = """
CREATE TABLE meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE documents (id TEXT PRIMARY KEY, title TEXT NOT NULL, hash TEXT NOT NULL, text TEXT NOT NULL);
CREATE TABLE chunks (id INTEGER PRIMARY KEY AUTOINCREMENT, doc_id TEXT NOT NULL REFERENCES documents(id),
                     position INTEGER NOT NULL, char_start INTEGER NOT NULL, char_end INTEGER NOT NULL,
                     token_start INTEGER NOT NULL, token_end INTEGER NOT NULL, text TEXT NOT NULL);
CREATE INDEX chunks_by_document ON chunks(doc_id);
CREATE VIRTUAL TABLE chunks_fts USING fts5(text, tokenize='porter unicode61');
"""
WORD = re.compile(r"\w+", re.UNICODE)


@dataclass(frozen=True)
class StoredChunk:
    """A chunk as retrieval returns it: ids, the document's title, the exact text and its place in the document."""

    id: int
    doc_id: str
    title: str
    position: int
    char_start: int
    char_end: int
    text: str


def connect(folder: Path, create: bool = False) -> sqlite3.Connection:
    """The index's database; with `create`, a new one with the schema. A file that is not an llmkit index is one
    clear error naming it."""
    path = folder / SQLITE_FILE
    if not create and not path.is_file():
        raise LlmkitError(f"{path} does not exist: {folder} is not an llmkit index; build one with "
                          f"`llmkit rag index --docs DOCS --output {folder}`")
    connection = sqlite3.connect(path, isolation_level=None)  # transactions are explicit (BEGIN ... COMMIT)
    try:
        if create:
            connection.executescript(SCHEMA)
        connection.execute("SELECT count(*) FROM meta").fetchone()
        connection.execute("SELECT count(*) FROM chunks_fts").fetchone()
    except sqlite3.DatabaseError as error:
        connection.close()
        raise LlmkitError(f"{path} is not a readable llmkit index ({error}); delete the folder and build it again "
                          "with `llmkit rag index`") from None
    return connection


def read_meta(connection: sqlite3.Connection) -> dict[str, str]:
    return dict(connection.execute("SELECT key, value FROM meta").fetchall())


def write_meta(connection: sqlite3.Connection, values: dict[str, str]) -> None:
    connection.executemany("INSERT OR REPLACE INTO meta (key, value) VALUES (?, ?)", list(values.items()))


def document_hashes(connection: sqlite3.Connection) -> dict[str, str]:
    """id -> content hash of every stored document."""
    return dict(connection.execute("SELECT id, hash FROM documents").fetchall())


def count_chunks(connection: sqlite3.Connection) -> int:
    return connection.execute("SELECT count(*) FROM chunks").fetchone()[0]


def insert_document(connection: sqlite3.Connection, document: Document, chunks: Sequence[Chunk]) -> list[int]:
    """Store a document and its chunks (and their FTS5 rows); the new chunk ids, in order."""
    connection.execute("INSERT INTO documents (id, title, hash, text) VALUES (?, ?, ?, ?)",
                       (document.id, document.title, document.content_hash, document.text))
    ids = []
    for chunk in chunks:
        cursor = connection.execute(
            "INSERT INTO chunks (doc_id, position, char_start, char_end, token_start, token_end, text) "
            "VALUES (?, ?, ?, ?, ?, ?, ?)",
            (chunk.doc_id, chunk.position, chunk.start, chunk.end, chunk.token_start, chunk.token_end, chunk.text))
        ids.append(cursor.lastrowid)
        connection.execute("INSERT INTO chunks_fts (rowid, text) VALUES (?, ?)", (cursor.lastrowid, chunk.text))
    return ids


def delete_document(connection: sqlite3.Connection, doc_id: str) -> list[int]:
    """Remove a document, its chunks and their FTS5 rows; the removed chunk ids."""
    ids = [row[0] for row in connection.execute("SELECT id FROM chunks WHERE doc_id = ?", (doc_id,))]
    connection.executemany("DELETE FROM chunks_fts WHERE rowid = ?", [(i,) for i in ids])
    connection.execute("DELETE FROM chunks WHERE doc_id = ?", (doc_id,))
    connection.execute("DELETE FROM documents WHERE id = ?", (doc_id,))
    return ids


def chunks_by_id(connection: sqlite3.Connection, ids: Sequence[int]) -> dict[int, StoredChunk]:
    """The stored chunks with these ids (missing ids are left out)."""
    found: dict[int, StoredChunk] = {}
    for start in range(0, len(ids), 500):  # SQLite caps the number of bound parameters
        part = [int(i) for i in ids[start:start + 500]]
        rows = connection.execute(
            "SELECT c.id, c.doc_id, d.title, c.position, c.char_start, c.char_end, c.text FROM chunks c "
            f"JOIN documents d ON d.id = c.doc_id WHERE c.id IN ({','.join('?' * len(part))})", part)
        found.update({row[0]: StoredChunk(*row) for row in rows})
    return found


def fts_query(text: str) -> str | None:
    """User text as a safe FTS5 query: each word quoted (so AND, NEAR, *, quotes and column filters are plain
    words) and joined with OR, so bm25() ranks chunks by the words they share; None when the text has no word."""
    words = WORD.findall(text.lower())
    return " OR ".join(f'"{word}"' for word in dict.fromkeys(words)) or None


def bm25_search(connection: sqlite3.Connection, text: str, k: int) -> list[tuple[int, float]]:
    """(chunk id, BM25 score) of the k best chunks for `text`, best first. SQLite's bm25() (k1 = 1.2, b = 0.75)
    is lower for better matches; the score returned is its negation, so higher is better, as for the dense search."""
    query = fts_query(text)
    if query is None:
        return []
    rows = connection.execute("SELECT rowid, bm25(chunks_fts) AS rank FROM chunks_fts WHERE chunks_fts MATCH ? "
                              "ORDER BY rank, rowid LIMIT ?", (query, k))
    return [(rowid, -rank) for rowid, rank in rows]
