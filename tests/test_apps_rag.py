"""RAG: the packed prompt never exceeds the context window, citations are read back, the retrieval eval's queries
and metrics, the `llmkit rag` verbs; on real weights (slow): MiniLM embeddings equal sentence-transformers', and
SmolLM2 answers from retrieved Wikipedia chunks."""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pytest
import torch

from llmkit.apps import LocalModel
from llmkit.apps.chunking import ChunkSettings, Document
from llmkit.apps.embedder import Embedder
from llmkit.apps.index import RagIndex
from llmkit.apps.rag import answer_question, cited_sources, pack_prompt, rag_messages
from llmkit.apps.retrieval_eval import (
    MASK,
    build_queries,
    document_rank,
    evaluate_retrieval,
    mask_title,
    retrieval_metrics,
    split_sentences,
    wiki_vital_documents,
)
from llmkit.apps.retrieve import Hit, search
from llmkit.checkpoints import default_model_path, load_tokenizer, save_model
from llmkit.checkpoints.hf_bert import default_encoder_path
from llmkit.errors import LlmkitError
from tests.helpers import ScriptedModel, cli_status, run_cli, tiny_decoder
from tests.test_apps_index import tiny_embedder


def hit(number: int, words: int) -> Hit:
    text = " ".join(f"w{number}_{i}" for i in range(words))
    return Hit(number, f"doc{number}", f"Title {number}", text, 0, len(text), 1.0 / number)


@pytest.fixture(scope="module")
def smollm2_shaped() -> LocalModel:
    """A tiny random decoder with SmolLM2's real tokenizer and chat template and a 300-token context."""
    tokenizer = load_tokenizer(default_model_path())
    return LocalModel(tiny_decoder(vocab_size=tokenizer.vocab_size, max_seq_len=300), tokenizer)


@pytest.mark.parametrize("max_new_tokens", [1, 40, 120, 200])
def test_packed_prompt_fits_the_window_and_keeps_whole_chunks_in_rank_order(smollm2_shaped: LocalModel,
                                                                            max_new_tokens: int) -> None:
    hits = [hit(n, words) for n, words in enumerate([30, 80, 10, 60, 5, 25], start=1)]
    packed = pack_prompt(smollm2_shaped, "What is w3_1?", hits, max_new_tokens)
    count = smollm2_shaped.count_tokens
    assert packed.n_tokens == count(packed.prompt)
    assert packed.n_tokens + max_new_tokens <= smollm2_shaped.context_window
    assert [h.chunk_id for h in packed.sources] == sorted(h.chunk_id for h in packed.sources)  # rank order kept
    assert sorted(packed.sources + packed.dropped, key=lambda h: h.chunk_id) == hits
    for number, source in enumerate(packed.sources, start=1):
        assert f"[{number}] {source.title}: {source.text}\n" in packed.prompt + "\n"  # whole, numbered
    for left_out in packed.dropped:  # it would not have fitted where it came in the ranking
        before = [h for h in packed.sources if h.chunk_id < left_out.chunk_id]
        prompt = smollm2_shaped.chat_prompt(rag_messages("What is w3_1?", [*before, left_out]))
        assert count(prompt) + max_new_tokens > smollm2_shaped.context_window
        assert left_out.text not in packed.prompt
    if max_new_tokens == 200:
        assert packed.dropped and packed.sources  # the budget binds: some left out, smaller later ones kept


def test_context_tokens_caps_the_budget_and_an_oversized_question_is_refused() -> None:
    model = ScriptedModel([], context_window=1000)
    hits = [hit(n, 50) for n in range(1, 6)]
    packed = pack_prompt(model, "question?", hits, max_new_tokens=20, context_tokens=200)
    assert packed.n_tokens + 20 <= 200 and len(packed.sources) == 2 and len(packed.dropped) == 3
    with pytest.raises(LlmkitError, match="--max_new_tokens 190 leaves 10 of the 200-token context"):
        pack_prompt(model, "a question that is longer than ten words " * 2, hits, 190, context_tokens=200)


