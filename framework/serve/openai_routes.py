"""OpenAI-compatible routes: ``GET /v1/models[/{id}]``, ``POST /v1/completions``, ``POST /v1/chat/completions``.

The ``model`` field names a pipeline (its YAML ``name:``). Responses follow OpenAI's shapes, with ``usage``;
streams are Server-Sent Events ending in ``data: [DONE]``, so the ``openai`` Python client works unchanged
with ``base_url="http://host:port/v1"``. ``n`` choices per prompt (``index`` = prompt * n + copy), ``logprobs``,
structured output (``structured.py``) and, on chat, tool calls (``tools.py``).
"""
from __future__ import annotations

import asyncio
import time
from typing import AsyncIterator

from fastapi import APIRouter, Request

from tokenmill.serve.call import GenerationCall
from tokenmill.serve.logprob_format import CompletionLogprobs, chat_logprobs, final_logprobs, token_texts
from tokenmill.serve.openai_schemas import ChatCompletionRequest, CompletionRequest
from tokenmill.serve.replies import error_event, final_error, raise_for_finals, run_stream, run_unary, sse
from tokenmill.serve.responses import (GENERATION_ERRORS, ChatCompletionResponse, CompletionResponse, ModelCard,
                                       ModelList, errors, streams)
from tokenmill.serve.sampling_fields import check_support
from tokenmill.serve.service import APIError, Service
from tokenmill.serve.tools import encode_chat, parse_call
from tokenmill.serve.items import Delta, Final, Interrupted

OPENAI_REASONS = {"stop": "stop", "length": "length"}


def _reason(final: Final) -> str:
    return OPENAI_REASONS.get(final.finish_reason, final.finish_reason)


