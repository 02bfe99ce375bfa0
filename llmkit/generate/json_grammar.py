"""An incremental JSON parser over UTF-8 bytes, driven by a compiled JSON Schema (json_schema.py): the state
machine behind `JsonConstraint` (llmkit/generate/constrained.py).

`JsonParser.feed(byte)` returns False as soon as a byte can no longer lead to a document that `json.loads` parses
and the schema accepts; every prefix of such a document is accepted byte by byte. The parser is a stack of small
frames (value, object, array, string, number, literal), one per open JSON value; `clone()` is cheap (a shallow copy
of each frame), so a candidate token is checked on a copy.

`JsonParser.distance()` is the length in bytes of the shortest text that completes the document from here (closing
every open value, adding the required properties / minItems items each with its shortest valid value). The
constraint uses it to keep a document closable within a token budget.
"""

from __future__ import annotations

import json
from abc import ABC, abstractmethod

from llmkit.generate.json_schema import ANY, Node, array_shortest, compact_json, entry_length, members_cost, shortest

WHITESPACE = frozenset(b" \t\n\r")
DIGITS = frozenset(b"0123456789")
HEX = frozenset(b"0123456789abcdefABCDEF")
ESCAPES = frozenset(b'"\\/bfnrt')

OK, POP, REJECT = 0, 1, 2  # a frame consumed the byte / ended before it (the parent reads it) / refuses it


# ---- frames ------------------------------------------------------------------------------------------------------


class Frame(ABC):
    """One open JSON value. feed(parser, byte) -> OK | POP | REJECT; a frame that ends on its own last byte sets
    `closed`. distance() counts the bytes this frame still needs, not its open children's. A frame that holds
    children (object, array) hears of each finished one through child_done; the others ignore it."""

    closed = False

    @abstractmethod
    def feed(self, parser: JsonParser, byte: int) -> int: ...

    def can_end(self) -> bool:
        return False

    @abstractmethod
    def distance(self) -> int: ...

    def child_done(self, child: Frame) -> None:  # noqa: B027 (a no-op by default, on purpose)
        return None


class ValueFrame(Frame):
    """Before a value: optional whitespace, then the first byte picks the frame for the value's type."""

    def __init__(self, node: Node) -> None:
        self.node = node

    def feed(self, parser: JsonParser, byte: int) -> int:
        if byte in WHITESPACE:
            return parser.whitespace()
        frame = self.start(byte)
        if frame is None:
            return REJECT
        parser.stack[-1] = frame
        return frame.feed(parser, byte)

    def start(self, byte: int) -> Frame | None:
        node, types = self.node, self.node.types
        if node.literals is not None:
            return LiteralFrame(node.literals) if any(text[0] == byte for text in node.literals) else None
        if byte == ord("{") and "object" in types:
            return ObjectFrame(node)
        if byte == ord("[") and "array" in types:
            return ArrayFrame(node)
        if byte == ord('"') and "string" in types:
            return StringFrame(node.min_length, node.max_length)
        if (byte == ord("-") or byte in DIGITS) and ("number" in types or "integer" in types):
            return NumberFrame(integer="number" not in types)
        words = (b"true", b"false") * ("boolean" in types) + (b"null",) * ("null" in types)
        return LiteralFrame(words) if any(word[0] == byte for word in words) else None

    def distance(self) -> int:
        return shortest(self.node)


class LiteralFrame(Frame):
    """One of a fixed set of texts (true/false/null, enum/const values, allowed property names)."""

    def __init__(self, texts: tuple[bytes, ...], text: bytes = b"") -> None:
        self.texts, self.text = texts, text

    def feed(self, parser: JsonParser, byte: int) -> int:
        longer = self.text + bytes((byte,))
        if any(text.startswith(longer) for text in self.texts):
            self.text = longer
            self.closed = longer in self.texts and not any(len(t) > len(longer) and t.startswith(longer)
                                                           for t in self.texts)
            return OK
        return POP if self.can_end() else REJECT

    def can_end(self) -> bool:
        return self.text in self.texts

    def distance(self) -> int:
        return min(len(text) - len(self.text) for text in self.texts if text.startswith(self.text))