def test_cited_sources_are_numbers_of_packed_sources_in_first_mention_order() -> None:
    assert cited_sources("Paris [2] is big [1][2]; see [7] and [0] and [x].", 3) == [2, 1]
    assert cited_sources("No citations.", 3) == []


@pytest.fixture(scope="module")
def wiki() -> list[Document]:
    return wiki_vital_documents()


def test_answer_retrieves_packs_and_reads_back_citations(tmp_path: Path, wiki: list[Document]) -> None:
    articles = [doc for doc in wiki if doc.title in ("Mona Lisa", "Mount Everest", "Photosynthesis", "Paris")]
    model = ScriptedModel(["It was painted by Leonardo da Vinci [1], not [9]."], context_window=4096)
    with RagIndex.create(tmp_path, tiny_embedder(), ChunkSettings(64, 8)) as index:
        index.update(articles)
        result = answer_question(index, model, "Who painted the Mona Lisa portrait?", k=3, method="bm25",
                                 max_new_tokens=50)
        assert [h.chunk_id for h in result.sources] == [h.chunk_id for h in search(index, result.question, 3, "bm25")]
    assert result.sources[0].doc_id == "Mona Lisa"
    assert result.cited == [1] and result.dropped == []
    assert model.prompts == [model.chat_prompt(rag_messages(result.question, result.sources))]
    shown = result.format()
    assert shown.startswith("It was painted by Leonardo da Vinci [1]")
    assert re.search(r"^\*\[1\] Mona Lisa \(document 'Mona Lisa', characters \d+-\d+\): ", shown, re.M)


def test_held_out_queries_mask_the_title_and_leave_the_index(wiki: list[Document]) -> None:
    assert mask_title("Rome's forum: the Romes of Rome.", "Rome") == f"{MASK} forum: the {MASK} of {MASK}."
    assert mask_title("The Battle of the Somme began.", "Battle of the Somme") == f"The {MASK} of the {MASK} began."
    collection = wiki[:400]
    queries, documents = build_queries(collection, 50, seed=3)
    assert (queries, documents) == build_queries(collection, 50, seed=3)  # seeded
    assert queries != build_queries(collection, 50, seed=4)[0]
    assert len(queries) == 50 and len({q.doc_id for q in queries}) == 50
    by_id, original = {doc.id: doc for doc in documents}, {doc.id: doc for doc in collection}
    for query in queries:
        sentences = split_sentences(original[query.doc_id].text)
        assert query.sentence in sentences[1:]  # never the first sentence
        assert query.sentence not in by_id[query.doc_id].text  # the index does not hold it
        assert query.query == mask_title(query.sentence, original[query.doc_id].title)
    assert [doc.id for doc in documents] == [doc.id for doc in collection]
    untouched = [doc for doc in collection if doc.id not in {q.doc_id for q in queries}]
    assert all(by_id[doc.id] == doc for doc in untouched)


def test_retrieval_metrics_from_ranks() -> None:
    assert document_rank(["a", "a", "b", "c"], "c") == 3  # ranks count distinct documents
    assert document_rank(["a"] * 3 + [str(i) for i in range(20)], "15", depth=10) is None
    metrics = retrieval_metrics([1, 3, None, 7])
    assert metrics == pytest.approx({"recall@1": 0.25, "recall@5": 0.5, "recall@10": 0.75,
                                     "mrr": (1 + 1 / 3 + 1 / 7) / 4})


def test_bm25_finds_held_out_sentences_far_above_chance(tmp_path: Path, wiki: list[Document]) -> None:
    queries, documents = build_queries(wiki[:300], 40, seed=0)
    with RagIndex.create(tmp_path, tiny_embedder(), ChunkSettings(64, 8)) as index:
        index.update(documents)
        results = evaluate_retrieval(index, queries, ["bm25", "dense"])
    assert results["bm25"]["recall@10"] >= 0.5  # chance is 10 / 300
    assert results["dense"]["recall@10"] < results["bm25"]["recall@10"]  # a random encoder knows no meaning


@pytest.fixture
def encoder_dir(tmp_path: Path) -> Path:
    """A saved tiny random encoder with MiniLM's tokenizer, as `rag index --model` reads it."""
    embedder = tiny_embedder()
    save_model(embedder.model, tmp_path / "encoder", embedder.tokenizer)
    return tmp_path / "encoder"


