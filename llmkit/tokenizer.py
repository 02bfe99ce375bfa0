"""Tokenizer: a Hugging Face `tokenizers` BPE plus the model's rules (BOS, stop tokens, chat template).

The `tokenizers` library does the BPE; llmkit builds its pipeline from a GGUF file's metadata the way llama.cpp
reads it (`tokenizer.ggml.pre` picks the pre-tokenizer regexes) or loads a Hugging Face `tokenizer.json`.

GGUF files hold two kinds: byte-level BPE ("gpt2": merges listed) and SentencePiece BPE ("llama": Llama 1/2, Gemma;
tokens with scores and byte-fallback tokens <0x00>..<0xFF>, no merges). SentencePiece BPE repeatedly joins the
adjacent pair whose joined piece is in the vocabulary and ranks best, which is a BPE whose merges are every
(left, right) split of a vocabulary piece, ranked by that piece's rank; spaces are spelled "▁" (with one in
front of the text when `tokenizer.ggml.add_space_prefix`), and a character outside the vocabulary becomes its UTF-8
bytes' tokens. The rank is the file's order (the trainer's), as transformers' GGUF reader uses for Gemma: Gemma's
scores put its user-defined runs of spaces last (-1000), which SentencePiece matches whole instead.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from tokenizers import AddedToken, Regex, decoders, normalizers, pre_tokenizers, processors
from tokenizers import Tokenizer as BackendTokenizer
from tokenizers.models import BPE

from llmkit.chat_template import render_chat_template
from llmkit.errors import LlmkitError
from llmkit.gguf_file import GgufFile
from llmkit.io import atomic_write_text, read_json_object

# Hugging Face tokenizer directory files.
TOKENIZER_FILE = "tokenizer.json"
TOKENIZER_CONFIG_FILE = "tokenizer_config.json"
CHAT_TEMPLATE_FILE = "chat_template.jinja"
SPECIAL_TOKENS_MAP_FILE = "special_tokens_map.json"

# GGUF metadata keys (https://github.com/ggml-org/ggml/blob/master/docs/gguf.md, "Tokenizer").
GGUF_MODEL = "tokenizer.ggml.model"
GGUF_PRE = "tokenizer.ggml.pre"
GGUF_TOKENS = "tokenizer.ggml.tokens"
GGUF_MERGES = "tokenizer.ggml.merges"
GGUF_TOKEN_TYPE = "tokenizer.ggml.token_type"
GGUF_BOS_ID = "tokenizer.ggml.bos_token_id"
GGUF_EOS_ID = "tokenizer.ggml.eos_token_id"
GGUF_PAD_ID = "tokenizer.ggml.padding_token_id"
GGUF_ADD_BOS = "tokenizer.ggml.add_bos_token"
GGUF_CHAT_TEMPLATE = "tokenizer.chat_template"
GGUF_BYTE_LEVEL_BPE = "gpt2"
GGUF_SENTENCEPIECE = "llama"  # SentencePiece BPE with scores and byte fallback (Llama 1/2, Gemma)
GGUF_ADD_SPACE_PREFIX = "tokenizer.ggml.add_space_prefix"
GGUF_UNKNOWN_ID = "tokenizer.ggml.unknown_token_id"
SPM_SPACE = "\u2581"  # SentencePiece's visible space
GGUF_TOKEN_TYPE_CONTROL = 3  # special tokens (<|im_start|>): matched in text, skipped by skip_special_tokens
GGUF_TOKEN_TYPE_USER_DEFINED = 4  # added tokens: matched in text, kept when decoding

# Pre-tokenizer regexes, as llama.cpp's llm_tokenizer_bpe uses them (src/llama-vocab.cpp).
GPT2_REGEX = r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)"
LLAMA3_REGEX = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+"
    r"|\s+(?!\S)|\s+"
)
QWEN2_REGEX = LLAMA3_REGEX.replace(r"\p{N}{1,3}", r"\p{N}")  # digits one by one
# llama.cpp's "default" pre-type applies these in turn, each splitting the pieces of the previous one.
DEFAULT_REGEXES = (r"[\p{P}\$\+<=>\^~\|]+", GPT2_REGEX, r"\p{N}+", r"[0-9][0-9][0-9]")

# tokenizer.ggml.pre value -> pre-tokenizer family (the names llama.cpp maps to the same regexes).
PRE_FAMILIES = {
    "default": "default",
    "gpt-2": "gpt2", "phi-2": "gpt2", "mpt": "gpt2", "olmo": "gpt2",
    "smollm": "smollm", "starcoder": "smollm", "refact": "smollm", "command-r": "smollm", "codeshell": "smollm",
    "llama3": "llama3", "llama-v3": "llama3", "llama-bpe": "llama3", "falcon3": "llama3",
    "qwen2": "qwen2", "stablelm2": "qwen2", "deepseek-r1-qwen": "qwen2",
}  # fmt: skip

# Token texts llama.cpp treats as end of generation wherever they are in the vocabulary (llama-vocab.cpp).
END_OF_TURN_TOKENS = (
    "<|eot_id|>", "<|im_end|>", "<|end|>", "<end_of_turn>", "<|endoftext|>", "<|eom_id|>", "<EOT>", "_<EOT>",
    "<|end_of_text|>", "<end_of_utterance>",
)  # fmt: skip

REPLACEMENT_CHAR = "\ufffd"  # what a decoder prints for an incomplete UTF-8 sequence
# Texts longer than this are tokenized in pieces of about this many characters: the library's Encoding of a 50 MB
# text (ids, offsets, token strings, masks) and its Python list of ids peaked at 7.8 GB.
PIECE_CHARS = 1 << 18  # 256K characters: a piece's transient Encoding stays some tens of MB
PIECES_PER_BATCH = 8  # pieces encoded at once (in parallel by the library)


class Tokenizer:
    """A BPE tokenizer with the model's BOS rule, stop tokens and chat template."""

    def __init__(
        self,
        backend: BackendTokenizer,
        bos_id: int | None = None,
        eos_id: int | None = None,
        pad_id: int | None = None,
        add_bos: bool = False,
        chat_template: str | None = None,
    ) -> None:
        self.backend = backend  # the `tokenizers.Tokenizer` doing the work
        self.bos_id, self.eos_id, self.pad_id = bos_id, eos_id, pad_id
        self.add_bos = add_bos  # whether encode() prepends BOS by default (the model's rule)
        self.chat_template = chat_template
        self.source: str | None = None  # the file or directory it was loaded from, for messages
        if add_bos and bos_id is None:
            raise LlmkitError("add_bos=True but the tokenizer has no BOS token: pass bos_id or add_bos=False")

    # ---- loading -------------------------------------------------------------------------------------------------

    @classmethod
    def from_gguf(cls, path: str | Path) -> Tokenizer:
        """Build the tokenizer a GGUF file describes (byte-level BPE 'gpt2' or SentencePiece 'llama') as llama.cpp
        would."""
        path = _existing(path)
        if path.is_dir():
            raise LlmkitError(f"{path} is a directory, not a GGUF file: use Tokenizer.from_dir for a HF directory")
        fields = _read_gguf_tokenizer_fields(path)

        def required(key: str) -> Any:
            if key not in fields:
                raise LlmkitError(f"{path} has no '{key}' metadata: it is not a GGUF file with a tokenizer")
            return fields[key]

        tokenizer_model = required(GGUF_MODEL)
        tokens: list[str] = required(GGUF_TOKENS)
        token_types = fields.get(GGUF_TOKEN_TYPE, [1] * len(tokens))
        if tokenizer_model == GGUF_BYTE_LEVEL_BPE:
            backend, pre_adds_bos = _byte_level_backend(tokens, required(GGUF_MERGES), fields.get(GGUF_PRE, "default"),
                                                        path)
        elif tokenizer_model == GGUF_SENTENCEPIECE:
            tokens = _spm_spelling(tokens)
            backend = _sentencepiece_backend(tokens, fields.get(GGUF_UNKNOWN_ID),
                                             bool(fields.get(GGUF_ADD_SPACE_PREFIX, True)))
            pre_adds_bos = True  # llama.cpp adds BOS for a SentencePiece vocabulary unless the file says otherwise
        else:
            raise LlmkitError(
                f"{path}: {GGUF_MODEL} = '{tokenizer_model}' is not supported; llmkit reads byte-level BPE ('gpt2') "
                "and SentencePiece BPE ('llama') tokenizers: use the model's Hugging Face tokenizer.json with "
                "Tokenizer.from_dir instead"
            )
        control = [_added(tokens[i]) for i, t in enumerate(token_types) if t == GGUF_TOKEN_TYPE_CONTROL]
        # (a SentencePiece run of spaces respelled as "▁▁" is reached by merges, not matched as added text)
        user_defined = [_added(tokens[i], False) for i, t in enumerate(token_types)
                        if t == GGUF_TOKEN_TYPE_USER_DEFINED and SPM_SPACE not in tokens[i]]
        backend.add_special_tokens(control)
        backend.add_tokens(user_defined)

        bos_id = fields.get(GGUF_BOS_ID)
        add_bos = bool(fields.get(GGUF_ADD_BOS, pre_adds_bos)) and bos_id is not None
        _sync_post_processor(backend, add_bos, bos_id)
        eos_id, pad_id, chat_template = fields.get(GGUF_EOS_ID), fields.get(GGUF_PAD_ID), fields.get(GGUF_CHAT_TEMPLATE)
        tokenizer = cls(backend, bos_id, eos_id, pad_id, add_bos, chat_template)
        tokenizer.source = str(path)
        return tokenizer

    @classmethod
    def from_dir(cls, path: str | Path) -> Tokenizer:
        """Load a Hugging Face tokenizer directory: tokenizer.json, tokenizer_config.json, chat_template.jinja."""
        path = _existing(path)
        if not path.is_dir():
            raise LlmkitError(f"{path} is not a directory: pass the directory holding {TOKENIZER_FILE}")
        tokenizer_file = path / TOKENIZER_FILE
        if not tokenizer_file.is_file():
            raise LlmkitError(
                f"{path} has no {TOKENIZER_FILE}: pass a Hugging Face tokenizer directory (one saved by "
                "save_pretrained or Tokenizer.save), or a .gguf file to Tokenizer.from_gguf"
            )
        try:
            backend = BackendTokenizer.from_file(str(tokenizer_file))
        except Exception as error:  # tokenizers raises a bare Exception on bad JSON
            raise LlmkitError(
                f"{tokenizer_file} is not a valid tokenizer file ({error}): save the tokenizer again"
            ) from error
        # Some tokenizer.json files pad or truncate every text to a fixed length (all-MiniLM-L6-v2: 128);
        # llmkit pads its own batches and refuses over-long prompts with a message instead.
        backend.no_padding()
        backend.no_truncation()
        config = _read_json(path / TOKENIZER_CONFIG_FILE)
        special_map = _read_json(path / SPECIAL_TOKENS_MAP_FILE)

        def token_id(name: str) -> int | None:
            text = _token_text(config.get(name, special_map.get(name)))
            if text is None:
                return None
            found = backend.token_to_id(text)
            if found is None:
                raise LlmkitError(
                    f"{path}: {name} '{text}' is not in {TOKENIZER_FILE}'s vocabulary: fix {TOKENIZER_CONFIG_FILE}"
                )
            return found

        bos_id = token_id("bos_token")
        if "add_bos_token" in config:
            add_bos = bool(config["add_bos_token"]) and bos_id is not None
        else:  # no explicit rule: BOS is added when the post-processor adds it
            add_bos = bos_id is not None and _post_processor_adds(backend, bos_id)
        template_file = path / CHAT_TEMPLATE_FILE
        if template_file.is_file():
            chat_template = template_file.read_text(encoding="utf-8")
        else:
            chat_template = _template_text(config.get("chat_template"))
        tokenizer = cls(backend, bos_id, token_id("eos_token"), token_id("pad_token"), add_bos, chat_template)
        tokenizer.source = str(path)
        return tokenizer

    def save(self, path: str | Path) -> None:
        """Write tokenizer.json and tokenizer_config.json that llmkit and transformers both load to the same ids."""
        path = Path(path)
        backend = BackendTokenizer.from_str(self.backend.to_str())  # a copy: saving leaves self unchanged
        _sync_post_processor(backend, self.add_bos, self.bos_id)
        config: dict[str, Any] = {
            "tokenizer_class": "PreTrainedTokenizerFast",
            "add_bos_token": self.add_bos,
            "add_eos_token": False,
            "clean_up_tokenization_spaces": False,  # decode must give back the text exactly
        }
        for name, token_id in (("bos_token", self.bos_id), ("eos_token", self.eos_id), ("pad_token", self.pad_id)):
            config[name] = None if token_id is None else self.id_to_token(token_id)
        config["chat_template"] = self.chat_template
        atomic_write_text(path / TOKENIZER_FILE, backend.to_str())
        atomic_write_text(path / TOKENIZER_CONFIG_FILE, json.dumps(config, indent=2, ensure_ascii=False) + "\n")
        template_file = path / CHAT_TEMPLATE_FILE
        if template_file.exists():  # an older template file would win over the config on loading
            if self.chat_template is None:
                template_file.unlink()
            else:
                atomic_write_text(template_file, self.chat_template)

    # ---- vocabulary ----------------------------------------------------------------------------------------------

    @property
    def vocab_size(self) -> int:
        return self.backend.get_vocab_size(with_added_tokens=True)

    @property
    def fingerprint(self) -> str:
        """sha256 of the vocabulary (token -> id, added tokens included) and the BPE merges: equal for two tokenizers
        that give the same ids, whichever file (GGUF, tokenizer.json) they were loaded from. Shards and models are
        compared by it, since two vocabularies of one size can map every id to a different token."""
        import hashlib

        model = json.loads(self.backend.to_str()).get("model", {})
        merges = [merge if isinstance(merge, str) else " ".join(merge) for merge in model.get("merges", [])]
        vocab = sorted(self.backend.get_vocab(with_added_tokens=True).items(), key=lambda item: item[1])
        payload = json.dumps({"vocab": vocab, "merges": merges}, ensure_ascii=False, separators=(",", ":"))
        return hashlib.sha256(payload.encode()).hexdigest()

    @property
    def max_token_chars(self) -> int:
        """Most characters one token can stand for (its byte-level text is one character per byte; added tokens as
        written): a text of n characters has at least n / max_token_chars tokens, so longer texts can be cut first."""
        if not hasattr(self, "_max_token_chars"):
            self._max_token_chars = max(len(token) for token in self.backend.get_vocab(with_added_tokens=True))
        return self._max_token_chars

    def token_to_id(self, token: str) -> int | None:
        return self.backend.token_to_id(token)

    def id_to_token(self, token_id: int) -> str | None:
        return self.backend.id_to_token(token_id)

    @property
    def special_ids(self) -> set[int]:
        """Ids of special (control) tokens: the ones decode(skip_special_tokens=True) drops."""
        return {token_id for token_id, token in self.backend.get_added_tokens_decoder().items() if token.special}

    @property
    def bos_prefix(self) -> list[int]:
        """[BOS] when the tokenizer has one, else []: what a row starts with whatever `add_bos` says (CLIP's caption
        rows; a VLM's rows, where it keeps the image off the LM's first position, see data/vlm_data.py)."""
        return [] if self.bos_id is None else [self.bos_id]

    @property
    def stop_ids(self) -> set[int]:
        """EOS plus end-of-turn tokens (<|im_end|>, <|eot_id|>, ...): generation stops at any of them."""
        found = {self.backend.token_to_id(text) for text in END_OF_TURN_TOKENS}
        return {token_id for token_id in found | {self.eos_id} if token_id is not None}

    # ---- encoding and decoding -----------------------------------------------------------------------------------

    def encode(self, text: str, add_bos: bool | None = None) -> list[int]:
        """Token ids of `text`; BOS first when `add_bos` (default: the model's rule `self.add_bos`)."""
        ids = self.backend.encode(text, add_special_tokens=False).ids
        return self._with_bos(ids, add_bos)

    def encode_batch(self, texts: Sequence[str], add_bos: bool | None = None) -> list[list[int]]:
        """encode() of each text, run in parallel by the library."""
        encodings = self.backend.encode_batch(list(texts), add_special_tokens=False)
        return [self._with_bos(encoding.ids, add_bos) for encoding in encodings]

    def encode_array(self, text: str, dtype: np.dtype | type = np.uint32, piece_chars: int = PIECE_CHARS) -> np.ndarray:
        """encode(text, add_bos=False) as a numpy array, tokenized in pieces of about `piece_chars` characters cut by
        `text_pieces`, so a long text never holds the library's whole Encoding nor a Python list of millions of ints.
        The ids equal encode()'s for the pre-tokenizers llmkit builds (see text_pieces)."""
        pieces = text_pieces(text, piece_chars)
        arrays = []
        for start in range(0, len(pieces), PIECES_PER_BATCH):
            encodings = self.backend.encode_batch(pieces[start : start + PIECES_PER_BATCH], add_special_tokens=False)
            arrays.extend(np.asarray(encoding.ids, dtype=dtype) for encoding in encodings)
        return np.concatenate(arrays) if arrays else np.zeros(0, dtype)

    def decode(self, ids: Iterable[int], skip_special_tokens: bool = False) -> str:
        """Text of `ids`; incomplete UTF-8 at the end shows as U+FFFD (use StreamDecoder while generating)."""
        ids = [int(token_id) for token_id in ids]
        if ids and (min(ids) < 0 or max(ids) >= self.vocab_size):
            bad = next(token_id for token_id in ids if not 0 <= token_id < self.vocab_size)
            raise LlmkitError(
                f"token id {bad} is outside the vocabulary ({self.vocab_size} tokens): "
                "the ids come from a different model or the logits cover padding rows; slice them to vocab_size"
            )
        return self.backend.decode(ids, skip_special_tokens=skip_special_tokens)

    def _with_bos(self, ids: list[int], add_bos: bool | None) -> list[int]:
        add = self.add_bos if add_bos is None else add_bos
        if not add:
            return list(ids)
        if self.bos_id is None:
            raise LlmkitError("add_bos=True but this tokenizer has no BOS token: call encode with add_bos=False")
        return [self.bos_id, *ids]

    # ---- chat ----------------------------------------------------------------------------------------------------

    def apply_chat_template(
        self, messages: Sequence[Mapping[str, Any]], add_generation_prompt: bool = True, **template_kwargs: Any
    ) -> str:
        """Render `messages` ([{'role': ..., 'content': ...}]) with the model's jinja chat template."""
        if self.chat_template is None:
            raise LlmkitError(
                "this tokenizer has no chat template: pass one (Tokenizer.chat_template = '...jinja...') "
                "or use generate with a plain prompt"
            )
        special = {"bos_token": self.bos_id, "eos_token": self.eos_id, "pad_token": self.pad_id}
        variables = {name: self.id_to_token(i) for name, i in special.items() if i is not None}
        name = f"the chat template of {self.source}" if self.source else "the chat template"
        return render_chat_template(self.chat_template, messages, add_generation_prompt, name=name,
                                    **{**variables, **template_kwargs})


