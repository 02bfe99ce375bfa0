"""Retrieval from a RagIndex: dense (faiss), BM25 (SQLite FTS5) and hybrid (reciprocal rank fusion).

Dense: the query's unit vector q against each chunk's unit vector c, score = q . c (cosine similarity), exact
search over every chunk (faiss IndexFlatIP).

BM25 (Robertson & Zaragoza 2009), as SQLite FTS5's bm25() computes it with k1 = 1.2, b = 0.75:

    score(D, Q) = sum over query words w of  IDF(w) * f(w, D) * (k1 + 1) / (f(w, D) + k1 * (1 - b + b * |D| / avgdl))

Hybrid, reciprocal rank fusion (Cormack, Clarke & Buettcher 2009): each method ranks its top `candidates` chunks;
a chunk's fused score is

    RRF(c) = sum over methods m of  1 / (k + rank_m(c)),   k = 60, rank starting at 1

(a method that did not return the chunk adds nothing). Only ranks are used, so the two methods' incomparable scores
(cosines near 0.5, BM25 in the tens) need no calibration; k = 60 damps the weight of the very first ranks.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from llmkit.apps import store
from llmkit.apps.index import RagIndex
from llmkit.errors import LlmkitError

Method = Literal["dense", "bm25", "hybrid"]
METHODS = ("dense", "bm25", "hybrid")
RRF_K = 60  # Cormack et al. 2009
HYBRID_CANDIDATES = 50  # chunks each method ranks before fusion (at least k)


@dataclass(frozen=True)
class Hit:
    """One retrieved chunk: its id, document, exact text and span in the document, and the method's score."""

    chunk_id: int
    doc_id: str
    title: str
    text: str
    char_start: int
    char_end: int
    score: float


def search(index: RagIndex, query: str, k: int = 5, method: Method = "hybrid") -> list[Hit]:
    """The k best chunks for `query`, best first (ties broken by chunk id, so results are deterministic)."""
    if k < 1:
        raise LlmkitError(f"--k {k} must be at least 1")
    if method not in METHODS:
        raise LlmkitError(f"--method {method!r} is not one of {', '.join(METHODS)}")
    if not query.strip():
        raise LlmkitError("the query is empty; pass a question")
    if method == "dense":
        ranked = dense_ranking(index, query, k)
    elif method == "bm25":
        ranked = store.bm25_search(index.connection, query, k)
    else:
        depth = max(k, HYBRID_CANDIDATES)
        ranked = reciprocal_rank_fusion([dense_ranking(index, query, depth),
                                         store.bm25_search(index.connection, query, depth)])[:k]
    chunks = store.chunks_by_id(index.connection, [chunk_id for chunk_id, _ in ranked])
    return [Hit(cid, chunks[cid].doc_id, chunks[cid].title, chunks[cid].text, chunks[cid].char_start,
                chunks[cid].char_end, score) for cid, score in ranked]


def dense_ranking(index: RagIndex, query: str, k: int) -> list[tuple[int, float]]:
    """(chunk id, cosine similarity) of the k nearest chunks, best first."""
    if len(index) == 0:
        return []
    scores, ids = index.vectors.search(index.embedder.embed([query]), min(k, len(index)))  # (1, k) each
    ranked = [(int(i), float(s)) for i, s in zip(ids[0], scores[0]) if i >= 0]
    return sorted(ranked, key=lambda pair: (-pair[1], pair[0]))


def reciprocal_rank_fusion(rankings: list[list[tuple[int, float]]], k: int = RRF_K) -> list[tuple[int, float]]:
    """(id, sum of 1 / (k + rank)) over the rankings (each best first), best first, ties by id."""
    fused: dict[int, float] = {}
    for ranking in rankings:
        for rank, (item, _) in enumerate(ranking, start=1):
            fused[item] = fused.get(item, 0.0) + 1.0 / (k + rank)
    return sorted(fused.items(), key=lambda pair: (-pair[1], pair[0]))
