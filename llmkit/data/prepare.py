"""`prepare`: tokenize text once into flat token shards (raw uint16/uint32 files) plus a manifest.

Training then memory-maps the shards (llmkit.data.shards) instead of tokenizing on the fly, as nanoGPT's
`prepare.py` and Megatron's indexed datasets do. Every document ends with EOS, so the model learns where text ends.
Shards and the manifest are written atomically, the manifest last: a directory with a manifest is complete.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from llmkit.data.filter import DocumentFilter
from llmkit.data.safety import SafetyRules
from llmkit.data.sources import read_documents
from llmkit.errors import LlmkitError
from llmkit.io import atomic_write, atomic_write_text, read_json_object
from llmkit.tokenizer import PIECE_CHARS, Tokenizer

MANIFEST = "manifest.json"
FORMAT = "llmkit-token-shards"
FORMAT_VERSION = 1
TOKENIZER_DIR = "tokenizer"  # where `llmkit prepare` saves the tokenizer it trains, inside OUTPUT
TRAIN, VAL = "train", "val"
SHARD_PATTERN = "{split}-{index:05d}.bin"
MIN_DOCUMENTS_FOR_DOCUMENT_SPLIT = 20  # fewer documents: validation is the tail of the token stream instead
UINT16_VOCAB_LIMIT = 65536  # ids 0..65535 fit uint16
BATCH_CHARS = 8 * PIECE_CHARS  # a batch of short documents holds at most about this much text


def token_dtype(vocab_size: int) -> np.dtype:
    """Smallest unsigned dtype for ids below `vocab_size`: uint16 up to 65,536 tokens (half the disk), else uint32."""
    return np.dtype(np.uint16 if vocab_size <= UINT16_VOCAB_LIMIT else np.uint32)


def prepare(
    inputs: Sequence[str | Path],
    output: str | Path,
    tokenizer: Tokenizer,
    tokenizer_path: str | None = None,
    text_field: str = "text",
    val_fraction: float = 0.1,
    shard_tokens: int = 100_000_000,
    batch_documents: int = 1024,
    document_separator: str | None = None,
    seed: int = 0,
    show_progress: bool = True,
    safety: SafetyRules | None = None,
) -> dict[str, Any]:
    """Tokenize `inputs` into OUTPUT/{train,val}-NNNNN.bin + manifest.json; a no-op when those are up to date.
    With active `safety` rules each document first passes them (harmful ones dropped, PII redacted or dropped) and
    the manifest's "safety" entry reports what they changed."""
    if not 0 <= val_fraction < 1:
        raise LlmkitError(f"val_fraction {val_fraction} must be in [0, 1): 0.1 keeps a tenth for validation, 0 none")
    if shard_tokens < 1 or batch_documents < 1:
        raise LlmkitError(f"shard_tokens ({shard_tokens}) and batch_documents ({batch_documents}) must be positive")
    if tokenizer.eos_id is None:
        raise LlmkitError(
            f"tokenizer {tokenizer_path or ''} has no EOS token, which prepare appends after every document: "
            "use a tokenizer with an eos_token (llmkit tokenizer train makes <|endoftext|> EOS)"
        )
    output = Path(output)
    if output.exists() and not output.is_dir():
        raise LlmkitError(f"output {output} is a file: pass a folder for the shards and {MANIFEST}")
    header = manifest_header(inputs, output, tokenizer, tokenizer_path, text_field=text_field, val_fraction=val_fraction,
                             shard_tokens=shard_tokens, document_separator=document_separator, seed=seed,
                             safety=safety)
    previous = previous_manifest(output)
    if previous is not None and {key: previous.get(key) for key in header} == header and _intact(output):
        if show_progress:
            print(f"{output}: up to date (same inputs, tokenizer and settings); nothing to do")
        return previous
    _remove_previous(output)

    dtype = np.dtype(header["dtype"])
    writers = {TRAIN: _ShardWriter(output, TRAIN, dtype, shard_tokens)}
    if val_fraction > 0:
        writers[VAL] = _ShardWriter(output, VAL, dtype, shard_tokens)
    texts = read_documents(inputs, text_field, document_separator)
    safety_filter = None
    if safety is not None and safety.active:
        safety_filter = DocumentFilter(None, exact_dedup=False, near_dedup=False, safety=safety)
        texts = (text for reason, text in map(safety_filter.process, texts) if reason is None)
    documents = _encoded_documents(texts, tokenizer, batch_documents, dtype, show_progress)
    split_mode = _split(documents, writers, val_fraction, seed)
    manifest = {**header, "split_mode": split_mode, "splits": {name: writer.close() for name, writer in writers.items()}}
    if safety_filter is not None:
        manifest["safety_report"] = safety_filter.report.to_dict()
    atomic_write_text(output / MANIFEST, json.dumps(manifest, indent=2) + "\n")
    return manifest


