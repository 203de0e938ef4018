"""The ``structured_output`` request argument: what a request may ask for, checked and made canonical."""
from __future__ import annotations

import json
from dataclasses import dataclass

KEY = "structured_output"
# type -> the one field that carries its body (None: no body)
FIELDS: dict[str, str | None] = {"json_object": None, "json_schema": "schema", "regex": "pattern",
                                 "choice": "choices", "grammar": "grammar"}
FORMS = ('{"type": "json_object"}, {"type": "json_schema", "schema": {...}}, {"type": "regex", "pattern": "..."}, '
         '{"type": "choice", "choices": ["a", "b"]}, {"type": "grammar", "grammar": "<xgrammar EBNF with a root '
         'rule>"}')
DESCRIPTION = f"constrain the output to a grammar (xgrammar), one of {FORMS}"


@dataclass(slots=True, frozen=True)
class GrammarSpec:
    """A checked ``structured_output`` value: its ``kind``, its body, and ``key`` (kind + canonical JSON of the
    body) that names its compiled grammar in the cache. Object key order is kept: a schema's property order is
    the order the output writes them in."""

    kind: str
    body: object
    key: tuple[str, str]


def parse_spec(value) -> GrammarSpec:
    """Check a request's ``plugin_args["structured_output"]``; ValueError naming what is wrong and what is allowed."""
    if not isinstance(value, dict):
        raise ValueError(f"{KEY} must be an object, one of {FORMS}; got {value!r:.200}")
    kind = value.get("type")
    if kind not in FIELDS:
        raise ValueError(f"{KEY}.type must be one of {', '.join(map(repr, FIELDS))}, got {kind!r:.100}")
    field = FIELDS[kind]
    allowed = {"type"} | ({field} if field else set())
    extra = sorted(set(value) - allowed)
    if extra:
        raise ValueError(f"{KEY} of type '{kind}' takes only {sorted(allowed)}, got unknown {extra}")
    if field is not None and field not in value:
        raise ValueError(f"{KEY} of type '{kind}' needs '{field}'")
    body = value.get(field) if field else None
    if kind == "json_schema":
        if not isinstance(body, dict):
            raise ValueError(f"{KEY}.schema must be a JSON schema object, got {type(body).__name__}")
    elif kind in ("regex", "grammar"):
        if not isinstance(body, str) or not body:
            raise ValueError(f"{KEY}.{field} must be a non-empty string, got {body!r:.100}")
    elif kind == "choice":
        if not isinstance(body, list) or not body or any(not isinstance(c, str) or not c for c in body):
            raise ValueError(f"{KEY}.choices must be a non-empty list of non-empty strings, got {body!r:.200}")
    try:
        canonical = json.dumps(body, ensure_ascii=False, separators=(",", ":"), allow_nan=False)
    except (TypeError, ValueError) as exc:
        raise ValueError(f"{KEY}.{field} must be plain JSON (objects, lists, strings, numbers, booleans, null): "
                         f"{exc}") from None
    return GrammarSpec(kind, body, (kind, canonical))


def ebnf_literal(text: str) -> str:
    """``text`` as an xgrammar EBNF string literal (JSON escapes: quotes, backslashes, control characters)."""
    return json.dumps(text, ensure_ascii=False)


def choice_grammar(choices: list[str]) -> str:
    """An EBNF grammar whose only sentences are the ``choices``."""
    return "root ::= " + " | ".join(ebnf_literal(c) for c in dict.fromkeys(choices))
