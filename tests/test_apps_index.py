"""The retrieval index: incremental updates equal a rebuild, deletes reach both stores, dense search equals exact
numpy search, BM25 equals a hand-written Okapi BM25, corrupt or mismatched files give one clear error."""

from __future__ import annotations

import math
import re
import sqlite3
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch

from llmkit.apps import store
from llmkit.apps.chunking import ChunkSettings, Document, chunk_document
from llmkit.apps.embedder import Embedder
from llmkit.apps.index import RagIndex
from llmkit.apps.retrieve import reciprocal_rank_fusion, search
from llmkit.checkpoints import load_tokenizer
from llmkit.checkpoints.hf_bert import default_encoder_path
from llmkit.config import Config
from llmkit.data.jsonl import read_jsonl
from llmkit.data.shared import shared_data_file
from llmkit.errors import LlmkitError
from llmkit.models.encoder import Encoder, SentenceSettings

WIKI_FILE = "wiki_vital/summaries_en.jsonl.gz"
CHUNKING = ChunkSettings(max_tokens=48, overlap=8)  # small windows: most articles give several chunks


def tiny_embedder(seed: int = 0, name: str = "tiny-random-bert") -> Embedder:
    """A random 2-layer, 64-dim encoder over MiniLM's real WordPiece vocabulary: fast, deterministic vectors."""
    torch.manual_seed(seed)
    encoder = Encoder(Config.from_name("tiny-bert", vocab_size=30522)).eval()
    settings = SentenceSettings(normalize=True, max_tokens=64)
    return Embedder(encoder, load_tokenizer(default_encoder_path()), settings, name)


@pytest.fixture(scope="module")
def embedder() -> Embedder:
    return tiny_embedder()


@pytest.fixture(scope="module")
def articles() -> list[Document]:
    """40 real Wikipedia article summaries."""
    rows = [row for _, row in zip(range(40), read_jsonl(shared_data_file(WIKI_FILE)))]
    return [Document(row[1]["title"], row[1]["title"], row[1]["text"]) for row in rows]


QUERIES = ["the capital city of a country", "war and peace treaty", "music and painting", "planet orbit around sun"]


def results(index: RagIndex, method: str) -> list[list[tuple[str, str, float]]]:
    """(document, chunk text, rounded score) of the top 8 for each query: what a user sees, not internal ids."""
    return [[(hit.doc_id, hit.text, round(hit.score, 5)) for hit in search(index, query, 8, method)]
            for query in QUERIES]


def test_incremental_updates_equal_a_full_rebuild(tmp_path: Path, embedder: Embedder, articles: list[Document]):
    with RagIndex.create(tmp_path / "full", embedder, CHUNKING) as full:
        full.update(articles)
        expected = {method: results(full, method) for method in ("dense", "bm25", "hybrid")}
        n_chunks = len(full)
    stale = [Document(doc.id, doc.title, "An outdated text about " + doc.title) for doc in articles[10:20]]
    with RagIndex.create(tmp_path / "grown", embedder, CHUNKING) as grown:
        grown.update(articles[:10] + stale + [Document("Gone", "Gone", "A document deleted later.")])
    with RagIndex.open(tmp_path / "grown", embedder) as grown:  # reopened from disk between updates
        embedded: list[str] = []
        grown.embedder = Embedder(embedder.model, embedder.tokenizer, embedder.settings, embedder.name)
        grown.embedder.embed = lambda texts: (embedded.extend(texts), embedder.embed(texts))[1]
        report = grown.update(articles[:30])  # 10 unchanged, 10 replaced, 10 new
        assert (report.added, report.replaced, report.unchanged) == (10, 10, 10)
        changed = articles[10:30]
        n_changed = sum(len(chunk_document(doc, embedder.tokenizer, CHUNKING)) for doc in changed)
        assert len(embedded) == report.chunks_embedded == n_changed  # the unchanged ten are not embedded again
        assert all(any(text in doc.text for doc in changed) for text in embedded)
        grown.remove(["Gone"])
    with RagIndex.open(tmp_path / "grown", embedder) as grown:
        grown.update(articles)
        assert len(grown) == n_chunks
        assert grown.document_ids() == sorted(doc.id for doc in articles)
        for method, expected_results in expected.items():
            assert results(grown, method) == expected_results, method