def test_rag_index_cli_adds_updates_deletes_and_reports_damage(tmp_path: Path, encoder_dir: Path, capsys) -> None:
    docs = tmp_path / "docs"
    docs.mkdir()
    for name, text in [("a.txt", "Alpha particles are helium nuclei."), ("b.md", "Beta decay emits electrons."),
                       ("c.txt", "Gamma rays are photons.")]:
        (docs / name).write_text(text, encoding="utf-8")
    index = str(tmp_path / "index")
    code, out, err = run_cli(capsys, "rag", "index", "--docs", str(docs), "--output", index, "--model",
                             str(encoder_dir), "--max_tokens", "32", "--overlap", "4")
    assert code == 0, err
    assert "3 added, 0 replaced, 0 unchanged, 0 removed (3 chunks embedded); 3 documents, 3 chunks" in out
    (docs / "b.md").write_text("Beta decay emits electrons or positrons.", encoding="utf-8")
    code, out, err = run_cli(capsys, "rag", "index", "--docs", str(docs), "--output", index)  # its own model
    assert code == 0, err
    assert "0 added, 1 replaced, 2 unchanged, 0 removed (1 chunks embedded)" in out
    code, out, err = run_cli(capsys, "rag", "index", "--output", index, "--delete", "[a.txt]")
    assert code == 0, err
    assert "1 removed" in out and "2 documents, 2 chunks" in out
    code, err = cli_status(capsys, "rag", "index", "--output", index, "--delete", "[a.txt]")
    assert code == 2 and err.count("\n") == 1 and "--delete 'a.txt': no document with that id" in err
    code, err = cli_status(capsys, "rag", "index", "--docs", str(docs), "--output", index, "--max_tokens", "64")
    assert code == 2 and "was built with --max_tokens 32 --overlap 4" in err
    (vectors,) = Path(index).glob("vectors-*.faiss")
    vectors.write_bytes(vectors.read_bytes()[:-10])
    code, err = cli_status(capsys, "rag", "index", "--docs", str(docs), "--output", index)
    assert code == 2 and err.count("\n") == 1
    assert err.startswith(f"error: {vectors} does not match") and "build the index again" in err
    code, err = cli_status(capsys, "rag", "ask", "--index", str(tmp_path / "docs"), "--question", "x")
    assert code == 2 and err.count("\n") == 1 and "is not an llmkit index" in err


# ---- real weights -------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def minilm() -> Embedder:
    return Embedder.load(device="cpu")


@pytest.fixture(scope="module")
def wiki_held_out(wiki: list[Document]) -> tuple[list, list[Document]]:
    """60 held-out-sentence queries over 300 real articles (Mount Everest's among them)."""
    everest = next(doc for doc in wiki if doc.title == "Mount Everest")
    return build_queries([*wiki[:299], everest], 60, seed=0)


@pytest.fixture(scope="module")
def wiki_index(tmp_path_factory: pytest.TempPathFactory, minilm: Embedder, wiki_held_out) -> RagIndex:
    """The 300 articles, without their held-out sentences, indexed with all-MiniLM-L6-v2 (shared by the slow tests)."""
    index = RagIndex.create(tmp_path_factory.mktemp("wiki") / "index", minilm, ChunkSettings())
    index.update(wiki_held_out[1])
    yield index
    index.close()


@pytest.mark.slow
def test_minilm_chunk_vectors_equal_sentence_transformers(wiki_index: RagIndex) -> None:
    from sentence_transformers import SentenceTransformer

    rows = wiki_index.connection.execute("SELECT id, text FROM chunks ORDER BY id LIMIT 64").fetchall()
    reference = SentenceTransformer(str(default_encoder_path()), device="cpu")
    expected = reference.encode([text for _, text in rows], normalize_embeddings=True, convert_to_numpy=True)
    ids = np.asarray([chunk_id for chunk_id, _ in rows], dtype=np.int64)
    stored = np.stack([wiki_index.vectors.reconstruct(int(i)) for i in ids])
    np.testing.assert_allclose(stored, expected, rtol=0, atol=2e-5)  # float32 sums in another order
    # no chunk was cut by the encoder: sentence-transformers reads at most 256 tokens, chunks fit in that
    lengths = [len(reference.tokenizer(text)["input_ids"]) for _, text in rows]
    assert max(lengths) <= 256


