"""A text's token ids in runs, from the text in pieces, equal to tokenizing the whole text at once.

Why not encode each piece on its own: a tokenizer's split near a piece's end depends on what follows (a word cut in
two is two other tokens), and a SentencePiece-style tokenizer marks the start of every text it encodes (a "▁").
So each encode covers the text not yet committed plus a little committed text before it (CONTEXT_TOKENS tokens, so
it tokenizes as mid-text), and commits only the tokens that end at least MARGIN characters before the known end;
the rest is encoded again with the next piece. Each encode is checked against the tokens committed before it: the
same last committed token, and a token boundary exactly where the committed text ends. A tokenizer whose split
there still depends on text further away is refused with a message, never silently tokenized differently.
"""

from __future__ import annotations

import codecs
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

from llmkit.errors import LlmkitError

TEXT_ENCODING = "utf-8"
PIECE_BYTES = 1 << 16  # a file is read this many bytes at a time (one encode of 1 MiB held ~400 MiB, 2026-12-06)
MARGIN = 256  # characters before the text seen so far within which no token is committed yet
CONTEXT_TOKENS = 8  # committed tokens encoded again before the uncommitted text


@dataclass(frozen=True)
class TokenRun:
    """Committed tokens and the text they cover: `text` is the text's characters [start, start + len(text)), runs
    are contiguous; `spans` are each token's (start, end) characters in the whole text (a token holding part of a
    multi-byte character spans that whole character)."""

    ids: list[int]
    spans: list[tuple[int, int]]
    text: str
    start: int


def file_pieces(path: Path, piece_bytes: int = PIECE_BYTES) -> Iterator[str]:
    """The UTF-8 text of a file, `piece_bytes` bytes at a time (a character cut between pieces is decoded whole).

    Raises:
        LlmkitError: the file is not UTF-8, or piece_bytes < 1.
    """
    if piece_bytes < 1:
        raise LlmkitError(f"piece_bytes is {piece_bytes}; pass 1 or more")
    decoder = codecs.getincrementaldecoder(TEXT_ENCODING)()
    read = 0
    with open(path, "rb") as handle:
        while True:
            data = handle.read(piece_bytes)
            try:
                text = decoder.decode(data, final=not data)
            except UnicodeDecodeError as error:
                raise LlmkitError(f"{path} is not UTF-8 text ({error.reason} at byte {read + error.start:,}); convert "
                                  "it to UTF-8 first") from None
            read += len(data)
            if text:
                yield text
            if not data:
                return


def text_tokens(tokenizer, pieces: Iterable[str], margin: int = MARGIN) -> Iterator[TokenRun]:  # noqa: ANN001
    """The ids `tokenizer` gives the text `pieces` join into (no BOS: `backend.encode(text, add_special_tokens=False)`),
    committed run by run as the pieces arrive.

    Raises:
        LlmkitError: the tokenizer splits the text at a commit point differently once more text follows.
    """
    backend = tokenizer.backend
    context, context_last = "", None  # committed text encoded again (from a committed token's start); its last id
    pending, position = "", 0  # the uncommitted text; where it starts in the whole text
    pieces = iter(pieces)
    piece = next(pieces, None)
    while piece is not None:
        pending, piece = pending + piece, next(pieces, None)  # one piece ahead: the last encode commits everything
        final = piece is None
        if not final and len(pending) < 2 * margin:
            continue
        if not pending:
            return
        joined = context + pending
        encoding = backend.encode(joined, add_special_tokens=False)
        ids, spans = encoding.ids, encoding.offsets
        split = next((i for i, (start, _) in enumerate(spans) if start >= len(context)), len(ids))
        if context and (split == 0 or ids[split - 1] != context_last or spans[split - 1][1] > len(context)
                        or (split < len(ids) and spans[split][0] != len(context))):
            raise LlmkitError(f"the tokenizer splits the text near character {position:,} differently once more text "
                              f"follows (more than {margin} characters on); pass the text whole, or a larger margin")
        cut = len(ids) if final else _commit_point(spans, split, len(joined) - margin)
        if cut <= split and not final:
            continue
        end = len(joined) if final else spans[cut][0]
        offset = position - len(context)  # joined[i] is the whole text's character offset + i
        yield TokenRun(ids[split:cut], [(start + offset, stop + offset) for start, stop in spans[split:cut]],
                       joined[len(context) : end], position)
        if final:
            return
        keep = max(cut - CONTEXT_TOKENS, 0)
        while keep > 0 and not _boundary(spans, keep):
            keep -= 1
        context, context_last = joined[spans[keep][0] : end], ids[cut - 1]
        pending, position = joined[end:], offset + end


def _commit_point(spans: list[tuple[int, int]], split: int, limit: int) -> int:
    """The last token index i > split that starts a clean boundary (the token before ends where it starts, not
    inside one character) at or before character `limit`; `split` when there is none."""
    for index in range(len(spans) - 1, split, -1):
        if spans[index][0] <= limit and _boundary(spans, index):
            return index
    return split


def _boundary(spans: list[tuple[int, int]], index: int) -> bool:
    """Whether token `index` starts right where token index - 1 ends (so the text can be cut there)."""
    return index == 0 or (spans[index - 1][1] <= spans[index][0] and spans[index - 1][0] < spans[index][0])