def _usage(finals: list[Final], n: int) -> dict:
    """OpenAI's usage: each prompt counted once (its n copies share it, as OpenAI bills), the tokens of every
    choice; ``cached_tokens``: the tokens of those prompts that the prefix cache supplied."""
    firsts = [f for f in finals if f.handle.index % n == 0]
    prompt = sum(f.handle.prompt_tokens for f in firsts)
    completion = sum(len(f.output.token_ids) for f in finals)
    return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion,
            "prompt_tokens_details": {"cached_tokens": sum(f.output.num_cached_tokens for f in firsts)}}


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

    def _prepare(body, default_max_tokens: int | None, num_prompts: int):
        w = service.worker(body.model, openai=True)
        service.check_ready(w)
        params, fill = body.sampling_params(default_max_tokens)
        if not fill:
            service.check_max_tokens(w, params, body.max_tokens_param)
        check_support(service, w, params, body)
        room = w.limits.max_num_seqs + service.config.max_queued_requests
        if body.copies * num_prompts > room:
            service.count(w, "invalid")
            prompts = f" x {num_prompts} prompts" if num_prompts > 1 else ""
            raise APIError(400, f"n = {body.copies}{prompts} makes {body.copies * num_prompts} requests, more than "
                                f"pipeline '{w.name}' ever admits at once ({w.limits.max_num_seqs} batch slots + "
                                f"--max-queued-requests={service.config.max_queued_requests}); lower n", param="n")
        return w, params, fill

    @r.post("/v1/completions", response_model=CompletionResponse, summary="OpenAI-compatible text completion",
            responses={**streams("text_completion chunks"), **errors(*GENERATION_ERRORS, 404)})
    async def completions(body: CompletionRequest, request: Request):
        received = time.perf_counter()
        prompts = body.prompts()
        w, params, fill = _prepare(body, 16, len(prompts))
        call = GenerationCall(service, w, request, prompts, params, received=received, stream=bool(body.stream),
                              fill_max_tokens=fill, prefix="cmpl", n=body.copies, fields=body.engine_fields())
        created = int(time.time())
        texts = token_texts(w) if params.logprobs is not None else None

        def chunk(index: int, text: str, reason: str | None, logprobs: dict | None) -> dict:
            return {"id": call.id, "object": "text_completion", "created": created, "model": w.name,
                    "choices": [{"index": index, "text": text, "logprobs": logprobs, "finish_reason": reason}]}

        if not body.stream:
            finals = await run_unary(call)
            raise_for_finals(finals)
            lps = [None] * len(finals)
            if texts is not None:  # off the event loop: a long answer has many tokens to decode
                lps = await asyncio.to_thread(lambda: [CompletionLogprobs(texts).add(f.output.logprobs)
                                                       for f in finals])
            return {"id": call.id, "object": "text_completion", "created": created, "model": w.name,
                    "choices": [{"index": f.handle.index, "text": f.output.text, "logprobs": lp,
                                 "finish_reason": _reason(f)} for f, lp in zip(finals, lps)],
                    "usage": _usage(finals, call.n)}

        states = {h.index: CompletionLogprobs(texts) for h in call.handles} if texts is not None else {}

        def logprobs(index: int, lps) -> dict | None:
            return states[index].add(lps or []) if states else None

        async def events(first) -> AsyncIterator[str]:
            item = first
            while True:
                if isinstance(item, Delta):
                    yield sse(chunk(item.handle.index, item.text, None, logprobs(item.handle.index, item.logprobs)))
                elif isinstance(item, Final):
                    if final_error(item) is not None:
                        yield sse(error_event(item.finish_reason, call, item.error))
                        break
                    yield sse(chunk(item.handle.index, item.text, _reason(item),
                                    logprobs(item.handle.index, final_logprobs(item))))
                    if call.finished:
                        if body.include_usage:
                            yield sse({"id": call.id, "object": "text_completion", "created": created,
                                       "model": w.name, "choices": [],
                                       "usage": _usage(list(call.finals.values()), call.n)})
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
        w, params, fill = _prepare(body, None, 1)
        tools, offered = body.call_tools(), body.template_tools()
        call = GenerationCall(service, w, request, [body.template_messages()], params, received=received,
                              stream=bool(body.stream), fill_max_tokens=fill, prefix="chatcmpl", n=body.copies,
                              encode=lambda pipe, messages, chat: encode_chat(pipe, messages, offered),
                              fields=body.engine_fields())
        created = int(time.time())
        texts = token_texts(w) if params.logprobs is not None else None

        def chunk(index: int, delta: dict, reason: str | None, lps=None) -> dict:
            return {"id": call.id, "object": "chat.completion.chunk", "created": created, "model": w.name,
                    "choices": [{"index": index, "delta": delta, "finish_reason": reason,
                                 "logprobs": None if texts is None or lps is None else chat_logprobs(texts, lps)}]}

        def answer(f: Final) -> tuple[dict, str]:
            """The assistant message of a choice and its finish reason."""
            called = parse_call(f.output.text, tools) if tools is not None else None
            if called is not None:
                return {"role": "assistant", "content": None, "tool_calls": [called]}, "tool_calls"
            return {"role": "assistant", "content": f.output.text}, _reason(f)

        if not body.stream:
            finals = await run_unary(call)
            raise_for_finals(finals)
            lps = [None] * len(finals)
            if texts is not None:
                lps = await asyncio.to_thread(lambda: [chat_logprobs(texts, f.output.logprobs) for f in finals])
            choices = []
            for f, lp in zip(finals, lps):
                message, reason = answer(f)
                choices.append({"index": f.handle.index, "message": message, "logprobs": lp, "finish_reason": reason})
            return {"id": call.id, "object": "chat.completion", "created": created, "model": w.name,
                    "choices": choices, "usage": _usage(finals, call.n)}

        async def events(first) -> AsyncIterator[str]:
            for h in call.handles:
                yield sse(chunk(h.index, {"role": "assistant", "content": ""}, None))
            item = first
            while True:
                if isinstance(item, Delta):
                    if tools is None and (item.text or item.logprobs):  # a tool call is sent whole, at the end
                        yield sse(chunk(item.handle.index, {"content": item.text}, None, item.logprobs))
                elif isinstance(item, Final):
                    if final_error(item) is not None:
                        yield sse(error_event(item.finish_reason, call, item.error))
                        break
                    i = item.handle.index
                    message, reason = answer(item)
                    if "tool_calls" in message:
                        yield sse(chunk(i, {"tool_calls": [dict(message["tool_calls"][0], index=0)]}, None,
                                        item.output.logprobs))
                    elif tools is not None:  # not a whole call (cut short): its text
                        yield sse(chunk(i, {"content": item.output.text}, None, item.output.logprobs))
                    elif item.text or final_logprobs(item):
                        yield sse(chunk(i, {"content": item.text}, None, final_logprobs(item)))
                    yield sse(chunk(i, {}, reason))
                    if call.finished:
                        if body.include_usage:
                            yield sse({"id": call.id, "object": "chat.completion.chunk", "created": created,
                                       "model": w.name, "choices": [],
                                       "usage": _usage(list(call.finals.values()), call.n)})
                        break
                elif isinstance(item, Interrupted):
                    yield sse(error_event(item.reason, call))
                    break
                item = await call.next_item()
            yield sse("[DONE]")

        return await run_stream(call, events)

    return r