def manifest_header(
    inputs: Sequence[str | Path],
    output: str | Path,
    tokenizer: Tokenizer,
    tokenizer_path: str | None,
    text_field: str,
    val_fraction: float,
    shard_tokens: int,
    document_separator: str | None,
    seed: int,
    safety: SafetyRules | None = None,
) -> dict[str, Any]:
    """What prepared shards depend on (inputs, tokenizer, settings): equal headers mean the same shards."""
    from llmkit.data.sources import fingerprint_inputs

    output = Path(output)
    return json.loads(json.dumps({  # through JSON, so it compares equal to a manifest read back
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "dtype": token_dtype(tokenizer.vocab_size).name,
        "vocab_size": tokenizer.vocab_size,
        "eos_id": tokenizer.eos_id,
        "tokenizer": {"path": _recorded_path(tokenizer_path, output),
                      "sha256": hashlib.sha256(tokenizer.backend.to_str().encode()).hexdigest(),
                      "vocab_sha256": tokenizer.fingerprint},
        "settings": {"text_field": text_field, "val_fraction": val_fraction, "shard_tokens": shard_tokens,
                     "document_separator": document_separator, "seed": seed,
                     **({"safety": safety.to_dict()} if safety is not None and safety.active else {})},
        "inputs": fingerprint_inputs(inputs),
    }))  # fmt: skip


def load_manifest(directory: str | Path, verify_checksums: bool = False) -> dict[str, Any]:
    """The manifest of a prepared directory, after checking that every shard is there with the size it lists."""
    directory = Path(directory)
    if not directory.is_dir():
        raise LlmkitError(f"data directory {directory} does not exist: run `llmkit prepare --output {directory}` first")
    if not (directory / MANIFEST).is_file():
        raise LlmkitError(
            f"{directory} has no {MANIFEST}: run `llmkit prepare --output {directory}` first (an interrupted prepare "
            "leaves no manifest)"
        )
    manifest = read_json_object(directory / MANIFEST)
    if manifest.get("format") != FORMAT or manifest.get("format_version") != FORMAT_VERSION:
        raise LlmkitError(
            f"{directory / MANIFEST} is not an llmkit token-shard manifest of format version {FORMAT_VERSION}: "
            f"run `llmkit prepare --output {directory}` again"
        )
    try:
        itemsize = np.dtype(manifest["dtype"]).itemsize
        for split in manifest["splits"].values():
            for entry in split["files"]:
                _check_shard(directory / entry["name"], entry, itemsize, verify_checksums)
    except (KeyError, TypeError) as error:
        raise LlmkitError(f"{directory / MANIFEST} is damaged (missing {error}): run `llmkit prepare` again") from None
    return manifest


def manifest_tokenizer_path(directory: str | Path, manifest: dict[str, Any]) -> Path | None:
    """The tokenizer the shards were made with: a path relative to the data directory or absolute; None if unknown."""
    recorded = manifest.get("tokenizer", {}).get("path")
    return None if recorded is None else Path(directory) / recorded


