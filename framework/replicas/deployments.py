"""The two Ray Serve deployments: ``Ingress`` (HTTP in, one replica) and ``EngineReplica`` (N replicas, each the
whole single-process tokenmill service over its own copy of the pipelines).

The ingress reads each request, computes its prefix keys and hands it to an engine replica through a
deployment handle whose router is :class:`~tokenmill.replicas.router.PrefixRouter`. The replica runs it
through the ordinary FastAPI app (``forward.py``) and streams the response back, with an
``x-tokenmill-replica`` header naming itself (and
``x-tokenmill-replica-pid``). A replica that dies takes only its in-flight requests with it:
those get a 503 ``replica_failed`` error (or, once a stream has started, a final ``error`` event); the
router stops sending to it, and Ray Serve starts a replacement.
"""
import asyncio
import contextlib
import json
import logging
import os
from typing import Any, AsyncIterator

from fastapi import FastAPI, Request
from ray import serve
from ray.exceptions import ActorUnavailableError, RayActorError
from ray.serve.config import RequestRouterConfig
from starlette.responses import Response, StreamingResponse

from tokenmill.replicas.forward import ForwardedRequest, ResponseStart, run_asgi
from tokenmill.replicas.prefix import prefix_keys
from tokenmill.serve.service import APIError, ServeConfig

log = logging.getLogger("tokenmill.replicas")
REPLICA_HEADER = b"x-tokenmill-replica"
PID_HEADER = b"x-tokenmill-replica-pid"  # as Ray's logs name the replica's process
REPLICA_ERRORS = (RayActorError, ActorUnavailableError)
HOP_HEADERS = {b"content-length", b"transfer-encoding", b"connection"}


def _error_body(message: str, status: int = 503, code: str = "replica_failed") -> bytes:
    return json.dumps(APIError(status, message, code=code).body()).encode()


class EngineReplica:
    """One replica: builds the pipelines from their YAML files and serves forwarded requests."""

    async def __init__(self, paths: list[str], config: ServeConfig) -> None:
        from tokenmill.pipeline import Pipeline
        from tokenmill.serve.app import create_app
        from tokenmill.spec import load_spec

        specs = [load_spec(p) for p in paths]
        self.app = create_app([(s.name, lambda s=s: Pipeline(s, progress=False)) for s in specs],
                              config)
        self.service = self.app.state.service
        self._life = contextlib.AsyncExitStack()
        await self._life.enter_async_context(self.app.router.lifespan_context(self.app))
        for w in self.service.workers.values():
            await asyncio.to_thread(w.ready.wait)
        failed = {n: w.error for n, w in self.service.workers.items() if w.state == "failed"}
        if failed:  # Ray Serve reports the failed start and tries a new replica
            await self._life.aclose()
            raise RuntimeError(f"pipeline(s) failed to load: {failed}")
        self.replica_id = serve.get_replica_context().replica_id.unique_id
        self.header = [(REPLICA_HEADER, self.replica_id.encode()), (PID_HEADER, str(os.getpid()).encode())]

    async def forward(self, req: ForwardedRequest) -> AsyncIterator[Any]:
        async for item in run_asgi(self.app, req, extra_headers=self.header):
            yield item

    def check_health(self) -> None:
        """Ray Serve's probe: a failed pipeline (e.g. a dead tensor-parallel rank) gets this replica replaced."""
        bad = {n: w.error or w.state for n, w in self.service.workers.items()
               if w.state == "failed" or not w.alive}
        if bad and not self.service.draining:
            raise RuntimeError(f"pipeline(s) not serving: {bad}")

    async def __del__(self) -> None:  # Ray Serve's graceful stop: drain, then stop the engine threads
        with contextlib.suppress(Exception):
            await self.service.drain()
            await self._life.aclose()


ingress_app = FastAPI(title="tokenmill (Ray Serve ingress)", docs_url=None, redoc_url=None, openapi_url=None)
METHODS = ["GET", "POST", "PUT", "DELETE", "PATCH", "HEAD", "OPTIONS"]


@serve.ingress(ingress_app)
class Ingress:
    """Every path is forwarded: the engine replicas' app answers (docs, OpenAPI and 404s included)."""

    def __init__(self, engine: Any, max_body_bytes: int) -> None:
        self.engine = engine
        self.max_body_bytes = max_body_bytes

    async def _read(self, request: Request) -> bytes | None:
        body = bytearray()
        async for chunk in request.stream():
            body += chunk
            if len(body) > self.max_body_bytes:
                return None
        return bytes(body)

    @ingress_app.api_route("/{path:path}", methods=METHODS, include_in_schema=False)
    async def forward(self, path: str, request: Request) -> Response:
        body = await self._read(request)
        if body is None:
            return Response(_error_body(f"the request body is larger than {self.max_body_bytes} bytes",
                                        413, "body_too_large"), 413, media_type="application/json")
        client = request.client
        req = ForwardedRequest(request.method, request.url.path, request.url.query.encode(),
                               list(request.headers.raw), body, (client.host, client.port) if client else None,
                               prefix_keys(body if request.method == "POST" else b""))
        stream = self.engine.options(stream=True).forward.remote(req)
        try:
            start = await stream.__anext__()
        except REPLICA_ERRORS as exc:
            log.warning("replica failed before answering %s %s: %s", request.method, path, exc)
            return Response(_error_body(f"the engine replica serving this request failed before it answered "
                                        f"({type(exc).__name__}); the request was not completed, retry it"),
                            503, headers={"Retry-After": "1"}, media_type="application/json")
        assert isinstance(start, ResponseStart), start
        headers = {k.decode("latin-1"): v.decode("latin-1") for k, v in start.headers if k.lower() not in HOP_HEADERS}
        sse = headers.get("content-type", "").startswith("text/event-stream")
        return StreamingResponse(self._rest(stream, sse), start.status, headers=headers)

    async def _rest(self, stream: Any, sse: bool) -> AsyncIterator[bytes]:
        try:
            async for chunk in stream:
                yield chunk
        except REPLICA_ERRORS as exc:
            log.warning("replica failed mid-response: %s", exc)
            if sse:  # the status line is gone: end the stream with an error event the clients raise on
                yield b"data: " + _error_body(f"the engine replica serving this stream failed "
                                              f"({type(exc).__name__}); the response is incomplete") + b"\n\n"
        finally:
            stream.cancel()  # the client left (or we are done): the replica sees a disconnect and aborts


def build_app(paths: list[str], *, replicas: int, replica_cpus: float, config: ServeConfig,
              max_ongoing_requests: int = 1024) -> Any:
    """The Ray Serve application: one ingress over ``replicas`` engine replicas of the pipelines in ``paths``."""
    drain = config.drain_timeout
    engine = serve.deployment(
        EngineReplica, name="engine", num_replicas=replicas, ray_actor_options={"num_cpus": replica_cpus},
        max_ongoing_requests=max_ongoing_requests, health_check_period_s=2.0, health_check_timeout_s=30.0,
        graceful_shutdown_timeout_s=drain + 10.0, graceful_shutdown_wait_loop_s=0.5,
        request_router_config=RequestRouterConfig(request_router_class="tokenmill.replicas.router:PrefixRouter"),
    ).bind(paths, config)
    ingress = serve.deployment(Ingress, name="ingress", num_replicas=1, ray_actor_options={"num_cpus": 0},
                               max_ongoing_requests=max_ongoing_requests * max(1, replicas))
    return ingress.bind(engine, config.max_body_bytes)
