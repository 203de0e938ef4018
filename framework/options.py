"""Typed option validation for plugin ``Options`` dataclasses and spec sections."""
from __future__ import annotations

import dataclasses
import difflib
import os
import re
import types
import typing
from pathlib import Path
from typing import Annotated, Any, Literal, Union


class _PathKind:
    """Marks an option as a filesystem path (``always``) or as a model reference (an alias, a hub id, a
    ``self_*`` draft name or a path: resolved only when it names something that exists there or looks like a
    path)."""

    __slots__ = ("kind",)

    def __init__(self, kind: str) -> None:
        self.kind = kind


FilePath = Annotated[str, _PathKind("always")]
"""An option holding a file or directory path. A relative value written in a pipeline file resolves against
the file's own directory; one in a dict (``Pipeline.from_dict``) against the working directory."""
ModelRef = Annotated[str, _PathKind("model")]
"""An option naming a model: an alias or hub id stays as written; a relative path resolves like ``FilePath``."""


class SpecPath(str):
    """A path resolved from a pipeline (a ``str``), remembering what was written and against what, so a
    not-found error can name both (:func:`describe_path`)."""

    written: str
    base: str

    def __new__(cls, resolved: str, written: str, base: str) -> "SpecPath":
        obj = super().__new__(cls, resolved)
        obj.written, obj.base = written, base
        return obj

    def __reduce__(self):  # copy, deepcopy (dataclasses.asdict) and pickle rebuild it with its details
        return SpecPath, (str(self), self.written, self.base)


def describe_path(path: Any) -> str:
    """``path`` for an error message: a resolved pipeline path also says what was written and the base."""
    if isinstance(path, SpecPath) and path.written != str(path):
        return f"{path} ('{path.written}' resolved against {path.base})"
    return str(path)


@dataclasses.dataclass(frozen=True, slots=True)
class PathBase:
    """Where relative paths of a pipeline resolve: a directory and how to name it in messages."""

    directory: Path
    label: str

    @classmethod
    def for_source(cls, source: str | None) -> "PathBase":
        if source is None:
            cwd = Path.cwd()
            return cls(cwd, f"the working directory {cwd}")
        parent = Path(source).resolve().parent
        return cls(parent, f"the pipeline file's directory {parent}")

    def resolve(self, value: str, kind: str = "always") -> str:
        """``value`` resolved per ``kind`` (see :data:`FilePath`, :data:`ModelRef`)."""
        if not value:
            return value
        written = os.path.expanduser(value)
        if os.path.isabs(written):
            return written
        candidate = self.directory / written
        if kind == "model":
            from tokenmill.model.resolve import ALIASES

            looks_like_path = written.startswith((".", "~")) or Path(written).suffix.lower() == ".gguf"
            if value.strip().lower() in ALIASES or value.startswith("self_") or not (
                    candidate.exists() or looks_like_path):
                return value
        return SpecPath(str(candidate), value, self.label)


def _path_kind(tp: Any) -> str | None:
    """The ``_PathKind`` of an annotation (also inside ``X | None``), if any."""
    if typing.get_origin(tp) is Annotated:
        return next((m.kind for m in tp.__metadata__ if isinstance(m, _PathKind)), None)
    if typing.get_origin(tp) in (Union, types.UnionType):
        return next((k for a in typing.get_args(tp) if (k := _path_kind(a))), None)
    return None


def _plain(tp: Any) -> Any:
    """``tp`` without ``Annotated`` metadata."""
    return typing.get_args(tp)[0] if typing.get_origin(tp) is Annotated else tp


def type_name(tp: Any) -> str:
    tp = _plain(tp)
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
    tp = _plain(tp)
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


def build_options(cls: type, raw: dict[str, Any] | None, what: str, *, paths: PathBase | None = None) -> Any:
    """Validate ``raw`` against the dataclass ``cls`` and construct it.

    With ``paths``, relative values of :data:`FilePath` / :data:`ModelRef` options resolve against it.

    :raises OptionError: unknown key (with the allowed keys), wrong type (with the expected type), a field
        without a default that ``raw`` does not give (``option 'path' of plugin 'x' is required``), or a value
        the dataclass rejects in ``__post_init__``.
    """
    raw = raw or {}
    if not isinstance(raw, dict):
        raise OptionError(f"options of {what} must be a mapping, got {type(raw).__name__}")
    fields = {f.name: f for f in dataclasses.fields(cls)} if dataclasses.is_dataclass(cls) else {}
    hints = typing.get_type_hints(cls, include_extras=True) if fields else {}
    for key, value in raw.items():
        if key not in fields:
            allowed = ", ".join(sorted(fields)) or "none"
            raise OptionError(
                f"unknown option '{key}' for {what}{closest(key, list(fields))}; allowed: {allowed}", key)
        tp = hints.get(key, Any)
        if not matches(value, tp):
            raise OptionError(
                f"option '{key}' of {what} must be {type_name(tp)}, got {value!r} ({type(value).__name__})", key)
    missing = [name for name, f in fields.items() if f.init and name not in raw
               and f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING]
    if missing:
        names = ", ".join(f"'{m}'" for m in missing)
        raise OptionError(f"option {names} of {what} is required" if len(missing) == 1
                          else f"options {names} of {what} are required", missing[0])
    if paths is not None:
        raw = {k: paths.resolve(v, kind) if isinstance(v, str) and (kind := _path_kind(hints.get(k, Any))) else v
               for k, v in raw.items()}
    try:
        return cls(**raw)
    except (ValueError, TypeError) as exc:
        first = re.split(r"[ :.]", str(exc), maxsplit=1)[0]  # __post_init__ messages start with the field's name
        raise OptionError(f"bad value for {what}: {exc}", first if first in raw else None) from None
