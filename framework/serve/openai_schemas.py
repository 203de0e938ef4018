"""Request bodies of the OpenAI-compatible routes (``/v1/completions``, ``/v1/chat/completions``).

They share the native routes' checks (``schemas.py``). Fields that would change the result but are not supported
are refused by name (``unsupported.py``); other unknown fields are refused as unknown; the harmless extras
OpenAI clients send are declared, accepted and ignored.
"""
from __future__ import annotations

from typing import Any, ClassVar, Literal, Optional, Union

from pydantic import BaseModel, ConfigDict, Field, StrictBool, StrictInt, field_validator, model_validator
from pydantic_core import PydanticCustomError

from tokenmill.params import SamplingParams
from tokenmill.serve.sampling_fields import SamplingFields, check_logprobs
from tokenmill.serve.schemas import (MAX_BATCH_PROMPTS, CheckedRequest, check_max_tokens, check_prompt, check_stop,
                                    check_text)
from tokenmill.serve.structured import GuidedFields, one_source
from tokenmill.serve.tools import (Tool, ToolCallIn, ToolChoice, call_schema, check_tool_choice, check_tools,
                                   template_tools)
from tokenmill.serve.unsupported import CHAT, COMPLETIONS

MAX_N = 128


class StreamOptions(BaseModel):
    model_config = ConfigDict(extra="forbid")
    include_usage: StrictBool = Field(False, description="Send a usage chunk before `data: [DONE]`.")
    include_obfuscation: Optional[StrictBool] = Field(None, description="Accepted and ignored (no padding is sent).")


class _OpenAIBase(CheckedRequest, SamplingFields, GuidedFields):
    """Fields common to completions and chat (with the shared sampling and structured-output fields). Fields that
    would change the result and are not supported are refused by name (``unsupported.UNSUPPORTED``), other
    unknown fields as unknown; the harmless extras OpenAI clients send (``user``, ``metadata``, ``store`` ...)
    are declared here, accepted and ignored."""

    model: Optional[str] = None
    max_tokens: Optional[StrictInt] = None
    temperature: Optional[float] = None
    top_p: Optional[float] = None
    top_k: Optional[StrictInt] = None
    n: Optional[StrictInt] = Field(None, description=f"Choices per prompt (1 to {MAX_N}); the prompt is computed "
                                                      "once, the other copies reuse its KV where the pipeline has a "
                                                      "prefix cache. With a seed, each copy gets its own seed "
                                                      "derived from it.")
    stream: Optional[StrictBool] = False
    stream_options: Optional[StreamOptions] = None
    stop: Optional[Union[str, list[str]]] = None
    seed: Optional[StrictInt] = None
    ignore_eos: StrictBool = False
    # harmless extras: accepted and ignored (they do not change the generated text)
    user: Optional[str] = Field(None, description="Accepted and ignored.")
    metadata: Optional[dict[str, str]] = Field(None, description="Accepted and ignored.")
    store: Optional[StrictBool] = Field(None, description="Accepted and ignored; nothing is stored.")
    service_tier: Optional[str] = Field(None, description="Accepted and ignored.")
    safety_identifier: Optional[str] = Field(None, description="Accepted and ignored.")
    prompt_cache_key: Optional[str] = Field(None, description="Accepted and ignored (prefix caching is "
                                                              "automatic where the pipeline has it).")
    parallel_tool_calls: Optional[StrictBool] = Field(None, description="Accepted: each choice makes one call.")

    @field_validator("stop")
    @classmethod
    def _stop(cls, v):
        check_stop(v)
        return v

    @field_validator("n")
    @classmethod
    def _n(cls, v):
        if v is not None and not 1 <= v <= MAX_N:
            raise ValueError(f"n must be an integer in [1, {MAX_N}] (choices per prompt), got {v}")
        return v

    @property
    def copies(self) -> int:
        return self.n or 1

    def sampling_params(self, default_max_tokens: int | None) -> tuple[SamplingParams, bool]:
        """SamplingParams and whether max_tokens is to fill the context (OpenAI's default for chat)."""
        fill = self.max_tokens is None and default_max_tokens is None
        return SamplingParams(
            max_tokens=self.max_tokens or default_max_tokens or 1,
            temperature=1.0 if self.temperature is None else self.temperature,
            top_p=1.0 if self.top_p is None else self.top_p, top_k=self.top_k or 0, seed=self.seed,
            stop=check_stop(self.stop), ignore_eos=self.ignore_eos, **self.sampling_kwargs()), fill

    def structured_request(self) -> tuple[dict | None, str | None]:
        return one_source(self.guided_sources())

    @property
    def include_usage(self) -> bool:
        return bool(self.stream_options and self.stream_options.include_usage)

    @property
    def max_tokens_param(self) -> str:
        """The field the token limit came from, for error messages."""
        return "max_tokens"


