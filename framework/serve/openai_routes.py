"""OpenAI-compatible routes: ``GET /v1/models[/{id}]``, ``POST /v1/completions``, ``POST /v1/chat/completions``.

The ``model`` field names a pipeline (its YAML ``name:``). Responses follow OpenAI's shapes, with ``usage``;
streams are Server-Sent Events ending in ``data: [DONE]``, so the ``openai`` Python client works unchanged
with ``base_url="http://host:port/v1"``.
"""
from __future__ import annotations

import time
from typing import AsyncIterator

from fastapi import APIRouter, Request

from tokenmill.serve.openai_schemas import ChatCompletionRequest, CompletionRequest
from tokenmill.serve.responses import (GENERATION_ERRORS, ChatCompletionResponse, CompletionResponse, ModelCard,
                                       ModelList, errors, streams)
from tokenmill.serve.call import GenerationCall
from tokenmill.serve.replies import error_event, final_error, raise_for_finals, run_stream, run_unary, sse
from tokenmill.serve.service import APIError, Service
from tokenmill.serve.worker import Delta, Final, Interrupted

OPENAI_REASONS = {"stop": "stop", "length": "length"}


def _usage(finals_or_handles) -> dict:
    handles = [getattr(x, "handle", x) for x in finals_or_handles]
    prompt = sum(h.prompt_tokens for h in handles)
    completion = sum(h.num_tokens for h in handles)
    return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}


def router(service: Service) -> APIRouter:
    r = APIRouter(tags=["openai"])

    def card(name: str) -> dict:
        w = service.workers[name]
        return {"id": name, "object": "model", "created": int(service.started), "owned_by": "tokenmill",
                "ready": w.state == "ready", "max_model_len": w.limits.max_model_len if w.limits is not None else None}

    @r.get("/v1/models", response_model=ModelList, responses=errors(401),
           summary="The pipelines this server runs, as OpenAI models")
    async def models():
        return {"object": "list", "data": [card(name) for name in service.workers]}

    @r.get("/v1/models/{model_id:path}", response_model=ModelCard, responses=errors(401, 404),
           summary="One pipeline, as an OpenAI model")
    async def model(model_id: str):
        if model_id not in service.workers:  # "" too: on this route it names no model, not the default one
            raise APIError(404, f"The model '{model_id}' does not exist; available models: "
                                f"{', '.join(service.workers)}", param="model", code="model_not_found")
        return card(model_id)

    def _prepare(body, default_max_tokens: int | None):
        w = service.worker(body.model, openai=True)
        service.check_ready(w)
        params, fill = body.sampling_params(default_max_tokens)
        if not fill:
            service.check_max_tokens(w, params, body.max_tokens_param)
        return w, params, fill

    @r.post("/v1/completions", response_model=CompletionResponse, summary="OpenAI-compatible text completion",
            responses={**streams("text_completion chunks"), **errors(*GENERATION_ERRORS, 404)})
    async def completions(body: CompletionRequest, request: Request):
        received = time.perf_counter()
        w, params, fill = _prepare(body, 16)
        call = GenerationCall(service, w, request, body.prompts(), params, received=received,
                              stream=bool(body.stream), fill_max_tokens=fill, prefix="cmpl")
        created = int(time.time())

        def chunk(index: int, text: str, reason: str | None) -> dict:
            return {"id": call.id, "object": "text_completion", "created": created, "model": w.name,
                    "choices": [{"index": index, "text": text, "logprobs": None, "finish_reason": reason}]}

        if not body.stream:
            finals = await run_unary(call)
            raise_for_finals(finals)
            return {"id": call.id, "object": "text_completion", "created": created, "model": w.name,
                    "choices": [{"index": f.handle.index, "text": f.output.text, "logprobs": None,
                                 "finish_reason": OPENAI_REASONS.get(f.finish_reason, f.finish_reason)}
                                for f in finals],
                    "usage": _usage(finals)}

        async def events(first) -> AsyncIterator[str]:
            item = first
            while True:
                if isinstance(item, Delta):
                    yield sse(chunk(item.handle.index, item.text, None))
                elif isinstance(item, Final):
                    if final_error(item) is not None:
                        yield sse(error_event(item.finish_reason, call, item.error))
                        break
                    yield sse(chunk(item.handle.index, item.text,
                                    OPENAI_REASONS.get(item.finish_reason, item.finish_reason)))
                    if call.finished:
                        if body.include_usage:
                            yield sse({"id": call.id, "object": "text_completion", "created": created,
                                       "model": w.name, "choices": [], "usage": _usage(call.handles)})
                        break
                elif isinstance(item, Interrupted):
                    yield sse(error_event(item.reason, call))
                    break
                item = await call.next_item()
            yield sse("[DONE]")

        return await run_stream(call, events)

    @r.post("/v1/chat/completions", response_model=ChatCompletionResponse,
            summary="OpenAI-compatible chat completion",
            responses={**streams("chat.completion.chunk chunks"), **errors(*GENERATION_ERRORS, 404)})
    async def chat_completions(body: ChatCompletionRequest, request: Request):
        received = time.perf_counter()
        w, params, fill = _prepare(body, None)
        call = GenerationCall(service, w, request, [body.template_messages()], params, received=received,
                              stream=bool(body.stream), fill_max_tokens=fill, prefix="chatcmpl")
        created = int(time.time())

        def chunk(delta: dict, reason: str | None) -> dict:
            return {"id": call.id, "object": "chat.completion.chunk", "created": created, "model": w.name,
                    "choices": [{"index": 0, "delta": delta, "logprobs": None, "finish_reason": reason}]}

        if not body.stream:
            finals = await run_unary(call)
            raise_for_finals(finals)
            f = finals[0]
            return {"id": call.id, "object": "chat.completion", "created": created, "model": w.name,
                    "choices": [{"index": 0, "message": {"role": "assistant", "content": f.output.text},
                                 "logprobs": None,
                                 "finish_reason": OPENAI_REASONS.get(f.finish_reason, f.finish_reason)}],
                    "usage": _usage(finals)}

        async def events(first) -> AsyncIterator[str]:
            yield sse(chunk({"role": "assistant", "content": ""}, None))
            item = first
            while True:
                if isinstance(item, Delta):
                    if item.text:
                        yield sse(chunk({"content": item.text}, None))
                elif isinstance(item, Final):
                    if final_error(item) is not None:
                        yield sse(error_event(item.finish_reason, call, item.error))
                        break
                    if item.text:
                        yield sse(chunk({"content": item.text}, None))
                    yield sse(chunk({}, OPENAI_REASONS.get(item.finish_reason, item.finish_reason)))
                    if body.include_usage:
                        yield sse({"id": call.id, "object": "chat.completion.chunk", "created": created,
                                   "model": w.name, "choices": [], "usage": _usage(call.handles)})
                    break
                elif isinstance(item, Interrupted):
                    yield sse(error_event(item.reason, call))
                    break
                item = await call.next_item()
            yield sse("[DONE]")

        return await run_stream(call, events)

    return r