def test_remove_drops_a_document_from_sqlite_fts_and_faiss(tmp_path: Path, embedder: Embedder,
                                                           articles: list[Document]) -> None:
    target = articles[3]
    with RagIndex.create(tmp_path, embedder, CHUNKING) as index:
        index.update(articles[:8])
        before = len(index)
        ids = [row[0] for row in index.connection.execute("SELECT id FROM chunks WHERE doc_id = ?", (target.id,))]
        assert len(ids) >= 2
        assert search(index, target.text[:200], 1, "dense")[0].doc_id == target.id
        index.remove([target.id])
        with pytest.raises(LlmkitError, match="--delete 'nope': no document with that id"):
            index.remove(["nope"])
    with RagIndex.open(tmp_path, embedder) as index:
        assert len(index) == before - len(ids)
        assert set(faiss_ids(index)).isdisjoint(ids)
        assert index.connection.execute(
            f"SELECT count(*) FROM chunks_fts WHERE rowid IN ({','.join('?' * len(ids))})", ids).fetchone()[0] == 0
        assert index.connection.execute("SELECT count(*) FROM chunks WHERE doc_id = ?", (target.id,)).fetchone()[0] == 0
        for method in ("dense", "bm25", "hybrid"):
            assert all(hit.doc_id != target.id for hit in search(index, target.text[:200], 20, method))


def faiss_ids(index: RagIndex) -> list[int]:
    import faiss

    return faiss.vector_to_array(index.vectors.id_map).tolist()


def test_dense_search_equals_exact_numpy_search(tmp_path: Path, embedder: Embedder, articles: list[Document]):
    with RagIndex.create(tmp_path, embedder, CHUNKING) as index:
        index.update(articles)
        rows = index.connection.execute("SELECT id, text FROM chunks ORDER BY id").fetchall()
        matrix = embedder.embed([text for _, text in rows])  # (N, 64) unit rows
        for query in QUERIES:
            scores = matrix @ embedder.embed([query])[0]  # cosine similarity, computed independently
            order = sorted(range(len(rows)), key=lambda i: (-scores[i], rows[i][0]))[:10]
            hits = search(index, query, 10, "dense")
            assert [hit.chunk_id for hit in hits] == [rows[i][0] for i in order]
            np.testing.assert_allclose([hit.score for hit in hits], scores[order], rtol=0, atol=1e-5)  # float32 sums


def okapi_bm25(docs: dict[int, list[str]], query: list[str], k1: float = 1.2, b: float = 0.75) -> dict[int, float]:
    """Okapi BM25 with FTS5's IDF, log((N - n + 0.5) / (n + 0.5)) floored at 1e-6, over tokenized documents."""
    n_docs, avgdl = len(docs), sum(map(len, docs.values())) / len(docs)
    frequency = Counter(word for words in docs.values() for word in set(words))
    scores = {}
    for doc_id, words in docs.items():
        counts, total = Counter(words), 0.0
        for word in set(query):
            idf = max(math.log((n_docs - frequency[word] + 0.5) / (frequency[word] + 0.5)), 1e-6)
            total += idf * counts[word] * (k1 + 1) / (counts[word] + k1 * (1 - b + b * len(words) / avgdl))
        if any(counts[word] for word in query):
            scores[doc_id] = total
    return scores


def test_bm25_equals_okapi_bm25_and_user_text_cannot_break_the_query(tmp_path: Path, embedder: Embedder) -> None:
    texts = ["apple banana apple", "banana cherry", "cherry apple date fig grape", "kiwi lime", "apple"]
    with RagIndex.create(tmp_path, embedder, CHUNKING) as index:
        index.update([Document(f"d{i}", f"d{i}", text) for i, text in enumerate(texts)])
        ids = dict(index.connection.execute("SELECT doc_id, id FROM chunks").fetchall())
        expected = okapi_bm25({ids[f"d{i}"]: text.split() for i, text in enumerate(texts)}, ["apple", "cherry"])
        hits = search(index, "Apple? cherry!", 5, "bm25")
        assert {hit.chunk_id: hit.score for hit in hits} == pytest.approx(expected, rel=1e-9)
        assert [hit.score for hit in hits] == sorted((hit.score for hit in hits), reverse=True)
        for hostile in ['"', 'apple AND NOT', 'text: NEAR(apple', '*', "apple OR) (", "'; DROP TABLE chunks; --"]:
            search(index, hostile, 3, "bm25")  # quoted word by word: never an FTS5 syntax error
        assert search(index, "?!", 3, "bm25") == []
        assert store.fts_query('say "NEAR" x*') == '"say" OR "near" OR "x"'