class StringFrame(Frame):
    """A JSON string after its opening quote: no raw control bytes, valid escapes, valid UTF-8 (no overlong forms,
    no surrogates), and a length in code points within [min_length, max_length]. `raw` keeps the text for keys."""

    def __init__(self, min_length: int = 0, max_length: int | None = None, keep: bool = False) -> None:
        self.min_length, self.max_length = min_length, max_length
        self.length = 0
        self.started = False  # the opening quote was read
        self.continuation = 0  # UTF-8 continuation bytes still owed by the current character
        self.low, self.high = 0x80, 0xBF  # allowed range of the next continuation byte
        self.hex_left = -1  # > 0 inside \\uXXXX, 0 right after the backslash, -1 otherwise
        self.first_hex = 0  # the previous hex digit of a \\u escape
        self.raw = b"" if keep else None  # a key's bytes so far (keys are kept to check them)
        self.seen: frozenset[str] = frozenset()  # for a key: the object's keys so far, which it must not repeat

    def feed(self, parser: JsonParser, byte: int) -> int:
        accepted = self._accept(byte)
        if accepted and self.raw is not None:
            self.raw += bytes((byte,))
        return OK if accepted else REJECT

    def _accept(self, byte: int) -> bool:
        if not self.started:
            self.started = byte == ord('"')
            return self.started
        if self.continuation:
            if not self.low <= byte <= self.high:
                return False
            self.continuation -= 1
            self.low, self.high = 0x80, 0xBF
            return True
        if self.hex_left == 0:  # after a backslash
            if byte == ord("u"):
                self.hex_left = 4
                return True
            self.hex_left = -1
            return byte in ESCAPES
        if self.hex_left > 0:
            # \\uD800-\\uDFFF (surrogates) are refused at their second digit, so every accepted prefix completes.
            surrogate = self.hex_left == 3 and self.first_hex in b"dD" and byte in b"89abcdefABCDEF"
            if byte not in HEX or surrogate:
                return False
            self.first_hex = byte
            self.hex_left = self.hex_left - 1 if self.hex_left > 1 else -1
            return True
        if byte == ord('"'):
            self.closed = self.length >= self.min_length and not self.repeats_key()
            return self.closed
        if byte < 0x20 or 0x80 <= byte < 0xC2 or byte > 0xF4:
            return False  # a raw control character, a stray continuation byte, or a byte UTF-8 never uses
        if self.max_length is not None and self.length >= self.max_length:
            return False
        self.length += 1
        if byte == ord("\\"):
            self.hex_left = 0
        elif byte >= 0xC2:
            self.continuation = 1 if byte < 0xE0 else 2 if byte < 0xF0 else 3
            # the second byte's range rules out overlong forms and surrogates (RFC 3629 table)
            self.low, self.high = {0xE0: (0xA0, 0xBF), 0xED: (0x80, 0x9F), 0xF0: (0x90, 0xBF),
                                   0xF4: (0x80, 0x8F)}.get(byte, (0x80, 0xBF))
        return True

    def current(self) -> str | None:
        """A key's value if it closed now (None when it cannot close here)."""
        if self.raw is None or self.continuation or self.hex_left >= 0:
            return None
        return json.loads(self.raw + b'"')

    def repeats_key(self) -> bool:
        return self.raw is not None and self.current() in self.seen

    def distance(self) -> int:
        if not self.started:
            return 2 + self.min_length
        owed = self.continuation + (1 if self.hex_left == 0 else max(self.hex_left, 0))
        return owed + max(self.min_length - self.length, 0) + 1


class NumberFrame(Frame):
    """A JSON number (RFC 8259 grammar); integers have no fraction or exponent. Ends at the first byte that cannot
    continue it, which the parent then reads."""

    ENDS = frozenset({"zero", "int", "frac", "exp_digits"})
    MOVES = {  # non-digit bytes each state accepts
        "start": {"-": "minus"}, "minus": {}, "zero": {".": "dot", "e": "exp", "E": "exp"},
        "int": {".": "dot", "e": "exp", "E": "exp"}, "dot": {}, "frac": {"e": "exp", "E": "exp"},
        "exp": {"+": "exp_sign", "-": "exp_sign"}, "exp_sign": {}, "exp_digits": {},
    }

    def __init__(self, integer: bool) -> None:
        self.integer = integer
        self.state = "start"

    def feed(self, parser: JsonParser, byte: int) -> int:
        state, digit = self.state, byte in DIGITS
        moves = self.MOVES[state]
        if digit and state in ("start", "minus"):
            self.state = "zero" if byte == ord("0") else "int"
        elif digit and state in ("int", "dot", "frac", "exp", "exp_sign", "exp_digits"):
            self.state = {"int": "int", "dot": "frac", "frac": "frac"}.get(state, "exp_digits")
        elif chr(byte) in moves and not (self.integer and moves[chr(byte)] in ("dot", "exp")):
            self.state = moves[chr(byte)]
        else:
            return POP if self.can_end() else REJECT
        return OK

    def can_end(self) -> bool:
        return self.state in self.ENDS

    def distance(self) -> int:
        return 0 if self.can_end() else 1


