"""The service state shared by the routes: engine workers, admission, in-flight calls and draining. The engine
requests of one HTTP request are a :class:`~tokenmill.serve.call.GenerationCall` (``call.py``)."""
from __future__ import annotations

import asyncio
import logging
import math
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Callable

from tokenmill.params import SamplingParams
from tokenmill.serve.metrics import ServeMetrics, current_account
from tokenmill.serve.prompt_limits import min_tokens
from tokenmill.serve.worker import EngineWorker

if TYPE_CHECKING:
    from tokenmill.serve.call import GenerationCall

log = logging.getLogger("tokenmill.serve")

ERROR_TYPES = {400: "invalid_request_error", 401: "authentication_error", 404: "not_found_error",
               405: "invalid_request_error", 408: "timeout", 413: "invalid_request_error", 499: "cancelled",
               500: "internal_error", 503: "service_unavailable", 504: "timeout"}


class APIError(Exception):
    """An HTTP error with an OpenAI-shaped body: ``{"error": {"message", "type", "param", "code"}}``."""

    def __init__(self, status: int, message: str, *, type: str | None = None, param: str | None = None,
                 code: str | None = None, headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.type = type or ERROR_TYPES.get(status, "error")
        self.param = param
        self.code = code
        self.headers = headers

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


@dataclass(slots=True)
class ServeConfig:
    """How the service behaves. ``request_timeout`` / ``drain_timeout`` are seconds (None: no timeout)."""

    api_key: str | None = None
    max_queued_requests: int = 1024
    request_timeout: float | None = 600.0
    drain_timeout: float = 30.0
    warmup: bool = True
    stats_timeout: float = 10.0
    max_body_bytes: int = 16 * 2**20  # larger request bodies are refused with 413 before they are read

    def __post_init__(self) -> None:
        if not isinstance(self.max_body_bytes, int) or isinstance(self.max_body_bytes, bool) or \
                self.max_body_bytes < 1:
            raise ValueError(f"max_body_bytes must be a positive number of bytes, got {self.max_body_bytes!r}")


class Service:
    def __init__(self, pipelines: dict[str, Any], config: ServeConfig, metrics: ServeMetrics) -> None:
        if not pipelines:
            raise ValueError("serve needs at least one pipeline")
        self.config = config
        self.metrics = metrics
        self.workers: dict[str, EngineWorker] = {
            name: EngineWorker(name, src, metrics, warmup=config.warmup)
            for name, src in pipelines.items()}
        self.default = next(iter(self.workers))
        self.draining = False
        self.started = time.time()
        self.inflight = 0
        self.calls: set[GenerationCall] = set()
        self._idle: asyncio.Event | None = None

    # ------------------------------------------------------------------ lifecycle
    def start(self) -> None:
        for w in self.workers.values():
            w.start()

    async def stop(self, timeout: float = 30.0) -> None:
        for w in self.workers.values():
            if w.alive:
                w.stop()
        for w in self.workers.values():
            await asyncio.to_thread(w.thread.join, timeout)

    @property
    def ready(self) -> bool:
        return not self.draining and all(w.state == "ready" for w in self.workers.values())

    async def drain(self, timeout: float | None = None) -> dict:
        """Refuse new requests (503), wait for in-flight ones up to ``timeout``, then abort the rest."""
        timeout = self.config.drain_timeout if timeout is None else timeout
        self.draining = True
        t0 = time.perf_counter()
        pending = self.inflight
        log.info("draining: %d request(s) in flight, deadline %.1f s", pending, timeout)
        if self.inflight:
            try:
                await asyncio.wait_for(self._idle_event().wait(), timeout)
            except asyncio.TimeoutError:
                pass
        aborted = 0
        if self.inflight:
            for call in list(self.calls):
                aborted += call.interrupt("shutdown")
            try:  # the aborted calls answer at once; give them a moment to send their last bytes
                await asyncio.wait_for(self._idle_event().wait(), 5.0)
            except asyncio.TimeoutError:
                pass
        return {"in_flight_at_start": pending, "aborted": aborted, "seconds": time.perf_counter() - t0}

    def _idle_event(self) -> asyncio.Event:
        if self._idle is None:
            self._idle = asyncio.Event()
            if not self.inflight:
                self._idle.set()
        return self._idle

    # ------------------------------------------------------------------ routing and admission
    def worker(self, name: str | None, *, openai: bool = False) -> EngineWorker:
        w = self.workers[self.default] if name is None or name == "" else self.workers.get(name)
        if w is not None:
            current_account().pipeline = w.name
            return w
        names = ", ".join(self.workers)
        if openai:
            raise APIError(404, f"The model '{name}' does not exist; available models: {names}",
                           param="model", code="model_not_found")
        raise APIError(400, f"unknown optimization '{name}'; available: {names}", param="optimization",
                       code="unknown_optimization")

    def check_ready(self, w: EngineWorker) -> None:
        if self.draining:
            raise APIError(503, "the server is shutting down and accepts no new requests",
                           code="shutting_down", headers={"Retry-After": "5"})
        if w.state == "failed":
            raise APIError(503, f"pipeline '{w.name}' failed to load: {w.error}", code="pipeline_failed")
        if w.state != "ready":
            raise APIError(503, f"pipeline '{w.name}' is still {w.state}; retry when GET /ready answers 200",
                           code="pipeline_loading", headers={"Retry-After": "2"})

    async def on_engine_thread(self, w: EngineWorker, fn: Callable[[Any], Any]) -> Any:
        """``fn(pipeline)`` on the pipeline's engine thread, between steps (also while draining)."""
        if w.state != "ready":
            self.check_ready(w)
        try:
            return await asyncio.wait_for(w.call(fn), self.config.stats_timeout)
        except asyncio.TimeoutError:
            raise APIError(503, f"pipeline '{w.name}' did not answer within {self.config.stats_timeout:g} s",
                           code="engine_busy") from None

    def admit(self, w: EngineWorker, n: int, param: str | None = None) -> None:
        try:
            self.check_ready(w)
            # not running yet (posted, or in the engine's waiting queue): they take the free batch slots first,
            # and whatever does not fit in a slot waits; admitted = free slots + max_queued_requests
            pending = w.queued()
            slots = w.limits.max_num_seqs
            waiting = max(0, w.num_running + pending - slots)
            would_wait = max(0, w.num_running + pending + n - slots)
            limit = self.config.max_queued_requests
            if would_wait > waiting and would_wait > limit:
                retry = max(1, min(60, math.ceil(w.mean_latency_s * (waiting + 1) / max(1, slots))))
                raise APIError(503, f"the request queue of pipeline '{w.name}' is full ({waiting} request(s) "
                                    f"waiting for a batch slot, limit --max-queued-requests={limit}); retry in "
                                    f"{retry} s", param=param, code="queue_full",
                               headers={"Retry-After": str(retry)})
        except APIError:
            self.count(w, "overloaded", n)
            raise

    def check_max_tokens(self, w: EngineWorker, params: SamplingParams, param: str = "max_tokens") -> None:
        limit = w.limits.max_model_len - 1
        if params.max_tokens > limit:
            self.count(w, "invalid")
            raise APIError(400, f"{param} must be at most {limit} for '{w.name}' (its max_model_len is "
                                f"{w.limits.max_model_len}, and the prompt needs at least one token), got "
                                f"{params.max_tokens}", param=param)

    def check_prompt_length(self, w: EngineWorker, prompt: Any, params: SamplingParams, param: str, *,
                            fill_max_tokens: bool = False) -> None:
        """400 for a text prompt whose character count alone proves that it cannot fit ``max_model_len`` (see
        :mod:`tokenmill.serve.prompt_limits`), before anyone spends time tokenizing it."""
        limit = w.limits.max_model_len
        room = limit - (1 if fill_max_tokens else params.max_tokens)
        if isinstance(prompt, list) and not (prompt and isinstance(prompt[0], dict)):
            return  # token ids: the engine checks their exact count
        chars, fewest = min_tokens(prompt, w.max_token_chars)
        if fewest > room:
            self.count(w, "invalid")
            with_max = "" if fill_max_tokens else f" with max_tokens {params.max_tokens}"
            raise APIError(400, f"{param} is too long for '{w.name}': its {chars} characters are at least {fewest} "
                                f"tokens (no token of this model is longer than {w.max_token_chars} characters), "
                                f"and max_model_len {limit} leaves room for at most {room} prompt tokens{with_max}",
                           param=param, code="context_length_exceeded")

    def count(self, w: EngineWorker, outcome: str, n: int = 1) -> None:
        """Count ``n`` generation requests of ``w`` in tokenmill_requests_total, and mark the HTTP request as
        counted (so the metrics middleware does not count its 5xx again)."""
        self.metrics.requests.labels(w.name, outcome).inc(n)
        current_account().counted = True

    def track(self, call: "GenerationCall") -> None:
        self.calls.add(call)
        self.inflight += len(call.handles)
        self._idle_event().clear()

    def untrack(self, call: "GenerationCall") -> None:
        if call in self.calls:
            self.calls.discard(call)
            self.inflight -= len(call.handles)
            if not self.inflight:
                self._idle_event().set()


__all__ = ["APIError", "ServeConfig", "Service"]