class StreamDecoder:
    """Turn token ids fed one at a time into text pieces that never end in half a UTF-8 character.

    Byte-level BPE can split one character (an emoji, a CJK ideograph) over several tokens; a piece is
    released only once its text no longer ends in U+FFFD. Joined, the pieces equal decode(all ids).
    """

    def __init__(self, tokenizer: Tokenizer, skip_special_tokens: bool = False) -> None:
        self.tokenizer = tokenizer
        self.skip_special_tokens = skip_special_tokens
        self.ids: list[int] = []
        self.prefix_offset = 0  # ids[prefix_offset:read_offset] were already printed; decoded again for context
        self.read_offset = 0

    def push(self, token_id: int) -> str:
        """Add one id; return the new complete text ('' while a character is still incomplete)."""
        self.ids.append(int(token_id))
        prefix_text = self._decode(self.ids[self.prefix_offset : self.read_offset])
        new_text = self._decode(self.ids[self.prefix_offset :])
        if len(new_text) <= len(prefix_text) or new_text.endswith(REPLACEMENT_CHAR):
            return ""
        self.prefix_offset, self.read_offset = self.read_offset, len(self.ids)
        return new_text[len(prefix_text) :]

    def flush(self) -> str:
        """Return whatever is left (invalid bytes show as U+FFFD, as in decode) and start over."""
        prefix_text = self._decode(self.ids[self.prefix_offset : self.read_offset])
        rest = self._decode(self.ids[self.prefix_offset :])[len(prefix_text) :]
        self.ids, self.prefix_offset, self.read_offset = [], 0, 0
        return rest

    def _decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=self.skip_special_tokens)


