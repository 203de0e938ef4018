"""One HTTP request, forwarded from the ingress, run through the ordinary tokenmill app in this process.

The ingress reads the request (method, path, headers, body) and hands it to a replica; the replica
calls its FastAPI app as uvicorn would (an ASGI ``http`` scope) and streams back what the app sends:
first the status and headers, then the body chunks. Every route, error and metric is the single-process
service's own. When the consumer stops reading (the client went away, or the ingress cancelled), the app
is told the client disconnected, so the engine aborts the request and frees its KV blocks.
"""
from __future__ import annotations

import asyncio
from dataclasses import dataclass, field
from typing import Any, AsyncIterator

from tokenmill.replicas.prefix import PrefixKeys


@dataclass(slots=True)
class ForwardedRequest:
    method: str
    path: str
    query: bytes
    headers: list[tuple[bytes, bytes]]
    body: bytes
    client: tuple[str, int] | None = None
    prefix: PrefixKeys = field(default_factory=lambda: PrefixKeys((), 0))  # read by the router


@dataclass(slots=True)
class ResponseStart:
    status: int
    headers: list[tuple[bytes, bytes]]


async def run_asgi(app: Any, req: ForwardedRequest, *, extra_headers: list[tuple[bytes, bytes]] = ()
                   ) -> AsyncIterator[ResponseStart | bytes]:
    """Yield the app's response to ``req``: one :class:`ResponseStart`, then non-empty body chunks."""
    scope = {"type": "http", "asgi": {"version": "3.0", "spec_version": "2.3"}, "http_version": "1.1",
             "method": req.method, "scheme": "http", "path": req.path, "raw_path": req.path.encode(),
             "query_string": req.query, "root_path": "", "headers": list(req.headers),
             "client": req.client, "server": ("ray-serve", 0)}
    out: asyncio.Queue = asyncio.Queue()
    gone = asyncio.Event()
    sent_body = False

    async def receive() -> dict:
        nonlocal sent_body
        if not sent_body:
            sent_body = True
            return {"type": "http.request", "body": req.body, "more_body": False}
        await gone.wait()
        return {"type": "http.disconnect"}

    async def send(message: dict) -> None:
        await out.put(message)

    async def call() -> None:
        try:
            await app(scope, receive, send)
        finally:
            await out.put(None)

    task = asyncio.create_task(call())
    try:
        while (msg := await out.get()) is not None:
            if msg["type"] == "http.response.start":
                yield ResponseStart(msg["status"], list(msg.get("headers", [])) + list(extra_headers))
            elif msg["type"] == "http.response.body":
                if msg.get("body"):
                    yield bytes(msg["body"])
                if not msg.get("more_body", False):
                    break
        await task
    finally:
        gone.set()  # the consumer left early: the app sees a disconnect and aborts the request
        if not task.done():
            try:
                await asyncio.wait_for(task, 10.0)
            except (asyncio.TimeoutError, asyncio.CancelledError, Exception):
                task.cancel()
