"""The service state shared by the routes: engine workers, admission, in-flight calls and draining."""
from __future__ import annotations

import asyncio
import logging
import math
import time
import uuid
from dataclasses import dataclass
from typing import Any, AsyncIterator, Callable

from starlette.requests import Request
from starlette.responses import Response, StreamingResponse

from tokenmill.errors import RequestError
from tokenmill.params import SamplingParams
from tokenmill.serve.metrics import ServeMetrics, current_account
from tokenmill.serve.prompt_limits import min_tokens
from tokenmill.serve.worker import (Accepted, Delta, EngineWorker, Final, Interrupted, Rejected,
                                    RequestHandle)

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

    def admit(self, w: EngineWorker, n: int) -> None:
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
                                    f"{retry} s", code="queue_full", headers={"Retry-After": str(retry)})
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


class ClientGone(Exception):
    """The client closed the connection; nobody is listening for the answer."""


class GenerationCall:
    """The engine requests of one HTTP request: admission, submission, waiting, timeout, disconnect, cleanup.

    Deadlines and disconnects never poll: a ``call_later`` timer and a task blocked on the ASGI ``receive``
    channel post an :class:`Interrupted` item into the call's queue and abort the engine requests at once.
    """

    def __init__(self, service: Service, worker: EngineWorker, request: Request | None,
                 prompts: list[Any], params: SamplingParams, *, received: float, stream: bool = False,
                 chat: bool = False, fill_max_tokens: bool = False, prefix: str = "req",
                 param: str | None = None) -> None:
        self.service = service
        self.worker = worker
        self.request = request
        self.loop = asyncio.get_running_loop()
        self.queue: asyncio.Queue = asyncio.Queue()
        self.received = received
        self.id = f"{prefix}-{uuid.uuid4().hex[:24]}"
        n = len(prompts)
        self.account = current_account()
        self.account.prompts = n
        self.handles = [RequestHandle(request_id=self.id if n == 1 else f"{self.id}-{i}", prompt=p, params=params,
                                      loop=self.loop, queue=self.queue, received=received, index=i, chat=chat,
                                      fill_max_tokens=fill_max_tokens, stream=stream)
                        for i, p in enumerate(prompts)]
        # the request field holding the prompts, for error messages: indexed when the request carries several
        self.param = param or ("prompts" if prefix == "batch" else "prompt")
        self.fill_max_tokens = fill_max_tokens
        self.finals: dict[int, Final] = {}
        self.interrupted: str | None = None
        self._aborted: set[str] = set()
        self._timer: asyncio.TimerHandle | None = None
        self._watcher: asyncio.Task | None = None
        self._closed = False
        self._tracked = False

    # ------------------------------------------------------------------ phases
    def param_of(self, h: RequestHandle) -> str:
        if isinstance(h.prompt, list) and h.prompt and isinstance(h.prompt[0], dict):
            return "messages"
        return self.param if len(self.handles) == 1 else f"{self.param}[{h.index}]"

    async def tokenize(self) -> None:
        """Token ids of every prompt, computed on a pool thread, never on the engine thread (where a long text
        stalled every running stream). Refuses at once a prompt too long to fit, by its length alone."""
        svc, w = self.service, self.worker
        for h in self.handles:
            svc.check_prompt_length(w, h.prompt, h.params, self.param_of(h), fill_max_tokens=self.fill_max_tokens)
        pipe = w.pipeline

        def encode_all() -> tuple[RequestHandle, Exception] | None:
            for h in self.handles:
                try:
                    h.token_ids = pipe.encode(h.prompt, chat=h.chat)
                except (RequestError, ValueError) as exc:
                    return h, exc
            return None

        failed = await asyncio.to_thread(encode_all)
        if failed is not None:
            h, exc = failed
            svc.count(w, "invalid", len(self.handles))
            param = self.param_of(h)
            raise APIError(400, str(exc) if len(self.handles) == 1 else f"{param}: {exc}", param=param)

    async def start(self) -> None:
        """Tokenize, admit and submit; returns when the engine accepted every request (raises
        :class:`APIError`)."""
        svc = self.service
        svc.admit(self.worker, len(self.handles))  # refuse before tokenizing when the queue is full already
        await self.tokenize()
        svc.admit(self.worker, len(self.handles))  # admit and submit with nothing awaited in between
        svc.track(self)
        self._tracked = True
        self.worker.submit(self.handles)
        self.account.counted = True  # the engine thread counts each request: when it refuses it, or it finishes
        timeout = svc.config.request_timeout
        if timeout:
            self._timer = self.loop.call_at(self.loop.time() + max(0.0, timeout - (time.perf_counter()
                                                                                   - self.received)),
                                            self.interrupt, "timeout")
        if self.request is not None:
            self._watcher = self.loop.create_task(self._watch_disconnect())
        accepted = 0
        while accepted < len(self.handles):
            item = await self.queue.get()
            if isinstance(item, Accepted):
                accepted += 1
            elif isinstance(item, Rejected):
                self._aborted.update(h.request_id for h in self.handles)  # nothing reached the engine
                self.close()
                raise APIError(item.status, item.message, param="prompt" if item.status == 400 else None)
            elif isinstance(item, Interrupted):
                self.raise_interrupted()

    async def next_item(self):
        """The next Delta / Final / Interrupted of this call."""
        item = await self.queue.get()
        if isinstance(item, Final):
            item.handle.done = True
            self.finals[item.handle.index] = item
            if len(self.finals) == len(self.handles):
                self.close()
        return item

    @property
    def finished(self) -> bool:
        return len(self.finals) == len(self.handles)

    async def wait_all(self) -> list[Final]:
        while not self.finished:
            item = await self.next_item()
            if isinstance(item, Interrupted):
                self.raise_interrupted()
        self.close()
        return [self.finals[i] for i in range(len(self.handles))]

    def stop_watching(self) -> None:
        """Hand disconnect detection over to the streaming response (it listens on ``receive`` itself)."""
        if self._watcher is not None:
            self._watcher.cancel()
            self._watcher = None

    # ------------------------------------------------------------------ interruptions
    def interrupt(self, reason: str) -> int:
        """Abort every unfinished request of the call now (frees their KV) and wake the handler."""
        if self.interrupted is None:
            self.interrupted = reason
        n = self._abort_unfinished(reason)
        self.queue.put_nowait(Interrupted(None, reason))
        return n

    def raise_interrupted(self):
        reason = self.interrupted or "cancelled"
        self.close(reason)
        if reason == "timeout":
            raise APIError(504, f"the request did not finish within the server's request timeout of "
                                f"{self.service.config.request_timeout:g} s and was aborted", code="timeout")
        if reason == "shutdown":
            raise APIError(503, "the server is shutting down; the request was aborted at the drain deadline",
                           code="shutting_down")
        raise ClientGone()

    async def _watch_disconnect(self) -> None:
        try:
            while True:
                message = await self.request.receive()
                if message["type"] == "http.disconnect":
                    break
        except asyncio.CancelledError:
            return
        except Exception:  # the ASGI channel is unusable: treat it as gone
            pass
        self._watcher = None
        if not self._closed:
            self.interrupt("cancelled")

    def _abort_unfinished(self, reason: str) -> int:
        n = 0
        for h in self.handles:
            if not h.done and h.request_id not in self._aborted:
                self._aborted.add(h.request_id)
                self.worker.abort(h.request_id, reason)
                n += 1
        return n

    def close(self, reason: str = "cancelled") -> None:
        """Idempotent cleanup: stop the timer and watcher, abort what is unfinished, release the slot."""
        if self._closed:
            return
        self._closed = True
        if self._timer is not None:
            self._timer.cancel()
        self.stop_watching()
        if self._tracked:  # submitted: abort whatever has not finished
            self._abort_unfinished(self.interrupted or reason)
            self.service.untrack(self)


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
    import json

    payload = data if isinstance(data, str) else json.dumps(data, separators=(",", ":"), ensure_ascii=False)
    return (f"event: {event}\n" if event else "") + f"data: {payload}\n\n"


__all__ = ["APIError", "Accepted", "ClientGone", "Delta", "EngineStreamResponse", "Final", "GenerationCall",
           "Interrupted", "Rejected", "ServeConfig", "Service", "error_event", "final_error", "ms", "raise_for_finals",
           "run_stream", "run_unary", "sse"]
