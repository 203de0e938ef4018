"""The native routes: ``POST /v1/generate`` (one prompt, streaming or not) and ``POST /v1/generate/batch``
(several prompts submitted together, so they batch). Bodies are in ``schemas.py``."""
from __future__ import annotations

import asyncio
import time
from typing import AsyncIterator

from fastapi import APIRouter, Request

from tokenmill.serve.call import GenerationCall
from tokenmill.serve.logprob_format import final_logprobs, native_logprobs, token_texts
from tokenmill.serve.replies import error_event, final_error, ms, raise_for_finals, run_stream, run_unary, sse
from tokenmill.serve.responses import streams
from tokenmill.serve.sampling_fields import check_support
from tokenmill.serve.schemas import BatchRequest, BatchResponse, GenerateRequest, GenerateResponse
from tokenmill.serve.service import Service
from tokenmill.serve.items import Delta, Final, Interrupted


def native_result(final: Final, pipeline: str, texts=None) -> dict:
    """The native answer of one prompt; with ``texts`` (:class:`~tokenmill.serve.logprob_format.TokenTexts`),
    its tokens' logprobs."""
    h, out = final.handle, final.output
    logprobs = None if texts is None or out.logprobs is None else native_logprobs(texts, out.logprobs)
    return {
        "request_id": h.request_id, "text": out.text, "tokens_generated": len(out.token_ids),
        "prompt_tokens": h.prompt_tokens, "finish_reason": final.finish_reason,
        "latency_ms": ms(h.finished - h.received),
        "ttft_ms": ms(None if h.first_token is None else h.first_token - h.received),
        "queue_ms": ms(None if out.queue_s is None or h.submitted is None else h.submitted - h.received + out.queue_s),
        "optimization_used": pipeline, "error": final.error, "cached_tokens": out.num_cached_tokens,
        "logprobs": logprobs,
    }


def router(service: Service) -> APIRouter:
    r = APIRouter(tags=["native"])

    def accepted(body: GenerateRequest | BatchRequest):
        """The arrival time, the worker and the sampling params of a body the chosen pipeline can serve."""
        received = time.perf_counter()
        w = service.worker(body.optimization)
        service.check_ready(w)
        params = body.sampling_params()
        service.check_max_tokens(w, params)
        check_support(service, w, params, body)
        return received, w, params

    @r.post("/v1/generate", response_model=GenerateResponse, responses=streams("text chunks, then a `done` event"),
            summary="Generate from one prompt (Server-Sent Events with stream: true)")
    async def generate(body: GenerateRequest, request: Request):
        received, w, params = accepted(body)
        call = GenerationCall(service, w, request, [body.prompt], params, received=received, stream=body.stream,
                              chat=body.chat, prefix="gen", fields=body.engine_fields())
        texts = token_texts(w) if params.logprobs is not None else None
        if not body.stream:
            finals = await run_unary(call)
            raise_for_finals(finals)
            if texts is None:
                return native_result(finals[0], w.name)
            return await asyncio.to_thread(native_result, finals[0], w.name, texts)  # many tokens to decode

        def piece(item, lps) -> dict:
            out = {"request_id": item.handle.request_id, "text": item.text, "tokens": item.num_tokens}
            if texts is not None:
                out["logprobs"] = native_logprobs(texts, lps or [])
            return out

        async def events(first) -> AsyncIterator[str]:
            item = first
            while True:
                if isinstance(item, Delta):
                    yield sse(piece(item, item.logprobs))
                elif isinstance(item, Final):
                    if item.text or item.num_tokens:
                        yield sse(piece(item, final_logprobs(item)))
                    if final_error(item) is not None:
                        yield sse(error_event(item.finish_reason, call, item.error), event="error")
                    else:
                        yield sse(native_result(item, w.name, texts), event="done")
                    return
                elif isinstance(item, Interrupted):
                    yield sse(error_event(item.reason, call), event="error")
                    return
                item = await call.next_item()

        return await run_stream(call, events)

    @r.post("/v1/generate/batch", response_model=BatchResponse,
            summary="Generate from several prompts submitted together, so they batch")
    async def generate_batch(body: BatchRequest, request: Request):
        received, w, params = accepted(body)
        call = GenerationCall(service, w, request, list(body.prompts), params, received=received,
                              chat=body.chat, prefix="batch", fields=body.engine_fields())
        finals = await run_unary(call)
        for f in finals:  # a failed prompt is reported in its result; aborts end the whole call
            if f.finish_reason != "error" and final_error(f) is not None:
                raise final_error(f)
        texts = token_texts(w) if params.logprobs is not None else None
        results = [native_result(f, w.name) for f in finals] if texts is None else \
            await asyncio.to_thread(lambda: [native_result(f, w.name, texts) for f in finals])
        total = max(f.handle.finished for f in finals) - received
        tokens = sum(r["tokens_generated"] for r in results)
        return {"results": results, "total_latency_ms": ms(total),
                "throughput_tokens_per_sec": round(tokens / total, 3) if total > 0 else 0.0,
                "tokens_generated": tokens, "prompt_tokens": sum(r["prompt_tokens"] for r in results),
                "optimization_used": w.name}

    return r