def text_pieces(text: str, piece_chars: int = PIECE_CHARS) -> list[str]:
    """`text` cut into pieces of at most about `piece_chars` characters, each cut just before a space (U+0020) that
    follows a character other than whitespace. No pre-tokenizer piece of the byte-level regexes (GPT-2, Llama 3,
    Qwen2, llama.cpp's default) runs from a non-space character into a following space, and the piece that starts at
    the space is the same with or without the text before it: the pieces tokenize to the same ids as the whole.
    A stretch with no such space longer than `piece_chars` stays whole."""
    pieces: list[str] = []
    start = 0
    while len(text) - start > piece_chars:
        cut = _cut_before(text, start, start + piece_chars)
        if cut is None:
            break
        pieces.append(text[start:cut])
        start = cut
    pieces.append(text[start:])
    return pieces


def text_tail(text: str, n_chars: int) -> str:
    """The end of `text`, at least `n_chars` long where possible, cut just before a space that follows a non-space
    (as text_pieces cuts), so its ids are the last ids of the whole text."""
    if len(text) <= n_chars:
        return text
    cut = _cut_before(text, 0, len(text) - n_chars)
    return text if cut is None else text[cut:]


def _cut_before(text: str, start: int, end: int) -> int | None:
    """The last position in (start, end] holding a space after a non-whitespace character; else the first after
    `end`; None if there is none."""
    cut = text.rfind(" ", start + 1, end + 1)
    while cut > start and text[cut - 1].isspace():
        cut = text.rfind(" ", start + 1, cut)
    if cut > start:
        return cut
    cut = text.find(" ", end)
    while cut != -1 and text[cut - 1].isspace():
        cut = text.find(" ", cut + 1)
    return None if cut == -1 else cut


