"""Retrieval index: llmkit (`llmkit.apps.index`) vs LangChain's FAISS vector store vs plain sentence-transformers +
faiss, on the same chunks, the same embedding model (all-MiniLM-L6-v2) and the same queries.

    nice python benchmarks/rag_retrieval.py                         # 2,000 wiki_vital articles, 200 queries
    nice python benchmarks/rag_retrieval.py --n_docs 500 --n_queries 100 --output docs/rag_retrieval.json

Queries are held-out sentences of the articles with their title words masked (llmkit.apps.retrieval_eval); every
engine indexes the articles without their held-out sentences, cut into the same chunks (llmkit's chunker: 256
MiniLM tokens, 32 overlapping). Columns:

- recall@1/5/10 and MRR@10 of the source article among the distinct documents of the top 30 chunks;
- indexing throughput, chunks/s end to end: llmkit's `RagIndex.update` (chunking, embedding, SQLite + FTS5 rows,
  the faiss file written) vs LangChain's `FAISS.from_texts` + `save_local` and sentence-transformers' `encode` +
  a faiss IndexFlatIP written to disk (both given the chunks ready-made: their time has no chunking);
- query latency: median ms per query (embed the query, search, fetch the chunks' text);
- ratio: llmkit's throughput over the engine's.

The engines run in rounds (--rounds, 3 by default), their order rotated each round, and speeds are medians over the
rounds, so a change of the machine's load does not land on one engine only.

LangChain reaches the model through a LangChain `Embeddings` adapter around sentence-transformers (langchain-
huggingface is not a dependency); its FAISS store ranks by L2 distance, the same order as the inner product on unit
vectors. Each engine embeds with batch 32 on the same torch threads, after a warm-up batch.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import tempfile
import time
from pathlib import Path

import faiss
import numpy as np
import torch

from llmkit.apps.chunking import ChunkSettings, chunk_document
from llmkit.apps.embedder import Embedder
from llmkit.apps.index import RagIndex
from llmkit.apps.retrieval_eval import (
    build_queries,
    document_rank,
    retrieval_metrics,
    sample_collection,
    wiki_vital_documents,
)
from llmkit.apps.retrieve import search
from llmkit.checkpoints.hf_bert import default_encoder_path

DEPTH = 30  # chunks retrieved per query, ranked by distinct document
BATCH = 32


def run_llmkit(documents, queries, folder: Path) -> dict[str, dict]:
    embedder = Embedder.load(device="cpu", batch_size=BATCH)
    embedder.embed(["warm-up sentence"] * BATCH)
    start = time.perf_counter()
    with RagIndex.create(folder, embedder, ChunkSettings()) as index:
        index.update(documents)
        seconds = time.perf_counter() - start
        n_chunks = len(index)
        rows = {}
        for method in ("dense", "bm25", "hybrid"):
            ranks, latencies = [], []
            for query in queries:
                began = time.perf_counter()
                hits = search(index, query.query, DEPTH, method)
                latencies.append(time.perf_counter() - began)
                ranks.append(document_rank([hit.doc_id for hit in hits], query.doc_id))
            rows[f"llmkit {method}"] = _row(ranks, latencies, n_chunks / seconds if method == "dense" else None)
    return rows


class MiniLMEmbeddings:
    """A LangChain `Embeddings` over sentence-transformers' all-MiniLM-L6-v2 (unit vectors, batch 32)."""

    def __init__(self, model) -> None:  # noqa: ANN001
        self.model = model

    def embed_documents(self, texts: list[str]) -> list[list[float]]:
        return self.model.encode(texts, batch_size=BATCH, normalize_embeddings=True).tolist()

    def embed_query(self, text: str) -> list[float]:
        return self.model.encode([text], normalize_embeddings=True)[0].tolist()


def run_langchain(chunks, queries, folder: Path, model) -> dict[str, dict]:  # noqa: ANN001
    from langchain_community.vectorstores import FAISS
    from langchain_core.embeddings import Embeddings

    adapter = type("MiniLM", (MiniLMEmbeddings, Embeddings), {})(model)
    start = time.perf_counter()
    store = FAISS.from_texts([c.text for c in chunks], adapter, metadatas=[{"doc_id": c.doc_id} for c in chunks])
    store.save_local(str(folder))
    seconds = time.perf_counter() - start
    ranks, latencies = [], []
    for query in queries:
        began = time.perf_counter()
        found = store.similarity_search_with_score(query.query, k=DEPTH)
        latencies.append(time.perf_counter() - began)
        ranks.append(document_rank([doc.metadata["doc_id"] for doc, _ in found], query.doc_id))
    return {"LangChain FAISS": _row(ranks, latencies, len(chunks) / seconds)}


