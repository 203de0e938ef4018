"""Helpers for the service tests: a real uvicorn server on 127.0.0.1 (free port, background thread), inline
plugins, SSE and Prometheus parsing. Import this module as ``tests.serve.helpers`` everywhere, so that the plugin
classes (whose class attributes tests set) exist once."""
from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import httpx
import pytest

from tests.conftest import tiny_pipeline_dict
from tokenmill import Pipeline, Plugin, hookimpl
from tokenmill.host import PluginEntry, discover_plugins

PAGED = ["continuous_batching", {"paged_kv": {"block_size": 8, "num_blocks": 512, "prefix_caching": True}}]


def wait_until(predicate: Callable[[], object], timeout: float = 30.0, interval: float = 0.02, what: str = ""):
    """Bounded polling: the predicate's first truthy value, or a failure after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            pytest.fail(f"timed out after {timeout} s waiting for {what or predicate}")
        time.sleep(interval)


class Poisoned(Plugin):
    """verify_tokens raises whenever a sequence whose first prompt token is ``poison`` is in the batch."""

    name = "poisoned"
    poison: int | None = None

    @hookimpl
    def verify_tokens(self, batch):
        if any(s.prompt_token_ids[0] == Poisoned.poison for s in batch.seqs):
            raise RuntimeError("injected failure")
        return None


class Slow(Plugin):
    """Sleeps ``delay`` seconds at the end of every engine step (makes requests reliably long)."""

    name = "slow"
    delay = 0.0

    @hookimpl
    def step_end(self, stats):
        if Slow.delay:
            time.sleep(Slow.delay)


def build_with_plugins(model_dir, **extra) -> Pipeline:
    catalog = discover_plugins()
    for cls in (Poisoned, Slow):
        catalog[cls.name] = PluginEntry(cls.name, f"{cls.__module__}:{cls.__name__}", "tests")
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr("tokenmill.spec.discover_plugins", lambda: catalog)
        mp.setattr("tokenmill.host.discover_plugins", lambda: catalog)
        return Pipeline.from_dict(tiny_pipeline_dict(model_dir, **extra), progress=False)


@dataclass
class Running:
    server: object
    thread: threading.Thread
    port: int
    app: object

    @property
    def base(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def service(self):
        return self.app.state.service

    def client(self, **kw) -> httpx.Client:
        return httpx.Client(base_url=self.base, timeout=kw.pop("timeout", 60.0), **kw)

    def stop(self, timeout: float = 30.0) -> None:
        self.server.should_exit = True
        self.thread.join(timeout)
        assert not self.thread.is_alive(), "the server thread did not stop"


def start_server(pipelines, *, wait_ready: bool = True, **options) -> Running:
    import uvicorn

    from tokenmill.serve import create_app
    from tokenmill.serve.server import DrainingServer

    app = create_app(pipelines, **options)
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    config = uvicorn.Config(app, log_level="warning", lifespan="on", timeout_graceful_shutdown=5)
    server = DrainingServer(config, app.state.service)
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, name="uvicorn-test", daemon=True)
    thread.start()
    run = Running(server, thread, port, app)

    def ready():
        try:
            return httpx.get(run.base + "/ready", timeout=5).status_code == 200
        except httpx.TransportError:
            return False

    def up():
        try:
            return httpx.get(run.base + "/health", timeout=5).status_code in (200, 503)
        except httpx.TransportError:
            return False

    wait_until(ready if wait_ready else up, timeout=60, what="GET /ready == 200" if wait_ready else "GET /health")
    return run


def sse_events(lines) -> list[tuple[str, object]]:
    """(event, data) pairs from SSE lines; data is JSON-decoded unless it is [DONE]."""
    out, event = [], "message"
    for line in lines:
        if line.startswith("event:"):
            event = line.split(":", 1)[1].strip()
        elif line.startswith("data:"):
            raw = line.split(":", 1)[1].strip()
            out.append((event, raw if raw == "[DONE]" else json.loads(raw)))
            event = "message"
    return out


def metric(text: str, name: str, **labels) -> float:
    """The value of one sample in Prometheus text format (0 when absent)."""
    for line in text.splitlines():
        if not line.startswith(name) or line.startswith("#"):
            continue
        head, _, value = line.rpartition(" ")
        sample, _, rest = head.partition("{")
        if sample != name:
            continue
        got = dict(kv.split("=", 1) for kv in rest.rstrip("}").split(",") if kv) if rest else {}
        got = {k: v.strip('"') for k, v in got.items()}
        if all(got.get(k) == str(v) for k, v in labels.items()):
            return float(value)
    return 0.0


def cli_server(yaml: Path, *args: str, timeout: float = 90) -> tuple[subprocess.Popen, str]:
    """``tokenmill serve YAML`` in a subprocess on a free port (output captured, text), once ``/ready`` answers
    200; the process and its base URL. The caller kills it if it is still running."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    proc = subprocess.Popen([sys.executable, "-m", "tokenmill", "serve", str(yaml), "--port", str(port), "--quiet",
                             "--log-level", "warning", *args], stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            env=dict(os.environ, TOKENMILL_API_KEY="", PYTHONUNBUFFERED="1"), text=True,
                            cwd=Path(__file__).resolve().parents[2])
    base = f"http://127.0.0.1:{port}"

    def ready():
        assert proc.poll() is None, proc.stdout.read()
        try:
            return httpx.get(base + "/ready", timeout=2).status_code == 200
        except httpx.TransportError:
            return False

    try:
        wait_until(ready, timeout=timeout, interval=0.1, what=f"the CLI server of {yaml} to be ready")
    except BaseException:
        proc.kill()
        proc.wait(10)
        raise
    return proc, base
