"""Structured output on the OpenAI routes: OpenAI's ``response_format`` and vLLM's ``guided_json`` /
``guided_regex`` / ``guided_choice`` / ``guided_grammar`` and ``structured_outputs``, each turned into the
``structured_output`` plugin argument (``{"type": "json_object"}``, ``{"type": "json_schema", "schema": ...}``,
``{"type": "regex", "pattern": ...}``, ``{"type": "choice", "choices": [...]}``, ``{"type": "grammar",
"grammar": ...}``). One source per request: two of them are refused, naming both. The native routes take the
plugin argument itself as ``structured_output``.
"""
from __future__ import annotations

import json
from typing import Any, Literal, Optional, Union

from pydantic import BaseModel, ConfigDict, Field, StrictBool, field_validator, model_validator


class JSONSchemaFormat(BaseModel):
    model_config = ConfigDict(extra="forbid", populate_by_name=True)
    name: Optional[str] = Field(None, description="The schema's name (accepted; the output is not named).")
    description: Optional[str] = Field(None, description="Accepted and ignored.")
    schema_: Optional[dict[str, Any]] = Field(None, alias="schema", description="The JSON schema the output "
                                                                                "follows.")
    strict: Optional[StrictBool] = Field(None, description="Accepted: the output always follows the schema.")


class ResponseFormat(BaseModel):
    model_config = ConfigDict(extra="forbid")
    type: Literal["text", "json_object", "json_schema"]
    json_schema: Optional[JSONSchemaFormat] = None

    @model_validator(mode="after")
    def _schema(self):
        if self.type == "json_schema" and (self.json_schema is None or self.json_schema.schema_ is None):
            raise ValueError('response_format of type "json_schema" needs json_schema.schema (a JSON schema object)')
        if self.type != "json_schema" and self.json_schema is not None:
            raise ValueError(f'response_format.json_schema goes with type "json_schema", not "{self.type}"')
        return self

    def spec(self) -> dict | None:
        if self.type == "json_object":
            return {"type": "json_object"}
        if self.type == "json_schema":
            return {"type": "json_schema", "schema": self.json_schema.schema_}
        return None


class StructuredOutputs(BaseModel):
    """vLLM's ``structured_outputs`` (one of its members)."""

    model_config = ConfigDict(extra="forbid")
    json_: Optional[Union[dict[str, Any], str]] = Field(None, alias="json")
    regex: Optional[str] = None
    choice: Optional[list[str]] = None
    grammar: Optional[str] = None
    json_object: Optional[StrictBool] = None

    @field_validator("json_", mode="before")
    @classmethod
    def _json(cls, v):
        return _schema(v, "structured_outputs.json") if v is not None else v

    def spec(self) -> dict | None:
        given = {k: v for k, v in (("json", self.json_), ("regex", self.regex), ("choice", self.choice),
                                   ("grammar", self.grammar), ("json_object", self.json_object or None))
                 if v is not None}
        if len(given) > 1:
            raise ValueError(f"structured_outputs takes one of json, regex, choice, grammar, json_object; got "
                             f"{', '.join(given)}")
        if not given:
            return None
        kind, value = next(iter(given.items()))
        return _guided(f"structured_outputs.{kind}", kind, value)


def _schema(value: Any, field: str) -> dict:
    if isinstance(value, str):
        try:
            value = json.loads(value)
        except ValueError as exc:
            raise ValueError(f"{field} must be a JSON schema (an object, or a string holding one): {exc}") from None
    if not isinstance(value, dict):
        raise ValueError(f"{field} must be a JSON schema object, got {type(value).__name__}")
    return value


def _guided(field: str, kind: str, value: Any) -> dict:
    if kind == "json":
        return {"type": "json_schema", "schema": _schema(value, field)}
    if kind == "json_object":
        return {"type": "json_object"}
    if kind == "regex":
        return {"type": "regex", "pattern": value}
    if kind == "choice":
        return {"type": "choice", "choices": value}
    return {"type": "grammar", "grammar": value}


class GuidedFields(BaseModel):
    """The structured-output fields of the OpenAI bodies (a mixin)."""

    response_format: Optional[ResponseFormat] = Field(None, description='{"type": "text"} (none), {"type": '
                                                      '"json_object"} or {"type": "json_schema", "json_schema": '
                                                      '{"name", "schema", "strict"}}.')
    guided_json: Optional[Union[dict[str, Any], str]] = Field(None, description="vLLM: a JSON schema the output "
                                                                                "follows.")
    guided_regex: Optional[str] = Field(None, description="vLLM: a regular expression the output matches.")
    guided_choice: Optional[list[str]] = Field(None, description="vLLM: the output is one of these strings.")
    guided_grammar: Optional[str] = Field(None, description="vLLM: an EBNF grammar (xgrammar's) the output "
                                                            "follows.")
    guided_decoding_backend: Optional[str] = Field(None, description="vLLM: accepted and ignored (the "
                                                                     "structured_output plugin is the backend).")
    structured_outputs: Optional[StructuredOutputs] = Field(None, description="vLLM: one of json, regex, choice, "
                                                                              "grammar, json_object.")

    @field_validator("guided_json", mode="before")
    @classmethod
    def _guided_json(cls, v):
        return _schema(v, "guided_json") if v is not None else v

    def guided_sources(self) -> list[tuple[str, dict]]:
        """Every structured-output request the body makes, as ``(field, plugin argument)``."""
        out = []
        if self.response_format is not None and self.response_format.spec() is not None:
            out.append(("response_format", self.response_format.spec()))
        for kind in ("json", "regex", "choice", "grammar"):
            value = getattr(self, f"guided_{kind}")
            if value is not None:
                out.append((f"guided_{kind}", _guided(f"guided_{kind}", kind, value)))
        if self.structured_outputs is not None and self.structured_outputs.spec() is not None:
            out.append(("structured_outputs", self.structured_outputs.spec()))
        return out


def one_source(sources: list[tuple[str, dict]]) -> tuple[dict | None, str | None]:
    if len(sources) > 1:
        raise ValueError(f"{sources[0][0]} and {sources[1][0]} both ask for structured output; send one of them")
    return (sources[0][1], sources[0][0]) if sources else (None, None)