def stream_decode(tokenizer: Tokenizer, ids: Iterable[int], skip_special_tokens: bool = False) -> Iterator[str]:
    """Yield the non-empty text pieces of `ids` as they complete (StreamDecoder over an iterable)."""
    decoder = StreamDecoder(tokenizer, skip_special_tokens)
    for token_id in ids:
        piece = decoder.push(token_id)
        if piece:
            yield piece
    rest = decoder.flush()
    if rest:
        yield rest


# ---- helpers -------------------------------------------------------------------------------------------------------


def _existing(path: str | Path) -> Path:
    path = Path(path)
    if not path.exists():
        raise LlmkitError(
            f"tokenizer not found: {path}: pass a .gguf file or a Hugging Face directory with {TOKENIZER_FILE}"
        )
    return path


def _read_gguf_tokenizer_fields(path: Path) -> dict[str, Any]:
    """The `tokenizer.*` metadata of a GGUF file as Python values."""
    try:
        fields = GgufFile(path).fields
        return {key: value for key, value in fields.items() if key.startswith("tokenizer.")}
    except (ValueError, OSError) as error:  # not GGUF, truncated, corrupt (llmkit.gguf_file), unreadable
        raise LlmkitError(
            f"{path} is not a readable GGUF file ({type(error).__name__}: {error}): "
            "download it again or pass a Hugging Face directory with tokenizer.json"
        ) from None