def test_reciprocal_rank_fusion_sums_inverse_ranks() -> None:
    fused = dict(reciprocal_rank_fusion([[(7, 0.9), (3, 0.8)], [(3, 12.0), (5, 4.0)]]))
    assert fused == pytest.approx({7: 1 / 61, 3: 1 / 62 + 1 / 61, 5: 1 / 62})
    assert [item for item, _ in reciprocal_rank_fusion([[(7, 0.9), (3, 0.8)], [(3, 12.0), (5, 4.0)]])] == [3, 7, 5]


@pytest.fixture
def built(tmp_path: Path, embedder: Embedder, articles: list[Document]) -> Path:
    with RagIndex.create(tmp_path / "index", embedder, CHUNKING) as index:
        index.update(articles[:5])
    return tmp_path / "index"


def vectors_file(folder: Path) -> Path:
    (path,) = folder.glob("vectors-*.faiss")
    return path


def test_a_damaged_vectors_file_is_named_with_the_fix(built: Path, embedder: Embedder) -> None:
    path = vectors_file(built)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(LlmkitError, match=re.escape(str(path)) + r" does not match .*index.sqlite.*build the index"):
        RagIndex.open(built, embedder)
    path.unlink()
    with pytest.raises(LlmkitError, match=re.escape(str(path)) + " is missing"):
        RagIndex.open(built, embedder)


def test_a_vectors_file_that_faiss_cannot_read_is_named(built: Path, embedder: Embedder) -> None:
    path = vectors_file(built)
    path.write_bytes(b"not a faiss index at all")
    connection = sqlite3.connect(built / store.SQLITE_FILE)
    from llmkit.apps.index import _sha256

    connection.execute("UPDATE meta SET value = ? WHERE key = 'vectors_sha256'", (_sha256(path),))
    connection.commit()
    connection.close()
    with pytest.raises(LlmkitError, match=re.escape(str(path)) + " is not a readable faiss index"):
        RagIndex.open(built, embedder)


def test_a_damaged_database_or_missing_index_is_named(built: Path, tmp_path: Path, embedder: Embedder) -> None:
    (built / store.SQLITE_FILE).write_bytes(b"garbage " * 100)
    with pytest.raises(LlmkitError, match=re.escape(str(built / store.SQLITE_FILE)) + " is not a readable llmkit"):
        RagIndex.open(built, embedder)
    with pytest.raises(LlmkitError, match="index.sqlite does not exist.*llmkit rag index"):
        RagIndex.open(tmp_path / "nowhere", embedder)


def test_an_index_of_another_embedding_model_is_refused(built: Path) -> None:
    with pytest.raises(LlmkitError, match="built with the embedding model tiny-random-bert .* not other-model"):
        RagIndex.open(built, tiny_embedder(seed=1, name="other-model"))
    with pytest.raises(LlmkitError, match="--max_tokens 48 --overlap 8"):
        RagIndex.open_or_create(built, tiny_embedder(), ChunkSettings(64, 8))


def test_a_failed_update_leaves_the_index_as_it_was(built: Path, embedder: Embedder, articles: list[Document]):
    with RagIndex.open(built, embedder) as index:
        before, files = len(index), sorted(built.iterdir())

        def failing_write(*_: object) -> None:
            raise OSError("disk full")

        import llmkit.apps.index as index_module

        original = index_module.faiss.write_index
        index_module.faiss.write_index = failing_write
        try:
            with pytest.raises(OSError, match="disk full"):
                index.update(articles[5:10])
        finally:
            index_module.faiss.write_index = original
        assert len(index) == before and index.document_ids() == sorted(doc.id for doc in articles[:5])
    assert sorted(built.iterdir()) == files
    with RagIndex.open(built, embedder) as index:
        assert len(index) == before
