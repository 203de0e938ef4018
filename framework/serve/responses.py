"""Response bodies of the OpenAI-compatible and utility routes, and what every route documents in the OpenAPI
schema: the error statuses it actually returns (OpenAI-shaped bodies, ``Retry-After`` on 503) and, for
streaming routes, ``text/event-stream``. FastAPI's default 422 is removed: validation errors are 400 here."""
from __future__ import annotations

from typing import Any, Literal, Optional

from fastapi import FastAPI
from pydantic import BaseModel


# ------------------------------------------------------------------------------------------- errors
class ErrorDetail(BaseModel):
    message: str
    type: str
    param: Optional[str] = None
    code: Optional[str] = None


class ErrorResponse(BaseModel):
    error: ErrorDetail


ERROR_WHEN = {
    400: "Bad input: the message says what was wrong and what is allowed.",
    401: "API key missing or wrong (the server was started with --api-key).",
    404: "Unknown model (the message lists the models).",
    413: "The request body is larger than the server accepts.",
    500: "The request failed while running; other requests carry on.",
    503: "Queue full, pipeline loading or failed, engine busy, or the server is draining.",
    504: "The request ran past --request-timeout and was aborted.",
}
RETRY_AFTER = {"Retry-After": {"description": "Seconds to wait before retrying (queue full, loading, draining).",
                               "schema": {"type": "integer"}}}


def errors(*statuses: int) -> dict[int | str, dict[str, Any]]:
    """``responses=`` entries for these error statuses."""
    out: dict[int | str, dict[str, Any]] = {}
    for status in statuses:
        out[status] = {"model": ErrorResponse, "description": ERROR_WHEN[status]}
        if status == 503:
            out[status]["headers"] = RETRY_AFTER
        if status == 401:
            out[status]["headers"] = {"WWW-Authenticate": {"schema": {"type": "string"}}}
    return out


SSE_EVENT = {"type": "object", "description": "One Server-Sent Event.", "required": ["data"], "properties": {
    "event": {"type": "string", "description": "Absent for chunks; `done` or `error` on the native route."},
    "data": {"type": "string", "description": "A JSON object, or `[DONE]` at the end of an OpenAI stream."}}}


def streams(what: str) -> dict[int | str, dict[str, Any]]:
    """The 200 response of a route that streams Server-Sent Events when the body says ``stream: true``."""
    return {200: {"description": f"JSON, or with stream: true {what} as Server-Sent Events.",
                  "content": {"text/event-stream": {"schema": SSE_EVENT}}}}


GENERATION_ERRORS = (400, 401, 413, 500, 503, 504)


def drop_default_422(app: FastAPI) -> None:
    """Validation errors answer 400 (``app._install_error_handlers``); the schema must not promise 422."""
    build = app.openapi

    def openapi() -> dict[str, Any]:
        schema = build()
        for path in schema.get("paths", {}).values():
            for op in path.values():
                op.get("responses", {}).pop("422", None)
        for name in ("HTTPValidationError", "ValidationError"):
            schema.get("components", {}).get("schemas", {}).pop(name, None)
        return schema

    app.openapi = openapi


# ------------------------------------------------------------------------------------------- OpenAI
class PromptTokensDetails(BaseModel):
    cached_tokens: int


class Usage(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int
    prompt_tokens_details: Optional[PromptTokensDetails] = None


class CompletionLogprobs(BaseModel):
    tokens: list[str]
    token_logprobs: list[float]
    top_logprobs: list[dict[str, float]]
    text_offset: list[int]


class CompletionChoice(BaseModel):
    index: int
    text: str
    logprobs: Optional[CompletionLogprobs] = None
    finish_reason: Optional[str]


class CompletionResponse(BaseModel):
    id: str
    object: Literal["text_completion"]
    created: int
    model: str
    choices: list[CompletionChoice]
    usage: Usage


class FunctionCallOut(BaseModel):
    name: str
    arguments: str


class ToolCallOut(BaseModel):
    id: str
    type: Literal["function"]
    function: FunctionCallOut


class AssistantMessage(BaseModel):
    role: Literal["assistant"]
    content: Optional[str]
    tool_calls: Optional[list[ToolCallOut]] = None


class TopLogprob(BaseModel):
    token: str
    logprob: float
    bytes: Optional[list[int]]


class ChatTokenLogprob(TopLogprob):
    top_logprobs: list[TopLogprob]


class ChatLogprobs(BaseModel):
    content: Optional[list[ChatTokenLogprob]]
    refusal: Optional[list[ChatTokenLogprob]] = None


class ChatChoice(BaseModel):
    index: int
    message: AssistantMessage
    logprobs: Optional[ChatLogprobs] = None
    finish_reason: Optional[str]


class ChatCompletionResponse(BaseModel):
    id: str
    object: Literal["chat.completion"]
    created: int
    model: str
    choices: list[ChatChoice]
    usage: Usage


class ModelCard(BaseModel):
    id: str
    object: Literal["model"]
    created: int
    owned_by: str
    ready: bool
    max_model_len: Optional[int]


class ModelList(BaseModel):
    object: Literal["list"]
    data: list[ModelCard]


# ------------------------------------------------------------------------------------------- utility routes
class TokenizeResponse(BaseModel):
    tokens: list[int]
    count: int
    max_model_len: int


class DetokenizeResponse(BaseModel):
    prompt: str


class VersionResponse(BaseModel):
    version: str
