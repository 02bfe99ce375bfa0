"""Documents -> chunks for retrieval: windows of the embedding model's tokens, with overlap.

A document's text is tokenized once (without special tokens) with the embedding model's tokenizer, whose offsets map
each token back to its characters. Windows of `max_tokens - n_special` tokens start every
`window - overlap` tokens, so consecutive chunks share exactly `overlap` tokens and every token lands in some chunk.
A chunk's text is the exact character span of the source that its tokens cover (`text[start:end]`), so a citation
quotes the document; a chunk never holds more tokens than the encoder reads (all-MiniLM-L6-v2: 256 wordpieces with
[CLS] and [SEP]), so no part of it is truncated away when it is embedded.

Documents come from a folder of .txt/.md files (id = path inside the folder, title = file name) or a JSONL file
(one object per line with a text field and optional id and title fields), read through llmkit.data.jsonl.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from llmkit.data.jsonl import JSONL_SUFFIXES, read_jsonl
from llmkit.errors import LlmkitError
from llmkit.tokenizer import Tokenizer

TEXT_SUFFIXES = (".txt", ".md")  # the files a documents folder contributes


@dataclass(frozen=True)
class Document:
    """One source document: a unique id, a title for citations, and its text."""

    id: str
    title: str
    text: str

    @property
    def content_hash(self) -> str:
        """sha256 of title and text: an incremental `rag index` re-embeds a document only when this changes."""
        return hashlib.sha256(f"{self.title}\0{self.text}".encode()).hexdigest()


@dataclass(frozen=True)
class ChunkSettings:
    """How documents are cut: tokens per chunk (special tokens included) and tokens shared by neighbours."""

    max_tokens: int = 256  # the encoder's input length (sentence-transformers' max_seq_length for MiniLM)
    overlap: int = 32  # tokens at the end of one chunk that start the next, so no sentence is cut without context

    def window(self, n_special: int) -> int:
        """Text tokens per chunk once the encoder's special tokens ([CLS], [SEP]) are counted."""
        window = self.max_tokens - n_special
        if window < 1:
            raise LlmkitError(f"--max_tokens {self.max_tokens} leaves no room for text beside {n_special} special "
                              "tokens; pass a larger --max_tokens")
        if not 0 <= self.overlap < window:
            raise LlmkitError(f"--overlap {self.overlap} must be at least 0 and below the {window} text tokens of a "
                              "chunk; pass a smaller --overlap")
        return window


@dataclass(frozen=True)
class Chunk:
    """A window of a document: characters [start, end) of its text and tokens [token_start, token_end)."""

    doc_id: str
    position: int  # 0, 1, ... within the document
    start: int
    end: int
    token_start: int
    token_end: int
    text: str


def chunk_document(document: Document, tokenizer: Tokenizer, settings: ChunkSettings) -> list[Chunk]:
    """The document's chunks in order; none for a text without tokens (empty or blank)."""
    backend = tokenizer.backend
    window = settings.window(backend.num_special_tokens_to_add(False))
    offsets = backend.encode(document.text, add_special_tokens=False).offsets  # (n_tokens,) of (char start, end)
    chunks: list[Chunk] = []
    first = 0
    while first < len(offsets):
        last = min(first + window, len(offsets))
        last = _fitting_end(document.text, offsets, first, last, window, backend)
        start, end = offsets[first][0], offsets[last - 1][1]
        chunks.append(Chunk(document.id, len(chunks), start, end, first, last, document.text[start:end]))
        if last == len(offsets):
            break
        first = max(last - settings.overlap, first + 1)
    return chunks


def _fitting_end(text: str, offsets: list[tuple[int, int]], first: int, last: int, window: int, backend) -> int:  # noqa: ANN001
    """`last`, moved back until the chunk's text, tokenized on its own, fits the window. A window that starts inside
    a word ("##ing") can tokenize differently once cut out; embedding it must not truncate it."""
    while last - first > 1:
        span = text[offsets[first][0]:offsets[last - 1][1]]
        if len(backend.encode(span, add_special_tokens=False).ids) <= window:
            return last
        last -= 1
    return last


def read_documents(path: str | Path, text_field: str = "text", id_field: str | None = None,
                   title_field: str = "title") -> list[Document]:
    """Documents from a folder of .txt/.md files or a .jsonl(.gz) file; ids must be unique.

    JSONL: `text_field` holds the text; `id_field` the id (default: the title, else the line number); `title_field`
    the title when present (default: the id)."""
    path = Path(path)
    if path.is_dir():
        documents = list(_folder_documents(path))
    elif path.is_file() and path.name.lower().endswith(JSONL_SUFFIXES):
        documents = list(_jsonl_documents(path, text_field, id_field, title_field))
    elif path.exists():
        raise LlmkitError(f"--docs {path} is neither a folder of .txt/.md files nor a .jsonl file; pass one of those")
    else:
        raise LlmkitError(f"--docs {path} does not exist; check the path")
    if not documents:
        raise LlmkitError(f"--docs {path} holds no documents (.txt/.md files or JSONL lines); check the path")
    return documents


def _folder_documents(folder: Path) -> Iterator[Document]:
    for file in sorted(folder.rglob("*")):
        if file.is_file() and file.suffix.lower() in TEXT_SUFFIXES:
            try:
                text = file.read_text(encoding="utf-8")
            except UnicodeDecodeError:
                raise LlmkitError(f"{file} is not UTF-8 text; convert it (e.g. iconv -f latin1 -t UTF-8) or move it "
                                  "out of the folder") from None
            yield Document(file.relative_to(folder).as_posix(), file.stem, text)


def _jsonl_documents(path: Path, text_field: str, id_field: str | None, title_field: str) -> Iterator[Document]:
    seen: dict[str, int] = {}
    fields = [text_field] + ([id_field] if id_field else [])
    hint = "pass --text_field / --id_field with the fields that hold each document's text and id"
    for number, row in read_jsonl(path, fields, hint):
        title = row.get(title_field)
        title = title if isinstance(title, str) else None
        doc_id = row[id_field] if id_field else title or str(number)
        if doc_id in seen:
            raise LlmkitError(f"{path}, line {number}: document id {doc_id!r} is already used on line {seen[doc_id]}; "
                              "ids must be unique: pass --id_field with a field of unique ids")
        seen[doc_id] = number
        yield Document(doc_id, title or doc_id, row[text_field])
