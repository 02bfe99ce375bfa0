"""JSON-constrained decoding: every output parses with `json.loads` and, given a schema, validates against it.

`JsonConstraint(tokenizer, schema)` is a token constraint (the serving engine's `TokenConstraint`: `pick`,
`advance`, `complete`). It runs an incremental JSON parser (llmkit/generate/json_grammar.py; the supported schema
subset is listed in json_schema.py) over the UTF-8 bytes of the tokens chosen so far, and allows a token only when
its bytes keep the document valid. Tokens are checked by bytes, not characters, so a byte-level token that holds part of a
multi-byte character is allowed inside a string exactly when the character it starts can still be completed.
Special tokens are never allowed, except the stop ids (EOS, end of turn), which are allowed only when the document
is whole.

Exact sampling from the restricted distribution. With processed logits l (temperature, top-k, top-p as in
`sample_next`) the model's next-token distribution is p = softmax(l); the constraint must draw from
p restricted to the allowed set A and renormalised, p_A(i) = p(i) / sum_{j in A} p(j). `pick` uses the Gumbel-max
trick (Gumbel 1954; Maddison et al. 2014): with independent G_i ~ Gumbel(0, 1),
argmax_{i in A} (l_i + G_i) ~ p_A. Sorting all tokens by l_i + G_i and taking the first allowed one is
rejection sampling without replacement (draw, reject a disallowed token, redraw from the rest renormalised), and it
bounds the work: the ranking is one vectorised top-k, the best 64 are checked in descending order and, if none is
allowed, the tokens whose first byte the parser refuses are masked out in one vectorised lookup before the checks go
on. Greedy decoding is the same with G = 0: the most likely allowed token. If top-k/top-p left no allowed token,
the allowed tokens are ranked by the temperature-only distribution instead (so a document can always continue).

Whitespace between JSON tokens is capped at `max_whitespace` bytes in a row (models loop on newlines and spaces).

Termination. The engine's max_new_tokens is not the constraint's business, so a document can be cut short by it
(finish_reason "length", text that does not parse: what OpenAI's API does too). Give the constraint the same
budget (`max_tokens`) to rule that out: a token is then allowed only if the shortest completion of the document
after it (in bytes, each at most one token, since byte-level vocabularies hold every single byte) still fits the
tokens left. Near the end of the budget only the tokens that close the document remain, so every output parses.
"""

from __future__ import annotations

import json
import re
import weakref
from dataclasses import dataclass
from typing import Any

import torch

from llmkit.errors import LlmkitError
from llmkit.generate.compiled import decode_step
from llmkit.generate.decode import checked_prompts
from llmkit.generate.json_grammar import JsonParser
from llmkit.generate.json_schema import compile_schema
from llmkit.generate.sampling import (
    SamplingSettings,
    apply_repetition_penalty,
    make_generator,
    process_logits,
    seen_tokens,
)
from llmkit.tokenizer import Tokenizer

CHECK_BATCH = 64  # candidates checked in Python per vectorised top-k
NO_FIRST_BYTE = 256  # first-byte code of a token that is never allowed (special, empty)
DEFAULT_MAX_WHITESPACE = 20
BYTE_FALLBACK = re.compile(r"^<0x([0-9A-Fa-f]{2})>$")  # SentencePiece byte tokens, e.g. <0x0A>


@dataclass(frozen=True)
class TokenTable:
    """Each token's UTF-8 bytes (None: never allowed) and its first byte (NO_FIRST_BYTE for those), per tokenizer."""

    texts: list[bytes | None]
    first_byte: torch.Tensor  # (V,) int64
    stop_ids: frozenset[int]


_TABLES: weakref.WeakKeyDictionary[Tokenizer, TokenTable] = weakref.WeakKeyDictionary()


def token_table(tokenizer: Tokenizer) -> TokenTable:
    """The tokenizer's TokenTable, built once per tokenizer object (about a second for a 50k vocabulary)."""
    table = _TABLES.get(tokenizer)
    if table is None:
        texts = _token_bytes(tokenizer)
        first = [text[0] if text else NO_FIRST_BYTE for text in texts]
        table = TokenTable(texts, torch.tensor(first, dtype=torch.int64), frozenset(tokenizer.stop_ids))
        _TABLES[tokenizer] = table
    return table