def _byte_level_backend(tokens: list[str], merges: list[str], pre: str, path: Path) -> tuple[BackendTokenizer, bool]:
    """A GGUF 'gpt2' vocabulary: byte-level BPE with the file's merges and the pre-tokenizer `pre` names; also
    whether that pre-tokenizer's family adds BOS by default."""
    pre_tokenizer, ignore_merges, pre_adds_bos = _pre_tokenizer(pre, path)
    vocab: dict[str, int] = {}
    for token_id, token in enumerate(tokens):
        vocab.setdefault(token, token_id)
    pairs = [tuple(merge.split(" ", 1)) for merge in merges]
    try:
        bpe = BPE(vocab=vocab, merges=pairs, ignore_merges=ignore_merges, fuse_unk=False)
    except Exception as error:  # a merge naming a token missing from the vocabulary
        raise LlmkitError(f"{path}: {GGUF_MERGES} do not fit {GGUF_TOKENS} ({error}): the file is damaged") from error
    backend = BackendTokenizer(bpe)
    backend.pre_tokenizer = pre_tokenizer
    backend.decoder = decoders.ByteLevel()
    return backend, pre_adds_bos


def _spm_spelling(tokens: list[str]) -> list[str]:
    """Gemma's GGUF stores its tokens of two or more spaces as real spaces; SentencePiece spells every space
    SPM_SPACE, so those are respelled (as transformers' GGUF reader does) and merges reach them."""
    return [SPM_SPACE * len(token) if " " in token and not token.strip() else token for token in tokens]


