"""Pure ASGI middleware of the app (streams pass through untouched): HTTP accounting, internal errors and the
request body limit.

:class:`HTTPMetricsMiddleware` counts every HTTP response in ``tokenmill_http_requests_total`` and makes sure
that a generation request answered with a 5xx is counted in ``tokenmill_requests_total`` even when nothing on
its way counted it (a handler bug, a refusal before admission). It is also where an exception that no handler
caught becomes a 500 with the usual error body: answering it here, instead of letting it reach uvicorn, keeps
the kept-alive connection usable (uvicorn closes a connection whose application raised, and a client that
reuses it gets a connection reset).
"""
from __future__ import annotations

import logging

from starlette.responses import JSONResponse

from tokenmill.serve.metrics import (GENERATION_ROUTES, REQUEST_ACCOUNT, RequestAccount, ServeMetrics,
                                     outcome_for_status)
from tokenmill.serve.service import APIError

log = logging.getLogger("tokenmill.serve")


class HTTPMetricsMiddleware:
    """Counts every HTTP response by route template, method and status; 5xx of generation routes that nothing
    counted go to ``tokenmill_requests_total`` (per :func:`outcome_for_status`) under the request's pipeline
    (``default_pipeline`` if it never got that far)."""

    def __init__(self, app, metrics: ServeMetrics, default_pipeline: str) -> None:
        self.app = app
        self.metrics = metrics
        self.default_pipeline = default_pipeline

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        status: list[int | None] = [None]
        account = RequestAccount()
        token = REQUEST_ACCOUNT.set(account)

        async def _send(message) -> None:
            if message["type"] == "http.response.start":
                status[0] = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, _send)
        except Exception as exc:
            if status[0] is not None:  # the response is under way: it cannot become an error any more
                raise
            log.exception("unhandled error in %s %s", scope.get("method"), scope.get("path"))
            err = APIError(500, f"internal error: {type(exc).__name__}: {exc}")
            await JSONResponse(err.body(), status_code=err.status)(scope, receive, _send)
        finally:
            REQUEST_ACCOUNT.reset(token)
            code = status[0] if status[0] is not None else 500
            route = getattr(scope.get("route"), "path", None) or "unmatched"
            self.metrics.http.labels(route, scope.get("method", ""), str(code)).inc()
            if code >= 500 and route in GENERATION_ROUTES and not account.counted:
                self.metrics.requests.labels(account.pipeline or self.default_pipeline,
                                             outcome_for_status(code)).inc(account.prompts)


# a refused body up to this size is still read (and dropped) so the client gets its 413 on a connection that
# stays usable; past it the server answers and closes
DRAIN_LIMIT_BYTES = 64 * 2**20


class BodyLimitMiddleware:
    """Refuses request bodies of more than ``max_bytes`` with 413, before the application reads a byte of them:
    by their ``Content-Length``, or, for chunked bodies, as soon as the bytes received pass the limit."""

    def __init__(self, app, max_bytes: int) -> None:
        if not isinstance(max_bytes, int) or isinstance(max_bytes, bool) or max_bytes < 1:
            raise ValueError(f"max_body_bytes must be a positive number of bytes, got {max_bytes!r}")
        self.app = app
        self.max_bytes = max_bytes

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        headers = dict(scope.get("headers") or ())
        declared = headers.get(b"content-length")
        if declared is not None:
            size = int(declared) if declared.isdigit() else -1  # the server rejects malformed lengths itself
            if size > self.max_bytes:
                await self._refuse(scope, receive, send, f"is {size} bytes", done=False)
                return
            await self.app(scope, receive, send)
            return
        if b"chunked" not in headers.get(b"transfer-encoding", b"").lower():
            await self.app(scope, receive, send)
            return
        messages, size = [], 0  # a chunked body: read it here, counting, then hand it on
        while True:
            message = await receive()
            messages.append(message)
            if message["type"] != "http.request":
                break
            size += len(message.get("body", b""))
            if size > self.max_bytes:
                await self._refuse(scope, receive, send, f"has more than {self.max_bytes} bytes",
                                   done=not message.get("more_body", False))
                return
            if not message.get("more_body", False):
                break

        async def replay():
            return messages.pop(0) if messages else await receive()

        await self.app(scope, replay, send)

    async def _refuse(self, scope, receive, send, what: str, *, done: bool) -> None:
        drained = 0
        while not done and drained <= DRAIN_LIMIT_BYTES:
            message = await receive()
            if message["type"] != "http.request":
                break
            drained += len(message.get("body", b""))
            done = not message.get("more_body", False)
        err = APIError(413, f"the request body {what}, more than this server accepts ({self.max_bytes} bytes, "
                            f"--max-body-bytes / ServeConfig.max_body_bytes)", code="body_too_large")
        await JSONResponse(err.body(), status_code=413,
                           headers=None if done else {"Connection": "close"})(scope, receive, send)
