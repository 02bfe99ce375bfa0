"""A persistent, incrementally updated retrieval index: a folder with SQLite (documents, chunks, BM25) and faiss
(one unit vector per chunk, exact inner-product search: `IndexIDMap2(IndexFlatIP)`, ids = chunk ids).

    index = RagIndex.open_or_create(folder, embedder, ChunkSettings())
    report = index.update(documents)          # embeds only new and changed documents (content hash)
    index.remove(["doc-id"])                  # drops their chunks from SQLite, FTS5 and faiss

Writes are atomic across the two files. Each update writes the faiss index to a new file `vectors-<stamp>.faiss`
(through a temporary and a rename), then commits the SQLite transaction that records that file's name and sha256,
then deletes the previous file. A crash at any point leaves the SQLite record naming a complete vectors file that
matches it; opening an index checks the file exists, has that sha256, and holds one vector per chunk of the model's
dims, and names the file and the fix otherwise.
"""

from __future__ import annotations

import hashlib
import sqlite3
import uuid
from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

import faiss
import numpy as np

from llmkit.apps import store
from llmkit.apps.chunking import ChunkSettings, Document, chunk_document
from llmkit.apps.embedder import Embedder
from llmkit.errors import LlmkitError
from llmkit.io import atomic_write

FORMAT = "llmkit-rag-1"
VECTORS_GLOB = "vectors-*.faiss"
EMBED_GROUP = 512  # chunks embedded per call (sorted by length first, so each group pads little); one progress step


@dataclass(frozen=True)
class UpdateReport:
    """What one update did: documents added, replaced (content changed), removed, left as they were; chunks embedded."""

    added: int = 0
    replaced: int = 0
    removed: int = 0
    unchanged: int = 0
    chunks_embedded: int = 0


