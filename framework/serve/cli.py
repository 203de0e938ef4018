"""``tokenmill serve``: check the pipeline files, bind, load the models on their engine threads, serve."""
from __future__ import annotations

import logging
import socket
import sys

from tokenmill.errors import PipelineError


def _bind(host: str, port: int) -> socket.socket:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM, socket.IPPROTO_TCP)  # proto TCP: asyncio sets TCP_NODELAY
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError as exc:
        sock.close()
        raise OSError(f"cannot listen on {host}:{port}: {exc.strerror or exc}") from None
    sock.set_inheritable(True)
    return sock


def serve_config(*, api_key: str | None, max_queued_requests: int, request_timeout: float, drain_timeout: float,
                 max_body_bytes: int = 16 * 2**20):
    """The service's settings from the command line's options, checked (``request_timeout`` 0: none)."""
    from tokenmill.serve.service import ServeConfig

    if max_queued_requests < 0:
        raise ValueError(f"--max-queued-requests must be >= 0, got {max_queued_requests}")
    if request_timeout < 0 or drain_timeout < 0:
        raise ValueError("--request-timeout and --drain-timeout must be >= 0")
    if max_body_bytes < 1:
        raise ValueError(f"--max-body-bytes must be at least 1, got {max_body_bytes}")
    return ServeConfig(api_key=api_key, max_queued_requests=max_queued_requests,
                       request_timeout=request_timeout or None, drain_timeout=drain_timeout,
                       max_body_bytes=max_body_bytes)


def load_specs(paths: list[str]) -> list:
    """Every pipeline file checked before anything loads or binds; names must be unique."""
    from tokenmill.spec import load_spec

    specs = [load_spec(p) for p in paths]
    seen: dict[str, str] = {}
    for path, spec in zip(paths, specs):
        if spec.name in seen:
            raise PipelineError(f"pipeline name '{spec.name}' is used by {seen[spec.name]} and {path}; "
                                "requests pick a pipeline by name, so give each a unique `name:`")
        seen[spec.name] = path
    return specs


def run_serve(paths: list[str], *, host: str, port: int, config, log_level: str = "info",
              progress: bool = True) -> int:
    from tokenmill.pipeline import Pipeline
    from tokenmill.serve.server import serve

    specs = load_specs(paths)
    pipelines = [(spec.name, lambda spec=spec: Pipeline(spec, progress=progress)) for spec in specs]
    logging.basicConfig(level=log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    sock = _bind(host, port)
    names = ", ".join(spec.name for spec in specs)
    print(f"[tokenmill] serving {names} on http://{host}:{port} (loading; GET /ready answers 200 when warm)",
          file=sys.stderr)
    server = serve(pipelines, host=host, port=port, sock=sock, config=config, log_level=log_level,
                   exit_on_load_failure=True)
    return 1 if server.load_failed else 0