class CompletionRequest(_OpenAIBase):
    model_config = ConfigDict(json_schema_extra={"examples": [
        {"prompt": "Hello", "max_tokens": 4}, {"prompt": "Hello", "max_tokens": 4, "stream": True},
        {"prompt": "Hello", "max_tokens": 4, "n": 2, "temperature": 0.8, "seed": 3, "logprobs": 1,
         "frequency_penalty": 0.5, "top_k": 20},
        {"prompt": "Is the sky blue? Answer:", "max_tokens": 4, "guided_choice": [" yes", " no"]}]})
    route: ClassVar[str] = COMPLETIONS
    prompt: Union[str, list[str], list[StrictInt], list[list[StrictInt]]]
    logprobs: Optional[StrictInt] = Field(None, description="Return each token's log-probability (the model's raw "
                                                            "distribution) and this many top alternatives (0-20).")

    @field_validator("logprobs")
    @classmethod
    def _logprobs(cls, v):
        return check_logprobs(v)

    def logprob_count(self) -> int | None:
        return self.logprobs

    @field_validator("prompt")
    @classmethod
    def _prompt(cls, v):
        if isinstance(v, list) and v and isinstance(v[0], (str, list)):
            if len(v) > MAX_BATCH_PROMPTS:
                raise ValueError(f"prompt takes at most {MAX_BATCH_PROMPTS} prompts, got {len(v)}")
            for i, p in enumerate(v):
                check_prompt(p, f"prompt[{i}]")
            return v
        return check_prompt(v)

    def prompts(self) -> list[Union[str, list[int]]]:
        v = self.prompt
        if isinstance(v, list) and v and isinstance(v[0], (str, list)):
            return list(v)
        return [v]


class ContentPart(BaseModel):
    model_config = ConfigDict(extra="allow")
    type: str
    text: Optional[str] = None


class ChatMessage(BaseModel):
    """The chat template receives a message's role and content, an assistant message's tool calls and a tool
    message's tool_call_id. Keys OpenAI's own answers carry empty are accepted; any other key is unknown."""

    model_config = ConfigDict(extra="forbid")
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: Optional[Union[str, list[ContentPart]]] = None
    name: Optional[str] = Field(None, description="Accepted and ignored.")
    tool_call_id: Optional[str] = Field(None, description="Of a tool message: the call it answers.")
    tool_calls: Optional[list[ToolCallIn]] = Field(None, description="Of an assistant message: the calls it made.")
    function_call: None = None
    refusal: None = None
    audio: None = None
    annotations: Optional[list[Any]] = Field(None, description="Accepted and ignored.")

    def as_template_message(self) -> dict:
        content = self.content
        if isinstance(content, list):
            texts = []
            for part in content:
                if part.type != "text" or part.text is None:
                    raise ValueError(f"message content parts of type '{part.type}' are not supported; "
                                     "send text parts only")
                texts.append(part.text)
            content = "".join(texts)
        check_text(content or "", "message content")
        role = "system" if self.role == "developer" else self.role
        message = {"role": role, "content": content or ""}
        if self.tool_calls:
            if self.role != "assistant":
                raise ValueError(f"tool_calls belong to assistant messages, not {self.role} ones")
            message["tool_calls"] = [c.template_call() for c in self.tool_calls]
        if self.role == "tool" and self.tool_call_id is not None:
            message["tool_call_id"] = self.tool_call_id
        return message


