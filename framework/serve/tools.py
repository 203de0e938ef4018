"""Function calling on ``/v1/chat/completions``: ``tools`` and ``tool_choice``.

A call is generated as the JSON object ``{"name": <tool name>, "arguments": <its arguments>}``, constrained by
structured output to a JSON schema built from the tools (one object schema per tool, whose ``name`` is an enum
of that tool's name and whose ``arguments`` is its ``parameters`` schema; ``anyOf`` them for several tools), and
answered as ``message.tool_calls`` with ``finish_reason: "tool_calls"``. One call per choice.

``tool_choice``: ``"none"`` generates text and leaves the tools out of the prompt; ``"required"`` and
``{"type": "function", "function": {"name": ...}}`` constrain the output to a call (of that tool); ``"auto"``
(the default when tools are given) is treated as ``"required"``: with no grammar that lets the model choose
between text and a call, the honest reading of "the model may call a tool" here is that it does. Send
``"none"`` for text.

Tools are offered to the chat template (``tools=``) when the template uses them; otherwise a system message
describing them and the call format is put first (as llama-server's generic tool format does). Assistant
messages carrying ``tool_calls`` are rendered by templates that know them and, for the others, as the JSON text
a call is generated as; ``tool`` messages go to the template as they are.
"""
from __future__ import annotations

import json
import re
import uuid
from typing import Any, Literal, Optional, Union

from pydantic import BaseModel, ConfigDict, Field, StrictBool, field_validator

from tokenmill.errors import RequestError

TOOL_NAME = re.compile(r"^[A-Za-z0-9_-]{1,64}$")
NO_PARAMETERS = {"type": "object", "properties": {}, "additionalProperties": False}
TOOLS_PROMPT = ("You can call these functions. To call one, answer with only a JSON object "
                '{{"name": <the function\'s name>, "arguments": <its arguments as a JSON object>}}.\n'
                "Functions:\n{functions}")


class FunctionDef(BaseModel):
    model_config = ConfigDict(extra="forbid")
    name: str = Field(..., description="1 to 64 letters, digits, underscores or dashes.")
    description: Optional[str] = None
    parameters: Optional[dict[str, Any]] = Field(None, description="JSON schema of the arguments (an object).")
    strict: Optional[StrictBool] = Field(None, description="Accepted: the arguments always follow the schema.")

    @field_validator("name")
    @classmethod
    def _name(cls, v):
        if not TOOL_NAME.match(v):
            raise ValueError(f"a function name is 1 to 64 letters, digits, underscores or dashes, got {v!r:.80}")
        return v


class Tool(BaseModel):
    model_config = ConfigDict(extra="forbid")
    type: Literal["function"]
    function: FunctionDef


class NamedFunction(BaseModel):
    model_config = ConfigDict(extra="forbid")
    name: str


class NamedToolChoice(BaseModel):
    model_config = ConfigDict(extra="forbid")
    type: Literal["function"]
    function: NamedFunction


ToolChoice = Union[Literal["none", "auto", "required"], NamedToolChoice]
TOOL_CHOICES = ('tool_choice must be "none", "auto", "required" or {"type": "function", "function": {"name": '
                '<one of tools>}}')


def check_tool_choice(v: Any) -> Any:
    """A clear error for a tool_choice of the wrong shape (instead of one per member of the union)."""
    if v is None or v in ("none", "auto", "required"):
        return v
    named = isinstance(v, dict) and v.get("type") == "function" and isinstance(v.get("function"), dict) \
        and isinstance(v["function"].get("name"), str) and set(v) == {"type", "function"} \
        and set(v["function"]) == {"name"}
    if not named:
        shown = json.dumps(v)[:120] if isinstance(v, (dict, list, str, int, float)) else repr(v)
        raise ValueError(f"{TOOL_CHOICES}, got {shown}")
    return v


class FunctionCall(BaseModel):
    model_config = ConfigDict(extra="forbid")
    name: str
    arguments: str = Field(..., description="The arguments as a JSON string, as OpenAI sends them.")


class ToolCallIn(BaseModel):
    """A tool call of an earlier assistant message (replayed conversation)."""

    model_config = ConfigDict(extra="forbid")
    id: Optional[str] = None
    type: Literal["function"] = "function"
    function: FunctionCall

    def template_call(self) -> dict:
        try:
            arguments = json.loads(self.function.arguments)  # templates write the arguments as JSON themselves
        except ValueError:
            arguments = self.function.arguments
        return {"id": self.id, "type": "function", "function": {"name": self.function.name, "arguments": arguments}}


