"""Request bodies of the OpenAI-compatible routes (``/v1/completions``, ``/v1/chat/completions``).

They share the native routes' checks (``schemas.py``). Fields that would change the result but are not supported
are refused by name (``unsupported.py``); other unknown fields are refused as unknown; the harmless extras
OpenAI clients send are declared, accepted and ignored.
"""
from __future__ import annotations

from typing import Any, ClassVar, Literal, Optional, Union

from pydantic import BaseModel, ConfigDict, Field, StrictBool, StrictInt, field_validator, model_validator

from tokenmill.params import SamplingParams
from tokenmill.serve.schemas import MAX_BATCH_PROMPTS, CheckedRequest, check_max_tokens, check_prompt, check_stop, check_text
from tokenmill.serve.unsupported import CHAT, COMPLETIONS


class StreamOptions(BaseModel):
    model_config = ConfigDict(extra="forbid")
    include_usage: StrictBool = Field(False, description="Send a usage chunk before `data: [DONE]`.")
    include_obfuscation: Optional[StrictBool] = Field(None, description="Accepted and ignored (no padding is sent).")


class _OpenAIBase(CheckedRequest):
    """Fields common to completions and chat. Fields that would change the result and are not supported are
    refused by name (``unsupported.UNSUPPORTED``), other unknown fields as unknown; the harmless extras OpenAI
    clients send (``user``, ``metadata``, ``store`` ...) are declared here, accepted and ignored."""

    model: Optional[str] = None
    max_tokens: Optional[StrictInt] = None
    temperature: Optional[float] = None
    top_p: Optional[float] = None
    top_k: Optional[StrictInt] = None
    n: Optional[StrictInt] = None
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
    parallel_tool_calls: Optional[StrictBool] = Field(None, description="Accepted and ignored (no tools).")

    @field_validator("stop")
    @classmethod
    def _stop(cls, v):
        check_stop(v)
        return v

    @model_validator(mode="after")
    def _unsupported(self):
        if self.n not in (None, 1):
            raise ValueError(f"n must be 1 (one choice per prompt), got {self.n}")
        return self

    def sampling_params(self, default_max_tokens: int | None) -> tuple[SamplingParams, bool]:
        """SamplingParams and whether max_tokens is to fill the context (OpenAI's default for chat)."""
        fill = self.max_tokens is None and default_max_tokens is None
        return SamplingParams(
            max_tokens=self.max_tokens or default_max_tokens or 1,
            temperature=1.0 if self.temperature is None else self.temperature,
            top_p=1.0 if self.top_p is None else self.top_p, top_k=self.top_k or 0, seed=self.seed,
            stop=check_stop(self.stop), ignore_eos=self.ignore_eos), fill

    @property
    def include_usage(self) -> bool:
        return bool(self.stream_options and self.stream_options.include_usage)

    @property
    def max_tokens_param(self) -> str:
        """The field the token limit came from, for error messages."""
        return "max_tokens"


class CompletionRequest(_OpenAIBase):
    model_config = ConfigDict(json_schema_extra={"examples": [{"prompt": "Hello", "max_tokens": 4},
                                                              {"prompt": "Hello", "max_tokens": 4, "stream": True}]})
    route: ClassVar[str] = COMPLETIONS
    prompt: Union[str, list[str], list[StrictInt], list[list[StrictInt]]]

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
    """The chat template receives a message's role and content. Keys it would drop are refused when they carry
    something (a tool call), accepted when OpenAI's own answers carry them empty; any other key is unknown."""

    model_config = ConfigDict(extra="forbid")
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: Optional[Union[str, list[ContentPart]]] = None
    name: Optional[str] = Field(None, description="Accepted and ignored.")
    tool_call_id: Optional[str] = Field(None, description="Accepted and ignored.")
    tool_calls: Optional[list[Any]] = Field(None, description="Refused unless empty: there is no function calling.")
    function_call: None = None
    refusal: None = None
    audio: None = None
    annotations: Optional[list[Any]] = Field(None, description="Accepted and ignored.")

    def as_template_message(self) -> dict:
        if self.tool_calls:
            raise ValueError("tool_calls is not supported (there is no function calling); leave it out")
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
        return {"role": role, "content": content or ""}


class ChatCompletionRequest(_OpenAIBase):
    model_config = ConfigDict(json_schema_extra={"examples": [
        {"messages": [{"role": "user", "content": "Hello"}], "max_completion_tokens": 4},
        {"messages": [{"role": "user", "content": "Hello"}], "max_tokens": 4, "stream": True}]})
    route: ClassVar[str] = CHAT
    messages: list[ChatMessage]
    max_completion_tokens: Optional[StrictInt] = Field(None, description="Tokens to generate at most; wins "
                                                                         "over max_tokens, as in OpenAI.")

    @field_validator("max_completion_tokens")
    @classmethod
    def _max_completion_tokens(cls, v):
        return check_max_tokens(v)

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

    @model_validator(mode="after")
    def _max_completion_tokens_wins(self):
        if self.max_completion_tokens is not None:
            self.max_tokens = self.max_completion_tokens
        return self

    @property
    def max_tokens_param(self) -> str:
        return "max_tokens" if self.max_completion_tokens is None else "max_completion_tokens"

    def template_messages(self) -> list[dict]:
        return [m.as_template_message() for m in self.messages]