class ChatCompletionRequest(_OpenAIBase):
    model_config = ConfigDict(json_schema_extra={"examples": [
        {"messages": [{"role": "user", "content": "Hello"}], "max_completion_tokens": 4},
        {"messages": [{"role": "user", "content": "Hello"}], "max_tokens": 4, "stream": True},
        {"messages": [{"role": "user", "content": "Hello"}], "max_tokens": 8, "n": 2, "temperature": 0.8,
         "seed": 7, "logprobs": True, "top_logprobs": 2},
        {"messages": [{"role": "user", "content": "A JSON object, please"}], "max_tokens": 32,
         "response_format": {"type": "json_schema", "json_schema": {"name": "point", "schema": {
             "type": "object", "properties": {"x": {"type": "integer"}}, "required": ["x"]}}}},
        {"messages": [{"role": "user", "content": "Weather in Paris?"}], "max_tokens": 48,
         "tools": [{"type": "function", "function": {"name": "get_weather", "parameters": {
             "type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}}],
         "tool_choice": "required"}]})
    route: ClassVar[str] = CHAT
    messages: list[ChatMessage]
    max_completion_tokens: Optional[StrictInt] = Field(None, description="Tokens to generate at most; wins "
                                                                         "over max_tokens, as in OpenAI.")
    logprobs: Optional[StrictBool] = Field(None, description="Return each token's log-probability (the model's "
                                                             "raw distribution).")
    top_logprobs: Optional[StrictInt] = Field(None, description="With logprobs: this many top alternatives per "
                                                                "token (0-20).")
    tools: Optional[list[Tool]] = Field(None, description="Functions the model may call (see tool_choice).")
    tool_choice: Optional[ToolChoice] = Field(None, description='"none", "required", {"type": "function", '
                                              '"function": {"name": ...}}, or "auto" (the default with tools), '
                                              'which is read as "required".')

    @field_validator("max_completion_tokens")
    @classmethod
    def _max_completion_tokens(cls, v):
        return check_max_tokens(v)

    @field_validator("tool_choice", mode="before")
    @classmethod
    def _tool_choice(cls, v):
        return check_tool_choice(v)

    @field_validator("top_logprobs")
    @classmethod
    def _top_logprobs(cls, v):
        return check_logprobs(v, "top_logprobs")

    @field_validator("messages")
    @classmethod
    def _messages(cls, v):
        if not v:
            raise ValueError("messages is empty: send at least one message")
        for i, m in enumerate(v):
            try:
                m.as_template_message()
            except ValueError as exc:
                raise ValueError(f"messages[{i}]: {exc}") from None
        return v

    @model_validator(mode="before")
    @classmethod
    def _checks_first(cls, data):
        """Tool and logprob combinations are checked before the sampling fields (which build on them)."""
        if isinstance(data, dict):
            if data.get("top_logprobs") and not data.get("logprobs"):
                raise PydanticCustomError("value_error", "top_logprobs needs logprobs: true",
                                          {"param": "top_logprobs"})
        return data

    @model_validator(mode="after")
    def _max_completion_tokens_wins(self):
        if self.max_completion_tokens is not None:
            self.max_tokens = self.max_completion_tokens
        return self

    @property
    def max_tokens_param(self) -> str:
        return "max_tokens" if self.max_completion_tokens is None else "max_completion_tokens"

    def call_tools(self) -> list[Tool] | None:
        """The tools the output is constrained to call (None: plain text)."""
        return check_tools(self.tools, self.tool_choice)

    def template_tools(self) -> list[dict] | None:
        """The tools offered to the chat template: none with tool_choice "none"."""
        return template_tools(self.tools) if self.tools and self.call_tools() is not None else None

    def structured_request(self) -> tuple[dict | None, str | None]:
        sources = self.guided_sources()
        tools = self.call_tools()
        if tools is not None:
            sources.insert(0, ("tools", {"type": "json_schema", "schema": call_schema(tools)}))
        return one_source(sources)

    def logprob_count(self) -> int | None:
        return (self.top_logprobs or 0) if self.logprobs else None

    def param_name(self, sampling_name: str) -> str:
        return "top_logprobs" if sampling_name == "logprobs" else sampling_name

    def template_messages(self) -> list[dict]:
        return [m.as_template_message() for m in self.messages]