class ObjectFrame(Frame):
    """{ "key": value, ... }: keys are the schema's properties (any string too unless additionalProperties is
    false), never repeated; '}' only once every required property is present."""

    def __init__(self, node: Node) -> None:
        self.node = node
        self.state = "start"  # start -> open -> key -> colon -> value -> after -> need_key -> key ...
        self.seen: frozenset[str] = frozenset()
        self.key: str | None = None

    def _missing(self) -> frozenset[str]:
        return self.node.required - self.seen

    def _key_names(self) -> tuple[bytes, ...]:
        return tuple(compact_json(name) for name in self.node.properties if name not in self.seen)

    def _more_keys(self) -> bool:
        return self.node.additional or bool(self._key_names())

    def feed(self, parser: JsonParser, byte: int) -> int:
        state = self.state
        if state == "start":
            self.state = "open"
            return OK if byte == ord("{") else REJECT
        if byte in WHITESPACE and state in ("open", "colon", "after", "need_key"):
            return parser.whitespace()
        if state in ("open", "need_key") and byte == ord('"') and self._more_keys():
            if self.node.additional:
                key_frame: Frame = StringFrame(keep=True)
                key_frame.seen = self.seen
            else:
                key_frame = LiteralFrame(self._key_names())
            self.state = "key"
            parser.stack.append(key_frame)
            return key_frame.feed(parser, byte)
        if state in ("open", "after") and byte == ord("}") and not self._missing():
            self.closed = True
            return OK
        if state == "after" and byte == ord(",") and self._more_keys():
            self.state = "need_key"
            return OK
        if state == "colon" and byte == ord(":"):
            self.state = "value"
            parser.stack.append(ValueFrame(self.node.member(self.key)))
            return OK
        return REJECT

    def child_done(self, child: Frame) -> None:
        if self.state == "key":
            text = child.raw if isinstance(child, StringFrame) else child.text
            self.key = json.loads(text)
            self.state = "colon"
        else:
            self.seen = self.seen | {self.key}
            self.state = "after"

    def distance(self) -> int:
        missing, state = self._missing(), self.state
        if state == "start":
            return 1 + members_cost(self.node, missing, leading_comma=False)
        if state in ("open", "after"):
            return members_cost(self.node, missing, leading_comma=state == "after")
        if state == "need_key":
            if missing:
                return members_cost(self.node, missing, leading_comma=False)
            entries = [entry_length(self.node, name) for name in self.node.properties if name not in self.seen]
            return min(entries + [3 + shortest(ANY)] * self.node.additional) + 1  # e.g. "":0}
        if state == "value":
            return members_cost(self.node, missing - {self.key}, leading_comma=True)
        if state == "colon":
            value = shortest(self.node.member(self.key))
            return 1 + value + members_cost(self.node, missing - {self.key}, leading_comma=True)
        return 0  # state "key": the key frame on top counts the key's rest (see JsonParser.distance)

    def key_distance(self, key_frame: Frame) -> int:
        """Bytes to finish the object from inside a key: the key's rest, ':', its value, the rest of the members."""
        if isinstance(key_frame, LiteralFrame):
            return min(len(text) - len(key_frame.text) + 1 + shortest(self.node.member(json.loads(text)))
                       + members_cost(self.node, self._missing() - {json.loads(text)}, leading_comma=True)
                       for text in key_frame.texts if text.startswith(key_frame.text))
        # a free key: close it here, or finish it as one of the properties it begins
        key = key_frame.current()
        rest = key_frame.distance() + key_frame.repeats_key()  # a repeated key needs one more byte before its quote
        # (key None: inside an escape or a character, whose rest `rest` counts; the key is then not a property)
        costs = [rest + 1 + shortest(self.node.member(key)) + members_cost(self.node, self._missing() - {key}, True)]
        for name in self.node.properties:
            text = compact_json(name)
            if name not in self.seen and key_frame.continuation == 0 and text.startswith(key_frame.raw):
                costs.append(len(text) - len(key_frame.raw) + 1 + shortest(self.node.member(name))
                             + members_cost(self.node, self._missing() - {name}, True))
        return min(costs)