def check_tools(tools: list[Tool] | None, tool_choice: Any) -> list[Tool] | None:
    """The tools a call is constrained to (None: no call), or ValueError naming the field."""
    if tools is not None:
        names = [t.function.name for t in tools]
        twice = sorted({n for n in names if names.count(n) > 1})
        if twice:
            raise ValueError(f"tools names the function {twice[0]!r} more than once; function names must be unique")
    choice = tool_choice if tool_choice is not None else ("auto" if tools else "none")
    if choice == "none":
        return None
    if not tools:
        shown = choice if isinstance(choice, str) else f"function '{choice.function.name}'"
        raise ValueError(f"tool_choice {shown} needs tools: send the functions in tools, or tool_choice none")
    if isinstance(choice, NamedToolChoice):
        chosen = [t for t in tools if t.function.name == choice.function.name]
        if not chosen:
            raise ValueError(f"tool_choice names the function '{choice.function.name}', which is not among tools "
                             f"({', '.join(t.function.name for t in tools)})")
        return chosen
    return list(tools)  # "required", and "auto" read as required (see the module docstring)


def call_schema(tools: list[Tool]) -> dict:
    """The JSON schema of one call of one of ``tools``."""
    one = [{"type": "object", "properties": {"name": {"type": "string", "enum": [t.function.name]},
                                             "arguments": t.function.parameters or NO_PARAMETERS},
            "required": ["name", "arguments"], "additionalProperties": False} for t in tools]
    return one[0] if len(one) == 1 else {"anyOf": one}


def template_tools(tools: list[Tool]) -> list[dict]:
    return [{"type": "function", "function": t.function.model_dump(exclude_none=True)} for t in tools]


def parse_call(text: str, tools: list[Tool]) -> dict | None:
    """The ``tool_calls`` entry the generated ``text`` makes, or None when it is not a whole call (cut short)."""
    try:
        obj = json.loads(text)
    except ValueError:
        return None
    if not isinstance(obj, dict) or obj.get("name") not in {t.function.name for t in tools} or "arguments" not in obj:
        return None
    return {"id": f"call_{uuid.uuid4().hex[:24]}", "type": "function",
            "function": {"name": obj["name"], "arguments": json.dumps(obj["arguments"], ensure_ascii=False)}}


def _template_source(tokenizer) -> str:
    template = getattr(tokenizer, "chat_template", None)
    return " ".join(template.values()) if isinstance(template, dict) else (template or "")


def encode_chat(pipe, messages: list[dict], tools: list[dict] | None) -> list[int]:
    """Token ids of ``messages`` through ``pipe``'s chat template, with ``tools`` offered to it (see the module
    docstring). A template error is a :class:`RequestError` (400), not a server error."""
    source = _template_source(pipe.tokenizer)
    calls = any(m.get("tool_calls") for m in messages)
    try:
        if not tools and not calls:
            return pipe.encode(messages, chat=True)
        messages = [dict(m) for m in messages]
        if calls and "tool_calls" not in source:
            for m in messages:
                if m.get("tool_calls"):
                    text = "\n".join(json.dumps({"name": c["function"]["name"], "arguments": c["function"][
                        "arguments"]}, ensure_ascii=False) for c in m.pop("tool_calls"))
                    m["content"] = (m.get("content") or "") + text
        offered = None
        if tools and "tools" in source:
            offered = tools
        elif tools:
            described = TOOLS_PROMPT.format(functions="\n".join(json.dumps(t["function"], ensure_ascii=False)
                                                                for t in tools))
            if messages and messages[0]["role"] == "system":
                messages[0]["content"] = f"{messages[0]['content']}\n\n{described}".lstrip()
            else:
                messages.insert(0, {"role": "system", "content": described})
        return pipe.apply_chat_template(messages, tools=offered)
    except RequestError:
        raise
    except Exception as exc:  # jinja2's TemplateError (raise_exception in a template) and its kin
        raise RequestError(f"the chat template of this model refused the messages: {type(exc).__name__}: "
                           f"{exc}") from None