def run_sentence_transformers(chunks, queries, folder: Path, model) -> dict[str, dict]:  # noqa: ANN001
    start = time.perf_counter()
    vectors = model.encode([c.text for c in chunks], batch_size=BATCH, normalize_embeddings=True)
    index = faiss.IndexFlatIP(vectors.shape[1])
    index.add(np.ascontiguousarray(vectors, dtype=np.float32))
    faiss.write_index(index, str(folder / "vectors.faiss"))
    seconds = time.perf_counter() - start
    doc_ids = [c.doc_id for c in chunks]
    ranks, latencies = [], []
    for query in queries:
        began = time.perf_counter()
        _, ids = index.search(model.encode([query.query], normalize_embeddings=True), DEPTH)
        texts = [chunks[i].text for i in ids[0]]  # noqa: F841 (fetching the text is part of a query)
        latencies.append(time.perf_counter() - began)
        ranks.append(document_rank([doc_ids[i] for i in ids[0]], query.doc_id))
    return {"sentence-transformers + faiss": _row(ranks, latencies, len(chunks) / seconds)}


def _row(ranks, latencies, chunks_per_s) -> dict:  # noqa: ANN001
    row = retrieval_metrics(ranks)
    row["chunks/s"] = chunks_per_s
    row["query ms"] = 1000 * statistics.median(latencies)
    return row


def median_rows(rounds: list[dict[str, dict]]) -> dict[str, dict]:
    """Each engine's row with indexing speed and query latency as medians over the rounds (recall is the same in
    every round: same chunks, same vectors)."""
    rows = {}
    for name, row in rounds[-1].items():
        rows[name] = dict(row)
        for key in ("chunks/s", "query ms"):
            if row[key] is not None:
                rows[name][key] = statistics.median(r[name][key] for r in rounds)
    return rows


def table(rows: dict[str, dict]) -> str:
    lines = ["| engine | recall@1 | recall@5 | recall@10 | MRR@10 | index chunks/s | query ms | llmkit ratio |",
             "| --- | --- | --- | --- | --- | --- | --- | --- |"]
    llmkit_speed = rows["llmkit dense"]["chunks/s"]
    for name, row in rows.items():
        speed = "" if row["chunks/s"] is None else f"{row['chunks/s']:.1f}"
        ratio = f"{llmkit_speed / row['chunks/s']:.2f}x" if row["chunks/s"] and not name.startswith("llmkit") else ""
        lines.append(f"| {name} | {row['recall@1']:.3f} | {row['recall@5']:.3f} | {row['recall@10']:.3f} | "
                     f"{row['mrr']:.3f} | {speed} | {row['query ms']:.1f} | {ratio} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n_docs", type=int, default=2000)
    parser.add_argument("--n_queries", type=int, default=200)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=3, help="each engine runs once per round; medians are reported")
    parser.add_argument("--output", type=Path, help="JSON file for the rows and settings")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    from sentence_transformers import SentenceTransformer

    collection = sample_collection(wiki_vital_documents(), args.n_docs, args.seed)
    queries, documents = build_queries(collection, args.n_queries, args.seed)
    embedder = Embedder.load(device="cpu")
    chunks = [chunk for doc in documents for chunk in chunk_document(doc, embedder.tokenizer, ChunkSettings())]
    model = SentenceTransformer(str(default_encoder_path()), device="cpu")
    model.encode(["warm-up sentence"] * BATCH, batch_size=BATCH)
    engines = [lambda folder: run_llmkit(documents, queries, folder),
               lambda folder: run_langchain(chunks, queries, folder, model),
               lambda folder: run_sentence_transformers(chunks, queries, folder, model)]
    rounds: list[dict[str, dict]] = []
    for round_index in range(args.rounds):  # the order rotates each round, so no engine always meets the same load
        rows: dict[str, dict] = {}
        order = engines[round_index % 3:] + engines[:round_index % 3]
        for engine in order:
            with tempfile.TemporaryDirectory() as scratch:
                rows |= engine(Path(scratch))
        rounds.append(rows)
        print(f"round {round_index + 1}/{args.rounds}: " + ", ".join(
            f"{name} {row['chunks/s']:.1f}" for name, row in rows.items() if row["chunks/s"]), flush=True)
    rows = median_rows(rounds)
    settings = {"n_docs": len(documents), "n_queries": len(queries), "chunks": len(chunks), "seed": args.seed,
                "threads": args.threads, "rounds": args.rounds, "machine": platform.processor() or platform.machine(),
                "date": time.strftime("%Y-%m-%d"),
                "chunks_per_s_by_round": [{name: row["chunks/s"] for name, row in r.items() if row["chunks/s"]}
                                          for r in rounds]}
    print(f"{len(queries)} held-out queries, {len(documents):,} wiki_vital articles, {len(chunks):,} chunks, "
          f"{args.threads} threads\n{table(rows)}")
    if args.output:
        args.output.write_text(json.dumps({"settings": settings, "rows": rows}, indent=2) + "\n", encoding="utf-8")


if __name__ == "__main__":
    main()