class ArrayFrame(Frame):
    """[ value, ... ] with minItems <= count <= maxItems."""

    def __init__(self, node: Node) -> None:
        self.node = node
        self.state = "start"  # start -> open -> value -> after -> need_value -> value ...
        self.count = 0

    def feed(self, parser: JsonParser, byte: int) -> int:
        state, node = self.state, self.node
        if state == "start":
            self.state = "open"
            return OK if byte == ord("[") else REJECT
        if byte in WHITESPACE and state in ("open", "after", "need_value"):
            return parser.whitespace()
        if state in ("open", "after") and byte == ord("]") and self.count >= node.min_items:
            self.closed = True
            return OK
        if state == "after" and byte == ord(",") and (node.max_items is None or self.count < node.max_items):
            self.state = "need_value"
            return OK
        if state in ("open", "need_value") and (node.max_items is None or self.count < node.max_items):
            value = ValueFrame(node.item)
            if value.start(byte) is None:
                return REJECT
            self.state, self.count = "value", self.count + 1
            parser.stack.append(value)
            return value.feed(parser, byte)
        return REJECT

    def child_done(self, child: Frame) -> None:
        self.state = "after"

    def _rest(self, count: int) -> int:
        return max(self.node.min_items - count, 0) * (shortest(self.node.item) + 1) + 1

    def distance(self) -> int:
        if self.state == "start":
            return array_shortest(self.node)
        if self.state == "open":
            return array_shortest(self.node) - 1
        if self.state == "need_value":
            return shortest(self.node.item) + self._rest(self.count + 1)
        return self._rest(self.count)


# ---- the parser --------------------------------------------------------------------------------------------------


def _copy_frame(frame: Frame) -> Frame:
    twin = object.__new__(type(frame))
    twin.__dict__.update(frame.__dict__)
    return twin


class JsonParser:
    """The whole document: a stack of open frames; `done` once the top-level value has ended."""

    def __init__(self, node: Node, max_whitespace: int = 20) -> None:
        self.stack: list[Frame] = [ValueFrame(node)]
        self.max_whitespace = max_whitespace
        self.whitespace_run = 0
        self.done = False

    def clone(self) -> JsonParser:
        """An independent copy: frames hold only immutable values, so a shallow copy of each is enough (made by
        copying its __dict__, several times faster than copy.copy; the constraint clones 256 times per step)."""
        twin = object.__new__(JsonParser)
        twin.__dict__.update(self.__dict__)
        twin.stack = [_copy_frame(frame) for frame in self.stack]
        return twin

    def whitespace(self) -> int:
        """Whitespace between tokens: allowed up to `max_whitespace` in a row (models can loop on it)."""
        self.whitespace_run += 1
        return OK if self.whitespace_run <= self.max_whitespace else REJECT

    def feed(self, byte: int) -> bool:
        """Read one byte; False when no valid document continues this way (the parser is then unusable)."""
        if self.done:
            return False
        run = self.whitespace_run
        while True:
            if not self.stack:  # the top-level value ended on a byte that is not its own (a number's terminator)
                self.done = True
                return byte in WHITESPACE
            frame = self.stack[-1]
            result = frame.feed(self, byte)
            if result == REJECT:
                return False
            if result == OK:
                if self.whitespace_run == run:
                    self.whitespace_run = 0
                self._pop_closed()
                return True
            self._pop(frame)  # POP: the frame ended before this byte; its parent reads it

    def _pop_closed(self) -> None:
        while self.stack and self.stack[-1].closed:
            self._pop(self.stack[-1])
        self.done = not self.stack

    def _pop(self, frame: Frame) -> None:
        self.stack.pop()
        if self.stack:
            self.stack[-1].child_done(frame)

    def can_end(self) -> bool:
        """Whether the document may stop here (end of text / EOS): done, or a top-level number or literal that
        could still grow but is whole."""
        return self.done or (len(self.stack) == 1 and self.stack[0].can_end())

    def distance(self) -> int:
        """Bytes of the shortest completion, plus 1 for a top-level value that ends only at the next byte/EOS."""
        if self.done:
            return 0
        total = 0
        for index, frame in enumerate(self.stack):
            parent = self.stack[index - 1] if index else None
            if isinstance(parent, ObjectFrame) and parent.state == "key":
                total += parent.key_distance(frame)
            elif not (isinstance(frame, ObjectFrame) and frame.state == "key"):
                total += frame.distance()
        return total + (0 if isinstance(self.stack[0], (ObjectFrame, ArrayFrame, StringFrame)) else 1)