class RagIndex:
    """An index folder opened with the embedder it was built with; `connection` and `vectors` are its two stores."""

    def __init__(self, folder: Path, connection: sqlite3.Connection, vectors: faiss.Index, embedder: Embedder,
                 chunking: ChunkSettings) -> None:
        self.folder, self.connection, self.vectors = folder, connection, vectors
        self.embedder, self.chunking = embedder, chunking

    # ---- opening ----------------------------------------------------------------------------------------------

    @classmethod
    def create(cls, folder: str | Path, embedder: Embedder, chunking: ChunkSettings) -> RagIndex:
        """A new, empty index in `folder` (which must not hold one already)."""
        folder = Path(folder)
        if (folder / store.SQLITE_FILE).exists():
            raise LlmkitError(f"{folder} already holds an index; open it to update it, or choose another folder")
        if chunking.max_tokens > embedder.max_tokens:
            raise LlmkitError(f"--max_tokens {chunking.max_tokens} is more than the {embedder.max_tokens} tokens "
                              f"{embedder.name} reads; pass --max_tokens {embedder.max_tokens} or less")
        chunking.window(embedder.tokenizer.backend.num_special_tokens_to_add(False))  # checks the settings
        folder.mkdir(parents=True, exist_ok=True)
        connection = store.connect(folder, create=True)
        index = cls(folder, connection, faiss.IndexIDMap2(faiss.IndexFlatIP(embedder.dims)), embedder, chunking)
        connection.execute("BEGIN IMMEDIATE")
        store.write_meta(connection, {"format": FORMAT, "model": embedder.name, "model_source": embedder.source,
                                      "dims": str(embedder.dims), "tokenizer": embedder.tokenizer.fingerprint,
                                      "max_tokens": str(chunking.max_tokens), "overlap": str(chunking.overlap)})
        index._commit_vectors()
        return index

    @classmethod
    def open(cls, folder: str | Path, embedder: Embedder) -> RagIndex:
        """The index in `folder`, checked against `embedder` and its vectors file."""
        folder = Path(folder)
        connection = store.connect(folder)
        try:
            meta = store.read_meta(connection)
            _check_model(folder, meta, embedder)
            vectors = _read_vectors(folder, meta, store.count_chunks(connection))
        except BaseException:
            connection.close()
            raise
        chunking = ChunkSettings(int(meta["max_tokens"]), int(meta["overlap"]))
        return cls(folder, connection, vectors, embedder, chunking)

    @classmethod
    def open_or_create(cls, folder: str | Path, embedder: Embedder, chunking: ChunkSettings | None = None) -> RagIndex:
        """The index in `folder` (whose chunk settings must equal `chunking` when given), or a new one."""
        if not (Path(folder) / store.SQLITE_FILE).exists():
            return cls.create(folder, embedder, chunking or ChunkSettings())
        index = cls.open(folder, embedder)
        if chunking is not None and chunking != index.chunking:
            index.close()
            raise LlmkitError(f"{folder} was built with --max_tokens {index.chunking.max_tokens} --overlap "
                              f"{index.chunking.overlap}; pass the same values (or none), or build a new index")
        return index

    def close(self) -> None:
        self.connection.close()

    def __enter__(self) -> RagIndex:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # ---- reading ----------------------------------------------------------------------------------------------

    def __len__(self) -> int:
        """Number of chunks."""
        return self.vectors.ntotal

    def document_ids(self) -> list[str]:
        return sorted(store.document_hashes(self.connection))

    # ---- writing ----------------------------------------------------------------------------------------------

    def update(self, documents: Iterable[Document], progress: bool = False) -> UpdateReport:
        """Add new documents, replace changed ones (same id, other content), leave unchanged ones as they are (stored
        documents not passed stay too: `remove` removes)."""
        stored, documents = store.document_hashes(self.connection), list(documents)
        repeated = [doc_id for doc_id, n in Counter(doc.id for doc in documents).items() if n > 1]
        if repeated:
            raise LlmkitError(f"document id {repeated[0]!r} is given twice; each document needs its own id")
        new = [doc for doc in documents if stored.get(doc.id) != doc.content_hash]
        if not new:
            return UpdateReport(unchanged=len(documents))
        chunks = [chunk_document(doc, self.embedder.tokenizer, self.chunking) for doc in new]
        flat = [chunk for doc_chunks in chunks for chunk in doc_chunks]
        vectors = self._embed([chunk.text for chunk in flat], progress)
        replaced = sum(doc.id in stored for doc in new)
        with self._transaction():
            self._drop([doc.id for doc in new if doc.id in stored])
            ids = [cid for doc, doc_chunks in zip(new, chunks)
                   for cid in store.insert_document(self.connection, doc, doc_chunks)]
            if ids:
                self.vectors.add_with_ids(vectors, np.asarray(ids, dtype=np.int64))
        return UpdateReport(added=len(new) - replaced, replaced=replaced, unchanged=len(documents) - len(new),
                            chunks_embedded=len(flat))

    def remove(self, doc_ids: Sequence[str]) -> UpdateReport:
        """Remove documents (their chunks leave SQLite, FTS5 and faiss); an unknown id is an error."""
        stored = store.document_hashes(self.connection)
        missing = [doc_id for doc_id in doc_ids if doc_id not in stored]
        if missing:
            raise LlmkitError(f"--delete {missing[0]!r}: no document with that id in {self.folder}; check the id "
                              "(a folder's documents are named by their path inside it, e.g. notes/a.md)")
        with self._transaction():
            self._drop(list(dict.fromkeys(doc_ids)))
        return UpdateReport(removed=len(set(doc_ids)))

    def _drop(self, doc_ids: Sequence[str]) -> None:
        """Delete documents' rows, then their vectors in one pass over the faiss index (each removal scans it)."""
        ids = [chunk_id for doc_id in doc_ids for chunk_id in store.delete_document(self.connection, doc_id)]
        if ids:
            self.vectors.remove_ids(np.asarray(ids, dtype=np.int64))

    def _embed(self, texts: list[str], progress: bool) -> np.ndarray:
        """(N, dims) unit vectors, embedded in groups of similar length (one progress step per group)."""
        from tqdm.auto import tqdm

        order = sorted(range(len(texts)), key=lambda i: len(texts[i]))
        vectors = np.zeros((len(texts), self.embedder.dims), dtype=np.float32)
        with tqdm(total=len(texts), desc="embedding chunks", unit="chunk", disable=not progress or None) as bar:
            for start in range(0, len(order), EMBED_GROUP):
                rows = order[start:start + EMBED_GROUP]
                vectors[rows] = self.embedder.embed([texts[i] for i in rows])
                bar.update(len(rows))
        return vectors

    def _transaction(self) -> _Transaction:
        return _Transaction(self)

    def _commit_vectors(self) -> None:
        """Write the vectors to a new file, record it in the open transaction, commit, drop the old file."""
        meta = store.read_meta(self.connection)
        name = f"vectors-{uuid.uuid4().hex[:16]}.faiss"
        path = self.folder / name
        atomic_write(path, lambda tmp: faiss.write_index(self.vectors, str(tmp)))
        try:
            store.write_meta(self.connection, {"vectors_file": name, "vectors_sha256": _sha256(path)})
            self.connection.execute("COMMIT")
        except BaseException:
            path.unlink(missing_ok=True)
            raise
        old = meta.get("vectors_file")
        if old and old != name:
            (self.folder / old).unlink(missing_ok=True)


