"""`llmkit rag index|ask|eval`: retrieval-augmented generation over a folder or JSONL of documents, or over the
built-in Wikipedia collection (../shared/data/wiki_vital, 10,033 article summaries)."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Literal

from llmkit.commands.common import Device, Dtype

Method = Literal["dense", "bm25", "hybrid"]
DEFAULT_QUESTION = "What is the highest mountain on Earth?"
BUILTIN_INDEX = "llmkit/rag/wiki_vital"  # under $XDG_CACHE_HOME (default ~/.cache)


def builtin_index_dir() -> Path:
    """Where `rag ask` without --index keeps its index of wiki_vital: $XDG_CACHE_HOME/llmkit/rag/wiki_vital."""
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / BUILTIN_INDEX


def rag_index(
    output: str,
    docs: str | None = None,
    delete: list[str] | None = None,
    model: str | None = None,
    text_field: str = "text",
    id_field: str | None = None,
    title_field: str = "title",
    max_tokens: int | None = None,
    overlap: int | None = None,
    batch_size: int = 32,
    device: Device = "auto",
) -> Any:
    """Build or update a retrieval index: chunks by the embedding model's tokens, vectors in faiss, text in SQLite.

    Example: llmkit rag index --docs notes/ --output notes.index
             llmkit rag index --docs articles.jsonl --id_field url --title_field headline --output news.index
             llmkit rag index --docs notes/ --output notes.index            (again: embeds only new/changed files)
             llmkit rag index --output notes.index --delete "[old/a.md, b.txt]"

    DOCS is a folder of .txt/.md files (id = path inside the folder) or a .jsonl(.gz) file. On an existing index,
    new documents are added, changed ones (same id, other content) re-embedded, unchanged ones left alone; documents
    not in DOCS stay unless --delete names them. OUTPUT is a folder: index.sqlite (documents, chunks, BM25) and one
    vectors-*.faiss file; every update is atomic.

    Args:
        output: the index folder (created, or updated when it holds an index).
        docs: folder of .txt/.md files, or a JSONL file with one document per line.
        delete: ids of documents to remove (their chunks leave both stores).
        model: embedding model directory (default: all-MiniLM-L6-v2; an existing index uses the one it was built with).
        text_field: JSONL field that holds each document's text.
        id_field: JSONL field with a unique id per document (default: the title, else the line number).
        title_field: JSONL field with the title shown in citations (default: the id).
        max_tokens: tokens per chunk, special tokens included (default 256, the encoder's input length; an existing
            index keeps its own).
        overlap: tokens shared by consecutive chunks (default 32).
        batch_size: chunks per forward pass of the encoder.
        device: auto, cpu, cuda or cuda:N.
    """
    from llmkit.apps.chunking import read_documents
    from llmkit.errors import LlmkitError

    if docs is None and not delete:
        raise LlmkitError("nothing to do: pass --docs with documents to index, or --delete with ids to remove")
    documents = read_documents(docs, text_field, id_field, title_field) if docs is not None else []
    with _open_index(output, model, max_tokens, overlap, batch_size, device) as index:
        removed = index.remove(delete).removed if delete else 0
        report = index.update(documents, progress=True)
        n_docs, n_chunks = len(index.document_ids()), len(index)
    print(f"{output}: {report.added} added, {report.replaced} replaced, {report.unchanged} unchanged, {removed} removed "
          f"({report.chunks_embedded} chunks embedded); {n_docs} documents, {n_chunks} chunks")
    return {"added": report.added, "replaced": report.replaced, "unchanged": report.unchanged, "removed": removed,
            "chunks_embedded": report.chunks_embedded, "documents": n_docs, "chunks": n_chunks}


def _open_index(folder: str | Path, model: str | None, max_tokens: int | None, overlap: int | None, batch_size: int,
                device: str):  # noqa: ANN202 (a RagIndex)
    """The index in `folder` with its own embedding model (or `model`), or a new one with `model`."""
    from llmkit.apps.chunking import ChunkSettings
    from llmkit.apps.embedder import Embedder
    from llmkit.apps.index import RagIndex, index_meta
    from llmkit.apps.store import SQLITE_FILE

    exists = (Path(folder) / SQLITE_FILE).exists()
    if exists and model is None:
        model = index_meta(folder).get("model_source") or None
    embedder = Embedder.load(model, device=device, batch_size=batch_size)
    if max_tokens is None and overlap is None:
        chunking = None
    else:
        defaults = ChunkSettings(max_tokens=min(ChunkSettings().max_tokens, embedder.max_tokens))
        chunking = ChunkSettings(max_tokens or defaults.max_tokens, defaults.overlap if overlap is None else overlap)
    if not exists and chunking is None:
        chunking = ChunkSettings(max_tokens=min(ChunkSettings().max_tokens, embedder.max_tokens))
    return RagIndex.open_or_create(folder, embedder, chunking)


def _open_existing_index(folder: str, device: str):  # noqa: ANN202 (a RagIndex)
    """The index in `folder`, with the embedding model it was built with; never a new one."""
    from llmkit.apps.embedder import Embedder
    from llmkit.apps.index import RagIndex, index_meta

    embedder = Embedder.load(index_meta(folder).get("model_source") or None, device=device)
    return RagIndex.open(folder, embedder)


def rag_ask(
    question: str = DEFAULT_QUESTION,
    index: str | None = None,
    k: int = 5,
    method: Method = "hybrid",
    model: str | None = None,
    max_new_tokens: int = 256,
    context_tokens: int | None = None,
    dtype: Dtype = "float32",
    device: Device = "auto",
) -> Any:
    """Answer a question from an index: retrieve chunks, pack them into the prompt, answer citing them as [i].

    Example: llmkit rag ask                                    (indexes the built-in Wikipedia once, then answers)
             llmkit rag ask --question "Who painted the Mona Lisa?" --k 3
             llmkit rag ask --index notes.index --question "When is the release?" --method bm25 --k 8

    Prints the answer, then the sources it was given: number, title, document id, character span and the exact
    text (cited ones marked *). Chunks that do not fit the context budget (prompt + --max_new_tokens within the
    model's context, or --context_tokens) are left out whole, and the output says so. Without --index, the
    10,033 wiki_vital article summaries are indexed into ~/.cache/llmkit/rag/wiki_vital ($XDG_CACHE_HOME) the first
    time (several minutes on 2 CPU cores; an interrupted run resumes where it stopped).

    Args:
        question: the question to answer.
        index: index folder built by `llmkit rag index` (default: the built-in Wikipedia index).
        k: chunks to retrieve.
        method: dense (embeddings), bm25 (words) or hybrid (reciprocal rank fusion of both).
        model: .gguf file, Hugging Face directory or llmkit directory of the answering model
            (default: SmolLM2-135M-Instruct).
        max_new_tokens: most tokens of the answer.
        context_tokens: prompt + answer budget in tokens, when smaller than the model's context (faster on a CPU).
        dtype: the answering model's activations dtype.
        device: auto, cpu, cuda or cuda:N.
    """
    from llmkit.commands.chat import checked_text

    question = checked_text(question, "--question")
    with open_rag_index(index, device) as opened:
        return _answer(opened, question, k, method, model, max_new_tokens, context_tokens, dtype, device)


def open_rag_index(index: str | None, device: str):  # noqa: ANN201 (a RagIndex, a context manager)
    """The index in folder `index` (never a new one), or without one the built-in Wikipedia index, built first."""
    return _builtin_index(device) if index is None else _open_existing_index(index, device)


def _answer(index, question: str, k: int, method: str, model: str | None, max_new_tokens: int,  # noqa: ANN001
            context_tokens: int | None, dtype: str, device: str) -> Any:
    from llmkit.apps.rag import answer_question
    from llmkit.commands.common import local_model

    llm = local_model(model, dtype, device)
    result = answer_question(index, llm, question, k, method, max_new_tokens, context_tokens)
    print(f"Question: {question}\n\n{result.format()}")
    return result


def _builtin_index(device: str):  # noqa: ANN202 (a RagIndex)
    """The wiki_vital index in the cache folder, built (or completed) first."""
    import sys

    from llmkit.apps.retrieval_eval import wiki_vital_documents

    folder = builtin_index_dir()
    documents = wiki_vital_documents()
    index = _open_index(folder, None, None, None, 32, device)
    if len(index.document_ids()) < len(documents):
        print(f"indexing the built-in Wikipedia collection ({len(documents):,} articles) into {folder}; later runs "
              "reuse it", file=sys.stderr)
        index.update(documents, progress=True)
    return index


def rag_eval(
    n_docs: int | None = 2000,
    n_queries: int = 200,
    seed: int = 0,
    methods: list[Method] | None = None,
    model: str | None = None,
    max_tokens: int | None = None,
    overlap: int | None = None,
    index_dir: str | None = None,
    output: str | None = None,
    batch_size: int = 32,
    device: Device = "auto",
) -> Any:
    """Retrieval quality on Wikipedia: recall@1/5/10 and MRR of dense, BM25 and hybrid search.

    Example: llmkit rag eval                                   (2,000 articles, 200 queries: a few minutes on a CPU)
             llmkit rag eval --n_docs null --n_queries 1000 --output retrieval.json

    From a seeded sample of wiki_vital articles, one sentence of each queried article (not the first) is held out
    and its title words masked; the index holds the articles without their held-out sentences. A query scores when
    its source article is among the first k distinct documents retrieved. Prints a table; --output writes JSON.

    Args:
        n_docs: articles in the indexed collection (null: all 10,033).
        n_queries: held-out sentences to query with.
        seed: seed of the article sample and of the held-out sentences.
        methods: which of dense, bm25, hybrid to score (default: all three).
        model: embedding model directory (default: all-MiniLM-L6-v2).
        max_tokens: tokens per chunk, special tokens included (default 256).
        overlap: tokens shared by consecutive chunks (default 32).
        index_dir: folder to build the evaluation index in and keep (default: a temporary folder, deleted after).
        output: JSON file for the settings and metrics.
        batch_size: chunks per forward pass of the encoder.
        device: auto, cpu, cuda or cuda:N.
    """
    import tempfile

    from llmkit.apps.retrieval_eval import (
        build_queries,
        evaluate_retrieval,
        metrics_table,
        sample_collection,
        wiki_vital_documents,
        write_results,
    )
    from llmkit.apps.retrieve import METHODS

    collection = sample_collection(wiki_vital_documents(), n_docs, seed)
    queries, documents = build_queries(collection, n_queries, seed)
    with tempfile.TemporaryDirectory(prefix="llmkit-rag-eval-") as scratch:
        folder = Path(index_dir) if index_dir else Path(scratch) / "index"
        with _open_index(folder, model, max_tokens, overlap, batch_size, device) as index:
            index.update(documents, progress=True)
            results = evaluate_retrieval(index, queries, methods or list(METHODS))
            settings = {"n_docs": len(documents), "n_queries": len(queries), "seed": seed, "model": index.embedder.name,
                        "max_tokens": index.chunking.max_tokens, "overlap": index.chunking.overlap,
                        "chunks": len(index)}
    print(f"{len(queries)} held-out sentences against {len(documents):,} wiki_vital articles ({settings['chunks']:,} "
          f"chunks), seed {seed}\n{metrics_table(results)}")
    if output is not None:
        write_results(Path(output), results, settings)
        print(f"wrote {output}")
    return {"settings": settings, "results": results}
