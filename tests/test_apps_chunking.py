"""Chunking by the embedding model's tokens: coverage, exact overlaps, token budget, exact character spans; reading
documents from folders and JSONL."""

from __future__ import annotations

import pytest

from llmkit.apps.chunking import ChunkSettings, Document, chunk_document, read_documents
from llmkit.checkpoints import load_tokenizer
from llmkit.checkpoints.hf_bert import default_encoder_path
from llmkit.errors import LlmkitError
from tests.helpers import shakespeare_text, write_jsonl


@pytest.fixture(scope="module")
def minilm_tokenizer():  # noqa: ANN201 (a Tokenizer)
    """all-MiniLM-L6-v2's WordPiece tokenizer (lower-casing, accents stripped: its offsets still point into the
    original text)."""
    return load_tokenizer(default_encoder_path())


TEXTS = {
    "shakespeare": shakespeare_text()[:6000],
    "accents and marks": "Ça va? Crème brûlée, naïve café — déjà vu! " * 40 + "Zürich 東京 🙂 end.",
    "long words": "Pneumonoultramicroscopicsilicovolcanoconiosis antidisestablishmentarianism " * 60,
}


@pytest.mark.parametrize("name", list(TEXTS))
@pytest.mark.parametrize(("max_tokens", "overlap"), [(32, 0), (32, 8), (256, 32), (17, 14)])
def test_chunks_cover_every_token_with_exact_overlap_within_budget(minilm_tokenizer, name: str, max_tokens: int,
                                                                   overlap: int) -> None:
    text = TEXTS[name]
    settings = ChunkSettings(max_tokens, overlap)
    chunks = chunk_document(Document("d", "t", text), minilm_tokenizer, settings)
    encoding = minilm_tokenizer.backend.encode(text, add_special_tokens=False)
    n_tokens, window = len(encoding.ids), max_tokens - 2  # [CLS] and [SEP]
    assert chunks[0].token_start == 0 and chunks[-1].token_end == n_tokens
    for before, after in zip(chunks, chunks[1:]):
        # consecutive chunks share exactly `overlap` tokens; only a window shortened to fit (below) to `overlap`
        # tokens or fewer moves on by one token instead, so chunking always progresses
        assert after.token_start == max(before.token_end - overlap, before.token_start + 1)
        assert after.token_start == before.token_end - overlap or before.token_end - before.token_start <= overlap
    covered = set().union(*(range(chunk.token_start, chunk.token_end) for chunk in chunks))
    assert covered == set(range(n_tokens))
    for position, chunk in enumerate(chunks):
        assert chunk.position == position
        assert chunk.text == text[chunk.start:chunk.end]  # an exact quote of the source
        assert chunk.start == encoding.offsets[chunk.token_start][0]
        assert chunk.end == encoding.offsets[chunk.token_end - 1][1]
        # embedded on its own, with its special tokens, the chunk fits the encoder's input
        assert len(minilm_tokenizer.backend.encode(chunk.text).ids) <= max_tokens
        assert chunk.token_end - chunk.token_start <= window


def test_a_window_cut_inside_a_word_is_shortened_until_its_text_fits(minilm_tokenizer) -> None:
    # a run of one long word: windows start on "##" pieces, whose text re-tokenizes into more pieces on its own
    text = "Pneumonoultramicroscopicsilicovolcanoconiosis " * 30
    chunks = chunk_document(Document("d", "t", text), minilm_tokenizer, ChunkSettings(12, 3))
    lengths = [len(minilm_tokenizer.backend.encode(chunk.text, add_special_tokens=False).ids) for chunk in chunks]
    assert max(lengths) <= 10
    assert any(chunk.token_end - chunk.token_start < 10 for chunk in chunks[:-1])  # some were shortened


def test_empty_and_blank_documents_have_no_chunks(minilm_tokenizer) -> None:
    for text in ("", "   \n\t "):
        assert chunk_document(Document("d", "t", text), minilm_tokenizer, ChunkSettings()) == []


@pytest.mark.parametrize(("max_tokens", "overlap", "flag"), [(2, 0, "--max_tokens"), (10, 8, "--overlap"),
                                                             (10, -1, "--overlap")])
def test_bad_chunk_settings_name_the_flag(minilm_tokenizer, max_tokens: int, overlap: int, flag: str) -> None:
    with pytest.raises(LlmkitError, match=flag):
        chunk_document(Document("d", "t", "some text"), minilm_tokenizer, ChunkSettings(max_tokens, overlap))


def test_folder_documents_are_txt_and_md_files_named_by_path(tmp_path) -> None:
    (tmp_path / "sub").mkdir()
    (tmp_path / "a.txt").write_text("alpha", encoding="utf-8")
    (tmp_path / "sub" / "b.md").write_text("# beta", encoding="utf-8")
    (tmp_path / "c.bin").write_bytes(b"\x00\x01")
    documents = read_documents(tmp_path)
    assert [(doc.id, doc.title, doc.text) for doc in documents] == [("a.txt", "a", "alpha"), ("sub/b.md", "b", "# beta")]
    (tmp_path / "bad.txt").write_bytes(b"caf\xe9")
    with pytest.raises(LlmkitError, match="bad.txt is not UTF-8"):
        read_documents(tmp_path)


def test_jsonl_documents_take_the_fields_named(tmp_path) -> None:
    path = write_jsonl(tmp_path / "docs.jsonl", [{"title": "Cat", "text": "Cats purr."}, {"text": "No title."}])
    documents = read_documents(path)
    assert [(doc.id, doc.title, doc.text) for doc in documents] == [("Cat", "Cat", "Cats purr."),
                                                                     ("2", "2", "No title.")]
    path = write_jsonl(tmp_path / "other.jsonl", [{"key": "k1", "body": "one"}, {"key": "k2", "body": "two"}])
    assert [doc.id for doc in read_documents(path, text_field="body", id_field="key")] == ["k1", "k2"]
    with pytest.raises(LlmkitError, match="line 1: no string field 'text'.*--text_field"):
        read_documents(path)
    duplicate = write_jsonl(tmp_path / "dup.jsonl", [{"title": "A", "text": "x"}, {"title": "A", "text": "y"}])
    with pytest.raises(LlmkitError, match="line 2: document id 'A' is already used on line 1"):
        read_documents(duplicate)
    with pytest.raises(LlmkitError, match="does not exist"):
        read_documents(tmp_path / "missing.jsonl")


def test_content_hash_changes_with_title_or_text() -> None:
    base = Document("d", "t", "text")
    assert base.content_hash == Document("other-id", "t", "text").content_hash
    assert len({base.content_hash, Document("d", "t2", "text").content_hash,
                Document("d", "t", "text!").content_hash}) == 3