class _Transaction:
    """BEGIN IMMEDIATE ... (SQLite changes and the matching in-memory faiss changes) ... vectors file + COMMIT.
    On an error the SQLite changes roll back and the faiss index is read again from its (unchanged) file."""

    def __init__(self, index: RagIndex) -> None:
        self.index = index

    def __enter__(self) -> None:
        self.index.connection.execute("BEGIN IMMEDIATE")

    def __exit__(self, kind: type | None, error: BaseException | None, trace: object) -> None:
        if kind is None:
            try:
                self.index._commit_vectors()
            except BaseException:
                self._undo()
                raise
        else:
            self._undo()

    def _undo(self) -> None:
        index = self.index
        if index.connection.in_transaction:
            index.connection.execute("ROLLBACK")
        meta = store.read_meta(index.connection)
        index.vectors = _read_vectors(index.folder, meta, store.count_chunks(index.connection))


def index_meta(folder: str | Path) -> dict[str, str]:
    """The settings an index folder records (model, model_source, dims, max_tokens, overlap, ...), without its
    vectors: what `rag ask` needs to load the right embedding model."""
    connection = store.connect(Path(folder))
    try:
        return store.read_meta(connection)
    finally:
        connection.close()


def _check_model(folder: Path, meta: dict[str, str], embedder: Embedder) -> None:
    """The index's embedding model must be `embedder`'s: same name, dims and tokenizer."""
    path = folder / store.SQLITE_FILE
    if meta.get("format") != FORMAT:
        raise LlmkitError(f"{path} is not an llmkit index of format {FORMAT} (format {meta.get('format')!r}); build "
                          "a new one with `llmkit rag index`")
    stored = (meta.get("model"), meta.get("dims"), meta.get("tokenizer"))
    if stored != (embedder.name, str(embedder.dims), embedder.tokenizer.fingerprint):
        source = meta.get("model_source") or "(the default)"
        raise LlmkitError(f"{path} was built with the embedding model {meta.get('model')} ({meta.get('dims')} dims), "
                          f"not {embedder.name} ({embedder.dims} dims): pass --model {source}, or build a new index "
                          "with this model")


def _read_vectors(folder: Path, meta: dict[str, str], n_chunks: int) -> faiss.Index:
    """The faiss index the SQLite record names, checked against its sha256, the dims and the chunk count."""
    path = folder / meta.get("vectors_file", "vectors.faiss")
    fix = f"delete {folder} and build the index again with `llmkit rag index`"
    if not path.is_file():
        raise LlmkitError(f"{path} is missing: the index's vectors are gone; {fix}")
    if _sha256(path) != meta.get("vectors_sha256"):
        raise LlmkitError(f"{path} does not match {folder / store.SQLITE_FILE} (sha256 differs): the file is "
                          f"damaged or from another index; {fix}")
    try:
        vectors = faiss.read_index(str(path))
    except RuntimeError as error:
        reason = str(error).strip().splitlines()[-1] if str(error).strip() else "unreadable"
        raise LlmkitError(f"{path} is not a readable faiss index ({reason}); {fix}") from None
    if vectors.d != int(meta["dims"]) or vectors.ntotal != n_chunks:
        raise LlmkitError(f"{path} holds {vectors.ntotal} vectors of {vectors.d} dims, but the index has {n_chunks} "
                          f"chunks of {meta['dims']} dims; {fix}")
    return vectors


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as file:
        for block in iter(lambda: file.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()

