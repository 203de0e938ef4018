"""Running the app under uvicorn, with a graceful drain on SIGTERM / SIGINT.

On the first SIGTERM (or Ctrl+C) the server stops admitting requests (new ones get 503 and ``/ready``
turns 503), lets the requests in flight finish for up to ``drain_timeout`` seconds, aborts whatever is
left, then shuts uvicorn down (and the engine threads with it). A second signal exits at once.

Every accepted connection gets ``TCP_NODELAY``. asyncio sets it only on sockets whose ``proto`` is
``IPPROTO_TCP``, and a listening socket made with ``socket.socket(AF_INET, SOCK_STREAM)`` (proto 0) passes
proto 0 on to its connections: a response's headers and body then go out as two small writes, and on a
kept-alive connection the second waits for the client's delayed ACK (~40 ms per request).
"""
from __future__ import annotations

import asyncio
import logging
import socket
from typing import Any

import uvicorn

from tokenmill.serve.app import create_app
from tokenmill.serve.service import ServeConfig

log = logging.getLogger("tokenmill.serve")


def set_nodelay(transport: asyncio.BaseTransport) -> None:
    """Turn Nagle's algorithm off on a TCP connection (a no-op for other transports)."""
    sock = transport.get_extra_info("socket")
    if sock is not None and sock.family in (socket.AF_INET, socket.AF_INET6) and sock.type == socket.SOCK_STREAM:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)


def nodelay_protocol(protocol_class: type) -> type:
    """``protocol_class`` (a uvicorn HTTP protocol), setting TCP_NODELAY on each connection it is given."""
    if getattr(protocol_class, "sets_nodelay", False):
        return protocol_class

    class NoDelayProtocol(protocol_class):
        sets_nodelay = True

        def connection_made(self, transport) -> None:
            set_nodelay(transport)
            super().connection_made(transport)

    NoDelayProtocol.__name__ = NoDelayProtocol.__qualname__ = f"NoDelay{protocol_class.__name__}"
    return NoDelayProtocol


class DrainingServer(uvicorn.Server):
    """uvicorn's server, with the first exit signal turned into a drain of the tokenmill service."""

    def __init__(self, config: uvicorn.Config, service, *, exit_on_load_failure: bool = False) -> None:
        super().__init__(config)
        self.service = service
        self.exit_on_load_failure = exit_on_load_failure
        self.load_failed = False
        self._drain_requested = False
        self._drain_task: asyncio.Task | None = None
        self.drain_report: dict | None = None

    async def startup(self, sockets: list[socket.socket] | None = None) -> None:
        if not self.config.loaded:
            self.config.load()
        self.config.http_protocol_class = nodelay_protocol(self.config.http_protocol_class)
        await super().startup(sockets)

    def handle_exit(self, sig: int, frame: Any) -> None:  # called from the signal handler
        if self._drain_requested:  # a second signal: stop now
            self.should_exit = True
            self.force_exit = True
            return
        self._drain_requested = True
        self.service.draining = True  # from now on new requests get 503; on_tick starts the drain

    def request_drain(self) -> None:
        """Start a drain as SIGTERM would (usable from another thread, e.g. a test)."""
        self.service.draining = True
        self._drain_requested = True

    async def on_tick(self, counter: int) -> bool:
        if self.exit_on_load_failure and not self.load_failed:
            failed = {n: w.error for n, w in self.service.workers.items() if w.state == "failed"}
            if failed:
                log.error("pipeline(s) failed, exiting: %s", failed)
                self.load_failed = True
                self.should_exit = True
        if self._drain_requested and self._drain_task is None and not self.should_exit:
            self._drain_task = asyncio.create_task(self._drain())
        return await super().on_tick(counter)

    async def _drain(self) -> None:
        try:
            self.drain_report = await self.service.drain()
            log.info("drained: %s", self.drain_report)
        finally:
            self.should_exit = True


def build_server(pipelines: Any, *, host: str = "127.0.0.1", port: int = 8000, config: ServeConfig | None = None,
                 log_level: str = "info", access_log: bool = True, exit_on_load_failure: bool = False,
                 **options: Any) -> DrainingServer:
    app = create_app(pipelines, config, **options)
    ucfg = uvicorn.Config(app, host=host, port=port, log_level=log_level, access_log=access_log,
                          timeout_graceful_shutdown=10, lifespan="on")
    return DrainingServer(ucfg, app.state.service, exit_on_load_failure=exit_on_load_failure)


def serve(pipelines: Any, *, host: str = "127.0.0.1", port: int = 8000, sock: socket.socket | None = None,
          **kwargs: Any) -> DrainingServer:
    """Run the service in this thread until it is stopped (SIGTERM / SIGINT drain, then exit)."""
    server = build_server(pipelines, host=host, port=port, **kwargs)
    server.run(sockets=[sock] if sock is not None else None)
    return server
