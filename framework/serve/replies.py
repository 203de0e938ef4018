"""Answering a :class:`~tokenmill.serve.call.GenerationCall`: unary or as Server-Sent Events, and the HTTP
errors of its requests' outcomes."""
from __future__ import annotations

import json
from typing import Any, AsyncIterator, Callable

from starlette.responses import Response, StreamingResponse

from tokenmill.serve.call import ClientGone, GenerationCall
from tokenmill.serve.service import APIError
from tokenmill.serve.items import Final, Interrupted


class EngineStreamResponse(StreamingResponse):
    """A streaming response that always runs ``on_close`` (abort + release), whatever ends the stream:
    the last event, the client going away (Starlette cancels the stream), or an error."""

    def __init__(self, content, on_close: Callable[[], None], **kwargs) -> None:
        headers = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}
        headers.update(kwargs.pop("headers", None) or {})
        super().__init__(content, media_type="text/event-stream", headers=headers, **kwargs)
        self._on_close = on_close

    async def __call__(self, scope, receive, send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            self._on_close()


def final_error(final: Final) -> APIError | ClientGone | None:
    reason = final.finish_reason
    if reason == "error":
        return APIError(500, f"generation failed: {final.error}", code="generation_failed")
    if reason == "shutdown":
        return APIError(503, "the server is shutting down; the request was aborted", code="shutting_down")
    if reason == "timeout":
        return APIError(504, "the request did not finish within the server's request timeout and was aborted",
                        code="timeout")
    if reason in ("cancelled", "abort"):
        return ClientGone()
    return None


def raise_for_finals(finals: list[Final]) -> None:
    for f in finals:
        err = final_error(f)
        if err is not None:
            raise err


def ms(seconds: float | None) -> float | None:
    return None if seconds is None else round(seconds * 1000.0, 3)


async def run_unary(call: GenerationCall) -> list[Final]:
    try:
        await call.start()
        return await call.wait_all()
    except BaseException:
        call.close()
        raise


async def run_stream(call: GenerationCall, events: Callable[[Any], AsyncIterator[str]]) -> Response:
    """Start the call and wait for its first output before answering, so that a request failing or timing
    out before its first token still gets a real status code; then stream."""
    try:
        await call.start()
        first = await call.next_item()
        if isinstance(first, Interrupted):
            call.raise_interrupted()
        if isinstance(first, Final) and len(call.handles) == 1:
            err = final_error(first)
            if err is not None:
                raise err
        call.stop_watching()
    except BaseException:
        call.close()
        raise
    return EngineStreamResponse(events(first), on_close=call.close)


def error_event(reason: str, call: GenerationCall, message: str | None = None) -> dict:
    if reason == "timeout":
        err = APIError(504, f"the request did not finish within the server's request timeout of "
                            f"{call.service.config.request_timeout:g} s and was aborted", code="timeout")
    elif reason == "shutdown":
        err = APIError(503, "the server is shutting down; the request was aborted", code="shutting_down")
    else:
        err = APIError(500, f"generation failed: {message}", code="generation_failed")
    body = err.body()
    body["error"]["status"] = err.status
    return body


def sse(data: Any, event: str | None = None) -> str:
    payload = data if isinstance(data, str) else json.dumps(data, separators=(",", ":"), ensure_ascii=False)
    return (f"event: {event}\n" if event else "") + f"data: {payload}\n\n"