@pytest.mark.slow
def test_minilm_retrieval_finds_held_out_sentences(wiki_index: RagIndex, wiki_held_out) -> None:
    results = evaluate_retrieval(wiki_index, wiki_held_out[0])
    assert results["dense"]["recall@10"] >= 0.6 and results["hybrid"]["recall@10"] >= 0.6  # chance: 10 / 300


@pytest.mark.slow
def test_smollm2_answers_from_packed_wikipedia_chunks(wiki_index: RagIndex, smollm2_local: LocalModel) -> None:
    torch.manual_seed(0)
    result = answer_question(wiki_index, smollm2_local, "What is the highest mountain on Earth?", k=3,
                             max_new_tokens=60, context_tokens=1024)
    assert result.prompt_tokens + 60 <= 1024
    assert result.prompt_tokens == smollm2_local.count_tokens(
        smollm2_local.chat_prompt(rag_messages(result.question, result.sources)))
    assert result.answer.strip()
    assert result.sources[0].doc_id == "Mount Everest"
    for source in result.sources:  # every source is a stored chunk, an exact span of its document
        text, doc_text = wiki_index.connection.execute(
            "SELECT c.text, d.text FROM chunks c JOIN documents d ON d.id = c.doc_id WHERE c.id = ?",
            (source.chunk_id,)).fetchone()
        assert source.text == text == doc_text[source.char_start:source.char_end]
    assert set(result.cited) <= set(range(1, len(result.sources) + 1))
    assert result.cited == cited_sources(result.answer, len(result.sources))
    assert "Everest" in result.answer  # the retrieved chunk says so; the model reads it from the prompt


def test_rag_ask_and_eval_cli(tmp_path: Path, encoder_dir: Path, smollm2_shaped: LocalModel, wiki, capsys) -> None:
    import json

    articles = [doc for doc in wiki if doc.title in ("Mona Lisa", "Mount Everest", "Photosynthesis")]
    with RagIndex.create(tmp_path / "index", Embedder.load(str(encoder_dir), device="cpu"),
                         ChunkSettings(64, 8)) as index:
        index.update(articles)
    save_model(smollm2_shaped.model, tmp_path / "decoder", smollm2_shaped.tokenizer)  # a random tiny generator
    code, out, err = run_cli(capsys, "rag", "ask", "--index", str(tmp_path / "index"), "--model",
                             str(tmp_path / "decoder"), "--question", "How high is Mount Everest?", "--method",
                             "bm25", "--k", "2", "--max_new_tokens", "8")
    assert code == 0, err
    assert out.startswith("Question: How high is Mount Everest?\n")
    assert re.search(r"^[* ]\[1\] Mount Everest \(document 'Mount Everest', characters 0-\d+\): Mount Everest is",
                     out, re.M)
    code, err = cli_status(capsys, "rag", "ask", "--index", str(tmp_path / "index"), "--model",
                           str(tmp_path / "decoder"), "--question", "Why?", "--max_new_tokens", "299")
    assert code == 2 and "--max_new_tokens 299 leaves" in err and err.count("\n") == 1
    output = tmp_path / "eval.json"
    code, out, err = run_cli(capsys, "rag", "eval", "--model", str(encoder_dir), "--n_docs", "80", "--n_queries",
                             "12", "--methods", "[bm25]", "--max_tokens", "64", "--overlap", "8", "--output",
                             str(output))
    assert code == 0, err
    assert "| bm25 |" in out and "12 held-out sentences against 80 wiki_vital articles" in out
    saved = json.loads(output.read_text())
    assert saved["settings"]["n_queries"] == 12 and saved["settings"]["max_tokens"] == 64
    assert set(saved["results"]) == {"bm25"} and saved["results"]["bm25"]["recall@10"] >= 0.5  # chance: 10 / 80