# ---- tokenizing and splitting ---------------------------------------------------------------------------------------


def _encoded_documents(
    texts: Iterable[str], tokenizer: Tokenizer, batch_documents: int, dtype: np.dtype, show_progress: bool,
) -> Iterator[np.ndarray]:
    """Each non-empty document's ids followed by EOS, tokenized `batch_documents` at a time (in parallel, in Rust)."""
    from tqdm import tqdm

    def encoded(batch: list[str]) -> Iterator[np.ndarray]:
        for ids in tokenizer.encode_batch(batch, add_bos=False):
            if ids:  # an empty document would add a lone EOS
                tokens = np.empty(len(ids) + 1, dtype)
                tokens[:-1], tokens[-1] = ids, tokenizer.eos_id
                yield tokens
        progress.update(len(batch))

    with tqdm(desc="tokenizing", unit=" docs", disable=None if show_progress else True) as progress:
        batch: list[str] = []
        batch_chars = 0
        for text in texts:
            if len(text) > PIECE_CHARS:  # a long document streams through in pieces (order kept: the batch first)
                yield from encoded(batch)
                batch, batch_chars = [], 0
                ids = tokenizer.encode_array(text, dtype, piece_chars=PIECE_CHARS)
                del text
                if len(ids):
                    yield np.append(ids, np.array([tokenizer.eos_id], dtype))
                progress.update(1)
                continue
            batch.append(text)
            batch_chars += len(text)
            if len(batch) >= batch_documents or batch_chars >= BATCH_CHARS:
                yield from encoded(batch)
                batch, batch_chars = [], 0
        yield from encoded(batch)


def _split(documents: Iterator[np.ndarray], writers: dict[str, _ShardWriter], val_fraction: float, seed: int) -> str:
    """Send each document to a split and return how: by document hash ("documents") or the stream's tail ("tail")."""
    head: list[np.ndarray] = []  # documents held until we know the input has enough of them for a document split
    last: tuple[int, np.ndarray] | None = None  # document mode: the newest one, held so that no split ends up empty
    for index, tokens in enumerate(documents):
        if index < MIN_DOCUMENTS_FOR_DOCUMENT_SPLIT - 1:
            head.append(tokens)
            continue
        for held_index, held in enumerate(head):
            writers[_split_of(held_index, seed, val_fraction)].add(held)
        head = []
        if last is not None:
            writers[_split_of(last[0], seed, val_fraction)].add(last[1])
        last = (index, tokens)
    if last is not None:
        empty = [name for name in (VAL, TRAIN) if name in writers and writers[name].n_documents == 0]
        writers[empty[0] if empty else _split_of(last[0], seed, val_fraction)].add(last[1])
        return "documents"
    if not head:
        raise LlmkitError("the inputs hold no text (every document is empty): check the files and --text_field")
    _split_tail(head, writers, val_fraction)
    return "tail"


def _split_of(index: int, seed: int, val_fraction: float) -> str:
    """Validation when a stable hash of (seed, document index) falls below val_fraction: the same on every machine."""
    digest = hashlib.blake2b(f"{seed}:{index}".encode(), digest_size=8).digest()
    return VAL if int.from_bytes(digest, "little") / 2**64 < val_fraction else TRAIN


def _split_tail(documents: list[np.ndarray], writers: dict[str, _ShardWriter], val_fraction: float) -> None:
    """Few documents (one book): the last `val_fraction` of the token stream is validation, the rest training."""
    tokens = np.concatenate(documents)
    n_val = 0 if VAL not in writers else min(max(1, round(len(tokens) * val_fraction)), len(tokens) - 1)
    cut = len(tokens) - n_val
    lengths = np.array([len(document) for document in documents])
    ends = np.cumsum(lengths)
    starts = ends - lengths
    writers[TRAIN].add(tokens[:cut], n_documents=int(np.sum(starts < cut)))  # a document cut in two counts in both
    if n_val:
        writers[VAL].add(tokens[cut:], n_documents=int(np.sum(ends > cut)))