def _sentencepiece_backend(tokens: list[str], unknown_id: int | None, add_space_prefix: bool) -> BackendTokenizer:
    """SentencePiece BPE as a `tokenizers` BPE (see the module docstring): merges are the splits of each piece into
    two vocabulary pieces, in the file's order of the joined piece, with byte fallback."""
    vocab: dict[str, int] = {}
    for token_id, token in enumerate(tokens):
        vocab.setdefault(token, token_id)
    merges = []
    for token_id, token in enumerate(tokens):
        if vocab[token] != token_id or len(token) < 2:
            continue
        splits = [(token[:cut], token[cut:]) for cut in range(1, len(token))]
        merges += sorted(((left, right) for left, right in splits if left in vocab and right in vocab),
                         key=lambda pair: (vocab[pair[0]], vocab[pair[1]]))
    unknown = tokens[unknown_id] if unknown_id is not None else None
    backend = BackendTokenizer(BPE(vocab=vocab, merges=merges, unk_token=unknown, fuse_unk=True, byte_fallback=True))
    spaces = normalizers.Replace(" ", SPM_SPACE)
    backend.normalizer = normalizers.Sequence([normalizers.Prepend(SPM_SPACE), spaces]) if add_space_prefix else spaces
    steps = [decoders.Replace(SPM_SPACE, " "), decoders.ByteFallback(), decoders.Fuse()]
    if add_space_prefix:
        steps.append(decoders.Strip(" ", 1, 0))  # the space the normalizer put in front
    backend.decoder = decoders.Sequence(steps)
    return backend


