"""The JSON Schema subset of JSON mode, compiled into `Node`s the byte parser (json_grammar.py) walks, and the
length of the shortest JSON text each node accepts (the parser's distance to a whole document).

Subset (anything else raises LlmkitError naming the keyword): type (one name or a list) among object, array,
string, number, integer, boolean, null; properties, required, additionalProperties (true/false); items; enum and
const (JSON values, written in compact form, combined only with type); minItems/maxItems; minLength/maxLength
(counted in Unicode code points, as JSON Schema does). title/description/$schema/default/examples are ignored.
"""

from __future__ import annotations

import functools
import json
from dataclasses import dataclass, field
from typing import Any

from llmkit.errors import LlmkitError

TYPES = ("object", "array", "string", "number", "integer", "boolean", "null")
KEYWORDS = {"type", "properties", "required", "additionalProperties", "items", "enum", "const",
            "minItems", "maxItems", "minLength", "maxLength"}
IGNORED = {"title", "description", "$schema", "default", "examples"}



@dataclass(frozen=True, eq=False)  # compared and hashed by identity: `shortest` caches per node
class Node:
    """One compiled schema: the JSON types it admits and their limits; `literals` (enum/const) replace types."""

    types: frozenset[str] = frozenset(TYPES)
    literals: tuple[bytes, ...] | None = None
    properties: dict[str, Node] = field(default_factory=dict)
    required: frozenset[str] = frozenset()
    additional: bool = True
    items: Node | None = None
    min_items: int = 0
    max_items: int | None = None
    min_length: int = 0
    max_length: int | None = None

    def member(self, key: str | None) -> Node:
        return self.properties.get(key) or ANY

    @property
    def item(self) -> Node:
        return self.items or ANY


ANY = Node()
ANY_OBJECT = Node(types=frozenset({"object"}))  # schema None: OpenAI's json_object mode


def compile_schema(schema: dict[str, Any] | None, where: str = "schema") -> Node:
    """A Node for `schema` (None = any JSON object); LlmkitError naming an unsupported keyword or a bad value."""
    if schema is None:
        return ANY_OBJECT
    if not isinstance(schema, dict):
        raise LlmkitError(f"{where} must be a JSON object (a dict), got {type(schema).__name__}")
    unknown = sorted(set(schema) - KEYWORDS - IGNORED)
    if unknown:
        raise LlmkitError(f"{where} uses the keyword {unknown[0]!r}, which JSON mode does not support; supported: "
                          f"{', '.join(sorted(KEYWORDS))}")
    types = schema.get("type", list(TYPES))
    types = [types] if isinstance(types, str) else types
    if not isinstance(types, list) or not types or any(name not in TYPES for name in types):
        raise LlmkitError(f"{where}.type={schema['type']!r} must be one of {', '.join(TYPES)} or a list of them")
    limits = {key: _count(schema, key, where) for key in ("minItems", "maxItems", "minLength", "maxLength")}
    if "enum" in schema or "const" in schema:
        return Node(types=frozenset(types), literals=_literals(schema, types, where))
    additional = schema.get("additionalProperties", True)
    if not isinstance(additional, bool):
        raise LlmkitError(f"{where}.additionalProperties must be true or false (a schema there is not supported)")
    properties = schema.get("properties", {})
    if not isinstance(properties, dict):
        raise LlmkitError(f"{where}.properties must be an object mapping names to schemas")
    required = schema.get("required", [])
    if not isinstance(required, list) or any(not isinstance(name, str) for name in required):
        raise LlmkitError(f"{where}.required must be a list of property names")
    if not additional and set(required) - set(properties):
        missing = sorted(set(required) - set(properties))[0]
        raise LlmkitError(f"{where}.required names {missing!r}, which additionalProperties=false forbids; add it to "
                          "properties")
    for low, high in (("minItems", "maxItems"), ("minLength", "maxLength")):
        if limits[high] is not None and (limits[low] or 0) > limits[high]:
            raise LlmkitError(f"{where}: {low}={limits[low]} is above {high}={limits[high]}; no value fits")
    return Node(
        types=frozenset(types),
        properties={name: compile_schema(sub, f"{where}.properties.{name}") for name, sub in properties.items()},
        required=frozenset(required),
        additional=additional,
        items=compile_schema(schema["items"], f"{where}.items") if "items" in schema else None,
        min_items=limits["minItems"] or 0,
        max_items=limits["maxItems"],
        min_length=limits["minLength"] or 0,
        max_length=limits["maxLength"],
    )