class _ShardWriter:
    """Buffers one split's tokens and writes them as shards of exactly `shard_tokens` (the last one shorter)."""

    def __init__(self, directory: Path, split: str, dtype: np.dtype, shard_tokens: int) -> None:
        self.directory, self.split, self.dtype, self.shard_tokens = directory, split, dtype, shard_tokens
        self.pending: list[np.ndarray] = []
        self.pending_tokens = 0
        self.n_tokens = self.n_documents = 0
        self.files: list[dict[str, Any]] = []

    def add(self, tokens: np.ndarray, n_documents: int = 1) -> None:
        self.pending.append(tokens)
        self.pending_tokens += len(tokens)
        self.n_tokens += len(tokens)
        self.n_documents += n_documents
        if self.pending_tokens >= self.shard_tokens:
            data = np.concatenate(self.pending)
            start = 0
            while len(data) - start >= self.shard_tokens:
                self._write(data[start : start + self.shard_tokens])
                start += self.shard_tokens
            self.pending, self.pending_tokens = [data[start:]], len(data) - start

    def close(self) -> dict[str, Any]:
        if self.pending_tokens:
            self._write(np.concatenate(self.pending))
        self.pending, self.pending_tokens = [], 0
        return {"n_tokens": self.n_tokens, "n_documents": self.n_documents, "files": self.files}

    def _write(self, tokens: np.ndarray) -> None:
        name = SHARD_PATTERN.format(split=self.split, index=len(self.files))
        data = np.ascontiguousarray(tokens, dtype=self.dtype)
        atomic_write(self.directory / name, data.tofile)  # temp name, then rename: never a half shard under `name`
        self.files.append({"name": name, "n_tokens": len(data), "sha256": hashlib.sha256(data.tobytes()).hexdigest()})


# ---- manifest helpers ----------------------------------------------------------------------------------------------


def _recorded_path(tokenizer_path: str | Path | None, output: Path) -> str | None:
    """Relative to the data directory when inside it (the folder can move), else absolute."""
    if tokenizer_path is None:
        return None
    resolved = Path(tokenizer_path).resolve()
    try:
        return str(resolved.relative_to(output.resolve()))
    except ValueError:
        return str(resolved)


def previous_manifest(output: Path) -> dict[str, Any] | None:
    """The manifest already in `output` as stored (unchecked), or None when there is none that reads as JSON."""
    try:
        manifest = json.loads((output / MANIFEST).read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError, UnicodeDecodeError):
        return None
    return manifest if isinstance(manifest, dict) else None


def _intact(output: Path) -> bool:
    try:
        load_manifest(output)
    except LlmkitError:
        return False
    return True


def _remove_previous(output: Path) -> None:
    """Delete the old manifest first (so it never lists missing shards), then every shard of ours."""
    (output / MANIFEST).unlink(missing_ok=True)
    for split in (TRAIN, VAL):
        for shard in output.glob(f"{split}-[0-9][0-9][0-9][0-9][0-9].bin"):
            shard.unlink()


def _check_shard(path: Path, entry: dict[str, Any], itemsize: int, verify_checksum: bool) -> None:
    if not path.is_file():
        raise LlmkitError(f"shard {path} listed in {MANIFEST} is missing: re-run `llmkit prepare` to rebuild the shards")
    expected = entry["n_tokens"] * itemsize
    if path.stat().st_size != expected:
        raise LlmkitError(
            f"shard {path} has {path.stat().st_size:,} bytes but {MANIFEST} lists {entry['n_tokens']:,} tokens "
            f"({expected:,} bytes): it was truncated or changed; re-run `llmkit prepare` to rebuild the shards"
        )
    if verify_checksum:
        from llmkit.data.sources import file_sha256

        if file_sha256(path) != entry["sha256"]:
            raise LlmkitError(f"shard {path} does not match its sha256 in {MANIFEST}: re-run `llmkit prepare`")
