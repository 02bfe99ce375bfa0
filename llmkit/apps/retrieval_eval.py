"""Retrieval quality on real text whose source is known: held-out sentences of Wikipedia articles.

For a seeded sample of wiki_vital articles (../shared/data/wiki_vital, 10,033 lead sections), one sentence of each
queried article (never the first, which usually restates the title) is held out, and the article's title words in it
are masked ("___"), so the query cannot be answered by matching the title. The index holds every sampled article
WITHOUT its held-out sentence: the query must be matched to the rest of its article, as a question is matched to a
passage that answers it.

Metrics, over the queries, on the ranking of distinct documents (a document's best chunk counts):

    recall@k = fraction of queries whose source article is among the first k documents
    MRR      = mean of 1 / rank of the source article (0 when it is not in the first max(ks) documents: MRR@10)
"""

from __future__ import annotations

import json
import random
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from llmkit.apps.chunking import Document
from llmkit.apps.index import RagIndex
from llmkit.apps.retrieve import METHODS, search
from llmkit.data.jsonl import read_jsonl
from llmkit.data.shared import shared_data_file

WIKI_VITAL_FILE = "wiki_vital/summaries_en.jsonl.gz"
SENTENCE_END = re.compile(r"(?<=[.!?])\s+(?=[A-Z0-9\"'(])")
MASK = "___"
MIN_QUERY_WORDS = 8  # a held-out sentence needs this many words, and half of them left after masking
TITLE_STOPWORDS = frozenset({"a", "an", "and", "the", "of", "in", "on", "for", "to", "at", "by", "with", "from"})
KS = (1, 5, 10)


@dataclass(frozen=True)
class HeldOutQuery:
    """A query (a masked sentence) and the document it was cut from."""

    doc_id: str
    query: str
    sentence: str


def wiki_vital_documents() -> list[Document]:
    """The 10,033 wiki_vital article summaries, in file order (id = title = the article's title)."""
    path = shared_data_file(WIKI_VITAL_FILE)
    return [Document(row["title"], row["title"], row["text"]) for _, row in read_jsonl(path, ("title", "text"))]


def split_sentences(text: str) -> list[str]:
    """Sentences of an encyclopaedic text: split after . ! ? followed by space and a capital, digit or quote."""
    return [sentence for sentence in SENTENCE_END.split(text.strip()) if sentence]


def mask_title(sentence: str, title: str) -> str:
    """`sentence` with each word of `title` (and its inflections: Rome -> Romes, Rome's) replaced by ___."""
    words = {word.lower() for word in re.findall(r"\w+", title) if word.lower() not in TITLE_STOPWORDS}
    for word in sorted(words, key=len, reverse=True):
        sentence = re.sub(rf"\b{re.escape(word)}(?:'?s|es)?\b", MASK, sentence, flags=re.IGNORECASE)
    return sentence


def build_queries(documents: Sequence[Document], n_queries: int, seed: int = 0
                  ) -> tuple[list[HeldOutQuery], list[Document]]:
    """(queries, documents with each queried one's held-out sentence removed); seeded, deterministic."""
    rng = random.Random(seed)
    candidates = {}
    for doc in documents:
        options = [sentence for sentence in split_sentences(doc.text)[1:] if _usable(sentence, doc.title)]
        if options:
            candidates[doc.id] = options
    chosen = rng.sample(sorted(candidates), min(n_queries, len(candidates)))
    queries = {doc_id: rng.choice(candidates[doc_id]) for doc_id in chosen}
    kept = []
    for doc in documents:
        if doc.id in queries:
            text = " ".join(doc.text.replace(queries[doc.id], " ", 1).split())
            doc = Document(doc.id, doc.title, text)
        kept.append(doc)
    by_id = {doc.id: doc for doc in documents}
    held_out = [HeldOutQuery(doc_id, mask_title(sentence, by_id[doc_id].title), sentence)
                for doc_id, sentence in queries.items()]
    return held_out, kept


def _usable(sentence: str, title: str) -> bool:
    words = sentence.split()
    masked = mask_title(sentence, title).split()
    return len(words) >= MIN_QUERY_WORDS and sum(word.strip(".,;:") != MASK for word in masked) >= len(words) // 2


def document_rank(ranked_doc_ids: Sequence[str], source: str, depth: int = max(KS)) -> int | None:
    """1-based rank of `source` among the distinct documents of a chunk ranking (first `depth` of them)."""
    distinct = list(dict.fromkeys(ranked_doc_ids))[:depth]
    return distinct.index(source) + 1 if source in distinct else None


def retrieval_metrics(ranks: Sequence[int | None], ks: Sequence[int] = KS) -> dict[str, float]:
    """recall@k for each k and MRR from the source documents' ranks (None = not retrieved)."""
    n = len(ranks)
    metrics = {f"recall@{k}": sum(rank is not None and rank <= k for rank in ranks) / n for k in ks}
    metrics["mrr"] = sum(1 / rank for rank in ranks if rank is not None) / n
    return metrics


def evaluate_retrieval(index: RagIndex, queries: Sequence[HeldOutQuery], methods: Sequence[str] = METHODS,
                       chunks_per_query: int = 3 * max(KS)) -> dict[str, dict[str, float]]:
    """method -> recall@1/5/10 and MRR over the queries (each retrieves `chunks_per_query` chunks, ranked by
    distinct document)."""
    results = {}
    for method in methods:
        ranks = [document_rank([hit.doc_id for hit in search(index, query.query, chunks_per_query, method)],
                               query.doc_id) for query in queries]
        results[method] = retrieval_metrics(ranks)
    return results


def metrics_table(results: dict[str, dict[str, float]]) -> str:
    """A Markdown table: one row per method."""
    columns = list(next(iter(results.values())))
    lines = ["| method | " + " | ".join(columns) + " |", "| --- |" + " --- |" * len(columns)]
    lines += [f"| {method} | " + " | ".join(f"{values[column]:.3f}" for column in columns) + " |"
              for method, values in results.items()]
    return "\n".join(lines)


def sample_collection(documents: Sequence[Document], n_docs: int | None, seed: int) -> list[Document]:
    """A seeded sample of `n_docs` documents (all when None or larger), in their original order."""
    if n_docs is None or n_docs >= len(documents):
        return list(documents)
    keep = set(random.Random(seed).sample(range(len(documents)), n_docs))
    return [doc for i, doc in enumerate(documents) if i in keep]


def write_results(path: Path, results: dict, settings: dict) -> None:
    """The metrics and the settings that produced them as JSON (atomically)."""
    from llmkit.io import atomic_write

    text = json.dumps({"settings": settings, "results": results}, indent=2)
    atomic_write(path, lambda tmp: tmp.write_text(text + "\n", encoding="utf-8"))
