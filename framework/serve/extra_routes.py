"""Utility routes vLLM clients expect: ``POST /tokenize``, ``POST /detokenize`` and ``GET /version``.

Tokenizing runs on the pipeline's engine thread, like everything else that touches a pipeline (see
docs/service.md); ``model`` picks the pipeline as on the OpenAI routes (unknown: 404).
"""
from __future__ import annotations

import asyncio
from typing import Optional

from fastapi import APIRouter
from pydantic import BaseModel, ConfigDict, Field, StrictBool, StrictInt, field_validator

from tokenmill import __version__
from tokenmill.serve.responses import DetokenizeResponse, TokenizeResponse, VersionResponse, errors
from tokenmill.serve.schemas import check_text
from tokenmill.serve.service import APIError, Service

MAX_TOKENS_PER_CALL = 1 << 20


class TokenizeRequest(BaseModel):
    model_config = ConfigDict(extra="forbid", json_schema_extra={"examples": [{"prompt": "Hello world"}]})
    prompt: str = Field(..., description="Text to tokenize.")
    model: Optional[str] = Field(None, description="Pipeline name; default: the first one.")
    add_special_tokens: StrictBool = Field(True, description="Add the tokenizer's special tokens (BOS), as a "
                                                             "text prompt is encoded for generation.")

    @field_validator("prompt")
    @classmethod
    def _prompt(cls, v):
        return check_text(v, "prompt")


class DetokenizeRequest(BaseModel):
    model_config = ConfigDict(extra="forbid", json_schema_extra={"examples": [{"tokens": [1, 2, 3]}]})
    tokens: list[StrictInt] = Field(..., description="Token ids, each in [0, vocabulary size).")
    model: Optional[str] = Field(None, description="Pipeline name; default: the first one.")

    @field_validator("tokens")
    @classmethod
    def _tokens(cls, v):
        if len(v) > MAX_TOKENS_PER_CALL:
            raise ValueError(f"tokens takes at most {MAX_TOKENS_PER_CALL} ids, got {len(v)}")
        for i, t in enumerate(v):
            if t < 0:
                raise ValueError(f"tokens[{i}] = {t}: token ids must be integers >= 0")
        return v


def router(service: Service) -> APIRouter:
    r = APIRouter(tags=["utility"])

    @r.post("/tokenize", response_model=TokenizeResponse, responses=errors(400, 401, 404, 413, 503),
            summary="Token ids of a text, as the pipeline encodes a prompt")
    async def tokenize(body: TokenizeRequest):
        w = service.worker(body.model, openai=True)

        service.check_ready(w)  # tokenizing runs on a pool thread, never on the engine thread (a long text)
        ids = await asyncio.to_thread(w.pipeline.tokenizer.encode, body.prompt,
                                      add_special_tokens=body.add_special_tokens)
        return {"tokens": ids, "count": len(ids), "max_model_len": w.limits.max_model_len}

    @r.post("/detokenize", response_model=DetokenizeResponse, responses=errors(400, 401, 404, 413, 503),
            summary="The text of token ids (special tokens included)")
    async def detokenize(body: DetokenizeRequest):
        w = service.worker(body.model, openai=True)

        def decode(p) -> str:
            vocab = p.engine.vocab_size
            for i, t in enumerate(body.tokens):
                if t >= vocab:
                    raise APIError(400, f"tokens[{i}] = {t} is outside the vocabulary [0, {vocab}) of "
                                        f"'{w.name}'", param="tokens")
            return p.tokenizer.decode(body.tokens)

        return {"prompt": await service.on_engine_thread(w, decode)}

    @r.get("/version", response_model=VersionResponse, responses=errors(401), summary="The tokenmill version")
    async def version():
        return {"version": __version__}

    return r