def _pre_tokenizer(pre: str, path: Path) -> tuple[pre_tokenizers.PreTokenizer, bool, bool]:
    """(pre-tokenizer, ignore_merges, adds BOS by default) for a GGUF `tokenizer.ggml.pre` value."""
    family = PRE_FAMILIES.get(pre)
    byte_level = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)

    def splits(*regexes: str) -> pre_tokenizers.PreTokenizer:
        parts = [pre_tokenizers.Split(Regex(regex), behavior="isolated") for regex in regexes]
        return pre_tokenizers.Sequence([*parts, byte_level])

    if family == "gpt2":  # ByteLevel's own regex is GPT-2's
        return pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True), False, False
    if family == "smollm":  # each digit on its own, then GPT-2's regex
        digits = pre_tokenizers.Digits(individual_digits=True)
        return pre_tokenizers.Sequence([digits, pre_tokenizers.ByteLevel(add_prefix_space=False)]), False, False
    if family == "llama3":  # llama.cpp: whole words found in the vocab skip merging, BOS added
        return splits(LLAMA3_REGEX), True, True
    if family == "qwen2":
        return splits(QWEN2_REGEX), False, False
    if family == "default":
        return splits(*DEFAULT_REGEXES), False, False
    raise LlmkitError(
        f"{path}: {GGUF_PRE} = '{pre}' is not a pre-tokenizer llmkit knows (known: {', '.join(sorted(PRE_FAMILIES))}): "
        "use the model's Hugging Face tokenizer.json with Tokenizer.from_dir"
    )


def _sync_post_processor(backend: BackendTokenizer, add_bos: bool, bos_id: int | None) -> None:
    """Make the post-processor add BOS exactly when `add_bos`, so loaders of tokenizer.json get llmkit's ids."""
    if add_bos == (bos_id is not None and _post_processor_adds(backend, bos_id)):
        return
    if add_bos:
        bos = backend.id_to_token(bos_id)
        backend.post_processor = processors.TemplateProcessing(
            single=f"{bos} $A", pair=f"{bos} $A {bos} $B", special_tokens=[(bos, bos_id)]
        )
    else:
        backend.post_processor = processors.ByteLevel(trim_offsets=False)


def _added(content: str, special: bool = True) -> AddedToken:
    return AddedToken(content, special=special, normalized=False)


def _post_processor_adds(backend: BackendTokenizer, token_id: int) -> bool:
    """Whether the post-processor puts `token_id` in front of an encoding (e.g. Llama 3's TemplateProcessing)."""
    with_special = backend.encode("a", add_special_tokens=True).ids
    return len(with_special) > len(backend.encode("a", add_special_tokens=False).ids) and with_special[0] == token_id


def _read_json(path: Path) -> dict[str, Any]:
    """A tokenizer directory's optional JSON file: {} when absent."""
    return read_json_object(path) if path.is_file() else {}


def _token_text(value: Any) -> str | None:
    """A special token in tokenizer_config.json is a string or an AddedToken dict with 'content'."""
    if isinstance(value, Mapping):
        return value.get("content")
    return value if isinstance(value, str) else None


def _template_text(value: Any) -> str | None:
    """tokenizer_config.json's chat_template is a string or a list of {'name', 'template'}; take 'default'."""
    if isinstance(value, list):
        named = {entry.get("name"): entry.get("template") for entry in value if isinstance(entry, Mapping)}
        return named.get("default")
    return value if isinstance(value, str) else None