def _token_bytes(tokenizer: Tokenizer) -> list[bytes | None]:
    """Bytes of every token id. Byte-level BPE (GPT-2, Llama 3, SmolLM2, Qwen): the token string maps back to bytes
    through GPT-2's byte alphabet, exactly, partial characters included. Other vocabularies: <0xNN> byte tokens are
    their byte; any other token is decoded after an anchor token and the anchor's text removed, since decoders such
    as SentencePiece's strip a leading space from a text's first token."""
    backend = tokenizer.backend
    described = json.loads(backend.to_str())
    unknown = backend.token_to_id(described.get("model", {}).get("unk_token") or "")
    special = tokenizer.special_ids | ({unknown} if unknown is not None else set())  # <unk> is no text either
    added = {token_id: token.content for token_id, token in backend.get_added_tokens_decoder().items()}
    size = tokenizer.vocab_size
    if _is_byte_level(described.get("decoder") or {}):
        alphabet = {char: byte for byte, char in enumerate(_byte_alphabet())}
        texts: list[bytes | None] = []
        for token_id in range(size):
            token = backend.id_to_token(token_id)
            if token_id in special or token is None:
                texts.append(None)
            elif token_id in added:
                texts.append(added[token_id].encode() or None)
            elif all(char in alphabet for char in token):
                texts.append(bytes(alphabet[char] for char in token) or None)
            else:
                texts.append(None)
        return texts
    anchor = next(i for i in range(size) if i not in special and tokenizer.decode([i]).strip())
    anchor_text = tokenizer.decode([anchor])
    decoded = backend.decode_batch([[anchor, i] for i in range(size)], skip_special_tokens=False)
    texts = []
    for token_id, text in enumerate(decoded):
        token = backend.id_to_token(token_id) or ""
        match = BYTE_FALLBACK.match(token)
        if token_id in special:
            texts.append(None)
        elif match:
            texts.append(bytes([int(match.group(1), 16)]))
        elif text.startswith(anchor_text) and "\ufffd" not in text:
            texts.append(text[len(anchor_text):].encode() or None)
        else:
            texts.append(None)
    return texts


def _is_byte_level(decoder: dict[str, Any]) -> bool:
    """Whether the tokenizer's decoder (its tokenizer.json entry) is, or contains, GPT-2's ByteLevel decoder."""
    parts = decoder.get("decoders", [decoder]) if decoder.get("type") == "Sequence" else [decoder]
    return any(part.get("type") == "ByteLevel" for part in parts)


def _byte_alphabet() -> list[str]:
    """GPT-2's bytes_to_unicode: the printable character each byte value is written as in a byte-level vocabulary."""
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), 256))
    chars, extra = {}, 0
    for byte in range(256):
        if byte in printable:
            chars[byte] = chr(byte)
        else:
            chars[byte] = chr(256 + extra)
            extra += 1
    return [chars[byte] for byte in range(256)]


class JsonConstraint:
    """Allow only tokens that keep the output a JSON document (any JSON object when `schema` is None, as OpenAI's
    response_format json_object; else a value the schema accepts, subset listed in json_schema.py). `max_tokens`:
    the generation budget, after which no document could be closed (see the module docstring); None = no promise.
    One constraint per generated sequence: it holds that sequence's parser state."""

    def __init__(self, tokenizer: Tokenizer, schema: dict[str, Any] | None = None, max_tokens: int | None = None,
                 max_whitespace: int = DEFAULT_MAX_WHITESPACE) -> None:
        if max_whitespace < 0:
            raise LlmkitError(f"max_whitespace={max_whitespace} must be >= 0 (bytes of whitespace in a row)")
        self.table = token_table(tokenizer)
        self.parser = JsonParser(compile_schema(schema), max_whitespace)
        self.max_tokens = max_tokens
        self.tokens_used = 0
        self.stopped = False  # a stop id was chosen
        self._first_bytes: torch.Tensor | None = None  # (257,) bool, for the current state
        if max_tokens is not None and self.parser.distance() > max_tokens:
            raise LlmkitError(f"the shortest document this schema accepts needs {self.parser.distance()} tokens, over "
                              f"max_tokens={max_tokens}; allow more tokens (max_tokens) or relax the schema")

    # ---- the TokenConstraint protocol --------------------------------------------------------------------------

    @property
    def complete(self) -> bool:
        """The output so far is a whole document (closed, or ended by a stop id)."""
        return self.parser.done or self.stopped

    def pick(self, logits: torch.Tensor, settings: SamplingSettings, generator: torch.Generator | None = None) -> int:
        """An allowed token id drawn from softmax(processed logits) restricted to the allowed tokens (argmax when
        greedy). `logits` (V,) after any penalties; temperature/top-k/top-p are applied here as `sample_next` does."""
        logits = logits.detach().float().reshape(-1)  # (V,)
        noise = None
        if not settings.greedy:
            # Gumbel noise G = -log(E), E ~ Exp(1): argmax(l + G) is a draw from softmax(l)
            noise = -torch.empty_like(logits).exponential_(generator=generator).log()
        for filtered in (True, False):
            scores = self._scores(logits, settings, filtered)
            if noise is not None:
                scores = scores + noise
            token = self._first_allowed(scores)
            if token is not None:
                return token
        raise LlmkitError("no token of the vocabulary can continue the JSON document; the tokenizer lacks the "
                          "single-byte tokens JSON needs, or the document is complete and the tokenizer has no stop id")

    def advance(self, token_id: int) -> None:
        """Take the chosen token into the parser state."""
        if not self.allows(token_id):
            raise LlmkitError(f"token {token_id} does not continue the JSON document; choose tokens with pick()")
        self.tokens_used += 1
        self._first_bytes = None
        if token_id in self.table.stop_ids:
            self.stopped = True
            return
        for byte in self.table.texts[token_id]:
            self.parser.feed(byte)

    # ---- checks ------------------------------------------------------------------------------------------------

    def allows(self, token_id: int) -> bool:
        """Whether `token_id` may come next: its bytes keep the document valid (and closable within max_tokens)."""
        if self.stopped or not 0 <= token_id < len(self.table.texts):
            return False
        if token_id in self.table.stop_ids:
            return self.parser.can_end()
        text = self.table.texts[token_id]
        if text is None:
            return False
        parser = self.parser.clone()
        if not all(parser.feed(byte) for byte in text):
            return False
        return self.max_tokens is None or parser.distance() <= self.max_tokens - self.tokens_used - 1

    def first_bytes_allowed(self) -> torch.Tensor:
        """(257,) bool: which first bytes a token may start with now (index 256, NO_FIRST_BYTE, is never allowed)."""
        if self._first_bytes is None:
            allowed = [not self.stopped and self.parser.clone().feed(byte) for byte in range(256)]
            self._first_bytes = torch.tensor(allowed + [False])
        return self._first_bytes

    def _prefilter(self, size: int) -> torch.Tensor:
        """(size,) bool: tokens whose first byte is allowed, plus the stop ids when the document may end."""
        mask = torch.zeros(size, dtype=torch.bool)
        known = min(size, len(self.table.texts))
        mask[:known] = self.first_bytes_allowed()[self.table.first_byte[:known]]
        stops = [i for i in self.table.stop_ids if i < size]
        if stops:
            mask[stops] = self.parser.can_end() and not self.stopped
        return mask

    @staticmethod
    def _scores(logits: torch.Tensor, settings: SamplingSettings, filtered: bool) -> torch.Tensor:
        if settings.greedy:
            return logits
        if not filtered:
            settings = SamplingSettings(temperature=settings.temperature)
        return process_logits(logits[None], settings)[0]

    def _first_allowed(self, scores: torch.Tensor) -> int | None:
        """The highest-scoring allowed token, checking candidates in descending order, CHECK_BATCH at a time. When
        the first batch holds none (the model wants what JSON refuses here), the tokens whose first byte is refused
        are masked out at once before the search goes on; masking only removes disallowed tokens, so the token found
        is the same."""
        scores = scores.clone()
        first_batch = True
        while True:
            values, ids = scores.topk(min(CHECK_BATCH, scores.shape[0]))
            for value, token_id in zip(values.tolist(), ids.tolist()):
                if value == float("-inf"):
                    return None
                if self.allows(token_id):
                    return token_id
            scores[ids] = float("-inf")
            if first_batch:
                scores.masked_fill_(~self._prefilter(scores.shape[0]), float("-inf"))
                first_batch = False


