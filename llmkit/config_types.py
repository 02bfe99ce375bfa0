"""Checking a dataclass's fields against their annotations (`check_field_types`), for `Config` and the other
settings dataclasses read from files (RopeScaling, CLIP's config): a "64" or a 2.5 from a JSON file is one readable
error naming the field, its value and the type it must be, instead of a crash far away."""

from __future__ import annotations

import dataclasses
import functools
import types
import typing
from typing import Any, Literal

from llmkit.errors import LlmkitError


def check_field_types(instance: Any, where: str, prefix: str = "") -> None:
    """Check every field of a dataclass against its annotation (bool is not an int; an int is a fine float, and is
    stored as one), so a "64" or a 2.5 from a JSON file is one readable error instead of a crash far away."""
    hints = _type_hints(type(instance))
    for item in dataclasses.fields(instance):
        value, hint, name = getattr(instance, item.name), hints[item.name], prefix + item.name
        if not _matches(value, hint) and typing.get_origin(hint) is Literal:
            raise LlmkitError(f"{where}: {name}={value!r}; choose one of {typing.get_args(hint)}")
        if not _matches(value, hint):
            raise LlmkitError(f"{where}: {name}={value!r} is {_kind_of(value)}, but {name} must be "
                              f"{_describe(hint)}; fix {name}")
        if hint is float and isinstance(value, int):
            setattr(instance, item.name, float(value))


@functools.cache
def _type_hints(cls: type) -> dict[str, Any]:
    """A dataclass's resolved annotations (the module uses postponed annotations); once per class."""
    return typing.get_type_hints(cls)


def _matches(value: Any, hint: Any) -> bool:
    """Whether `value` is of the annotated type (the forms Config uses)."""
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if hint is Any:
        return True
    if origin in (typing.Union, types.UnionType):
        return any(_matches(value, arg) for arg in args)
    if origin is Literal:
        return isinstance(value, str) and value in args
    if origin is tuple:
        return isinstance(value, tuple) and all(_matches(item, args[0]) for item in value)
    if origin is dict:
        return isinstance(value, dict)
    if hint is type(None):
        return value is None
    if hint is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if hint is int:
        return isinstance(value, int) and not isinstance(value, bool)
    return isinstance(value, hint)


def _describe(hint: Any) -> str:
    """An annotation in words: "an integer or null", "one of ('rope', 'learned')"."""
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):
        return " or ".join(_describe(arg) for arg in args)
    if origin is Literal:
        return f"one of {args}"
    if origin is tuple:
        return f"a list of {_describe(args[0]).removeprefix('an ').removeprefix('a ')}s"
    if origin is dict:
        return "an object"
    if dataclasses.is_dataclass(hint):  # a nested settings object (RopeScaling): its first fields as a hint
        names = [item.name for item in dataclasses.fields(hint)]
        return f"an object ({', '.join(names[:2])}, ...)"
    words = {int: "an integer", float: "a number", bool: "true or false", str: "a string", type(None): "null"}
    return words.get(hint, getattr(hint, "__name__", str(hint)))


def _kind_of(value: Any) -> str:
    """A JSON-ish name of a value's type for error messages."""
    names = {bool: "a boolean", int: "an integer", float: "a number", str: "a string", list: "a list",
             tuple: "a list", dict: "an object", type(None): "null"}
    return names.get(type(value), f"a {type(value).__name__}")
