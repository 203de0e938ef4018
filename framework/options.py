"""Typed option validation for plugin ``Options`` dataclasses and spec sections."""
from __future__ import annotations

import dataclasses
import difflib
import re
import types
import typing
from typing import Any, Literal, Union


def type_name(tp: Any) -> str:
    origin = typing.get_origin(tp)
    if origin is Literal:
        return " | ".join(repr(a) for a in typing.get_args(tp))
    if origin in (Union, types.UnionType):
        return " | ".join(type_name(a) for a in typing.get_args(tp))
    if origin in (list, tuple):
        args = typing.get_args(tp)
        return f"list of {type_name(args[0])}" if args else "list"
    if origin is dict:
        return "mapping"
    if tp is type(None):
        return "null"
    return getattr(tp, "__name__", str(tp))


def matches(value: Any, tp: Any) -> bool:
    """True when ``value`` (parsed YAML) fits the annotation ``tp``."""
    if tp is Any:
        return True
    origin = typing.get_origin(tp)
    if origin is Literal:
        return value in typing.get_args(tp)
    if origin in (Union, types.UnionType):
        return any(matches(value, a) for a in typing.get_args(tp))
    if origin in (list, tuple):
        args = typing.get_args(tp)
        return isinstance(value, list) and (not args or all(matches(v, args[0]) for v in value))
    if origin is dict:
        return isinstance(value, dict)
    if tp is type(None):
        return value is None
    if tp is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if tp is int:
        return isinstance(value, int) and not isinstance(value, bool)
    return isinstance(value, tp)


def closest(name: str, allowed: list[str]) -> str:
    near = difflib.get_close_matches(str(name), allowed, n=1, cutoff=0.5)
    return f" (did you mean '{near[0]}'?)" if near else ""


class OptionError(ValueError):
    """Bad option; ``key`` names the offending option when there is one."""

    def __init__(self, message: str, key: str | None = None) -> None:
        super().__init__(message)
        self.key = key


def build_options(cls: type, raw: dict[str, Any] | None, what: str) -> Any:
    """Validate ``raw`` against the dataclass ``cls`` and construct it.

    :raises OptionError: unknown key (with the allowed keys), wrong type (with the expected type), or a
        value the dataclass rejects in ``__post_init__``.
    """
    raw = raw or {}
    if not isinstance(raw, dict):
        raise OptionError(f"options of {what} must be a mapping, got {type(raw).__name__}")
    fields = {f.name: f for f in dataclasses.fields(cls)} if dataclasses.is_dataclass(cls) else {}
    hints = typing.get_type_hints(cls) if fields else {}
    for key, value in raw.items():
        if key not in fields:
            allowed = ", ".join(sorted(fields)) or "none"
            raise OptionError(
                f"unknown option '{key}' for {what}{closest(key, list(fields))}; allowed: {allowed}", key)
        tp = hints.get(key, Any)
        if not matches(value, tp):
            raise OptionError(
                f"option '{key}' of {what} must be {type_name(tp)}, got {value!r} ({type(value).__name__})", key)
    try:
        return cls(**raw)
    except (ValueError, TypeError) as exc:
        first = re.split(r"[ :.]", str(exc), maxsplit=1)[0]  # __post_init__ messages start with the field's name
        raise OptionError(f"bad value for {what}: {exc}", first if first in raw else None) from None