def generate_constrained(
    model: torch.nn.Module,
    tokenizer: Tokenizer,
    prompt: str,
    constraint: JsonConstraint,
    max_new_tokens: int,
    settings: SamplingSettings | None = None,
    truncate_prompt: bool = False,
) -> str:
    """Continue one prompt choosing every token through `constraint`, e.g. a JsonConstraint, so the new text is
    what the constraint allows; returns the new text (see `constrained_ids`)."""
    settings = settings or SamplingSettings()
    ids = checked_prompts(model, tokenizer.encode(prompt), max_new_tokens, 0, truncate_prompt)[0]
    generator = make_generator(settings, next(model.parameters()).device)
    new_ids = constrained_ids(model, ids, constraint, max_new_tokens, settings, generator, frozenset(tokenizer.stop_ids))
    return tokenizer.decode(new_ids)


def constrained_ids(
    model: torch.nn.Module,
    prompt_ids: list[int],
    constraint: JsonConstraint,
    max_new_tokens: int,
    settings: SamplingSettings,
    generator: torch.Generator | None = None,
    stop_ids: frozenset[int] = frozenset(),
) -> list[int]:
    """The new ids of a KV-cached decode loop (one forward per token, as `generate_tokens`) in which the constraint
    chooses every token (`pick` then `advance`: the serving engine's TokenConstraint protocol). Stops when the
    constraint is complete, after a stop id (not returned), or after `max_new_tokens`: give the constraint the same
    budget (`max_tokens`) and the output is always whole. The repetition penalty applies before `pick`, as in
    `sample_next`."""
    settings.validate()
    device = next(model.parameters()).device
    new_ids: list[int] = []
    with torch.inference_mode():
        input_ids = torch.tensor([prompt_ids], device=device)  # (1, T)
        seen = seen_tokens(input_ids, model.config.vocab_size) if settings.repetition_penalty != 1.0 else None
        cache = model.new_cache(1, len(prompt_ids) + max_new_tokens)
        logits = model(input_ids, cache=cache, last_token_only=True)[:, -1]  # (1, V)
        forward_one = decode_step(model)  # compiled where `compile_decode_step` was applied
        for _ in range(max_new_tokens):
            if seen is not None:
                logits = apply_repetition_penalty(logits.float(), seen, settings.repetition_penalty)
            token = constraint.pick(logits[0], settings, generator)
            constraint.advance(token)
            if token in stop_ids:
                break
            new_ids.append(token)
            if constraint.complete:
                break
            if seen is not None:
                seen[0, token] = True
            logits = forward_one(torch.tensor([[token]], device=device), cache=cache)[:, -1]  # (1, V)
    return new_ids