def _count(schema: dict[str, Any], key: str, where: str) -> int | None:
    value = schema.get(key)
    if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 0):
        raise LlmkitError(f"{where}.{key}={value!r} must be an integer >= 0")
    return value


def _literals(schema: dict[str, Any], types: list[str], where: str) -> tuple[bytes, ...]:
    """enum/const values as compact JSON bytes, kept when their type is one the schema names."""
    others = sorted(set(schema) - {"enum", "const", "type"} - IGNORED)
    if others:
        raise LlmkitError(f"{where} combines enum/const with {others[0]!r}; JSON mode supports enum/const only with type")
    values = [schema["const"]] if "const" in schema else schema["enum"]
    if not isinstance(values, list) or not values:
        raise LlmkitError(f"{where}.enum must be a non-empty list of JSON values")
    kept = tuple(dict.fromkeys(compact_json(value) for value in values if json_type_matches(value, types)))
    if not kept:
        raise LlmkitError(f"{where}: no enum/const value has the type {types}; fix the values or the type")
    return kept


def compact_json(value: Any) -> bytes:
    return json.dumps(value, ensure_ascii=False, separators=(",", ":")).encode()


def json_type_matches(value: Any, types: list[str] | frozenset[str]) -> bool:
    """Whether a parsed JSON value has one of the JSON Schema type names (true is not an integer; 1.0 is)."""
    for name in types:
        if (name == "null" and value is None) or (name == "boolean" and isinstance(value, bool)):
            return True
        if isinstance(value, bool):
            continue
        if (name == "string" and isinstance(value, str)) or (name == "array" and isinstance(value, list)):
            return True
        if (name == "object" and isinstance(value, dict)) or (name == "number" and isinstance(value, (int, float))):
            return True
        if name == "integer" and (isinstance(value, int) or (isinstance(value, float) and value.is_integer())):
            return True
    return False


@functools.lru_cache(maxsize=4096)
def shortest(node: Node) -> int:
    """Bytes of the shortest JSON text `node` accepts."""
    if node.literals is not None:
        return min(len(text) for text in node.literals)
    lengths = []
    if "number" in node.types or "integer" in node.types:
        lengths.append(1)  # 0
    if "boolean" in node.types or "null" in node.types:
        lengths.append(4)  # true / null
    if "string" in node.types:
        lengths.append(2 + node.min_length)
    if "array" in node.types:
        lengths.append(array_shortest(node))
    if "object" in node.types:
        lengths.append(1 + members_cost(node, node.required, leading_comma=False))
    return min(lengths)


def array_shortest(node: Node) -> int:
    """Bytes of the shortest array: minItems shortest items, commas between them, brackets."""
    if not node.min_items:
        return 2  # []
    return 2 + node.min_items * (shortest(node.item) + 1) - 1


def entry_length(node: Node, key: str) -> int:
    """Bytes of `"key":<shortest value>`."""
    return len(compact_json(key)) + 1 + shortest(node.member(key))


def members_cost(node: Node, missing: frozenset[str], leading_comma: bool) -> int:
    """Bytes to write the `missing` required members and the closing brace."""
    if not missing:
        return 1
    return sum(entry_length(node, key) for key in missing) + len(missing) - (0 if leading_comma else 1) + 1
