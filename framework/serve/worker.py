"""One engine thread per pipeline: the only code that ever touches the :class:`~tokenmill.Pipeline`'s engine.
(Handlers tokenize prompts themselves, on a pool thread, and hand over token ids: see ``serve/call.py``.)

HTTP handlers (on the asyncio event loop) post commands to :class:`EngineWorker` through a thread-safe
queue: submit, abort, or "run this function on the pipeline" (stats snapshots, cache clearing). The worker
thread steps the engine while it has work and blocks on the command queue when it has none, so an idle
server burns no CPU. Results flow back per request through an ``asyncio.Queue`` owned by the handler;
the worker fills it with ``loop.call_soon_threadsafe``, once per engine step for all the requests of a
loop (one wake-up of the event loop per step, however many streams are open).
"""
from __future__ import annotations

import asyncio
import dataclasses
import logging
import queue
import threading
import time
from collections import defaultdict
from typing import Any, Callable

from tokenmill.errors import ModelLoadError, PipelineError, RequestError
from tokenmill.params import SamplingParams
from tokenmill.serve.describe import describe
from tokenmill.serve.items import Accepted, Delta, Final, Rejected, RequestHandle
from tokenmill.serve.metrics import outcome_for_status
from tokenmill.serve.prompt_limits import max_token_chars

log = logging.getLogger("tokenmill.serve")

WARMUP_PROMPT = "Hello"


def _put_all(items: list[tuple[asyncio.Queue, Any]]) -> None:
    for q, item in items:
        q.put_nowait(item)


def _settle(fut: asyncio.Future, result: Any, exc: BaseException | None) -> None:
    if fut.cancelled():
        return
    if exc is not None:
        fut.set_exception(exc)
    else:
        fut.set_result(result)


# ------------------------------------------------------------------------------------------- worker
class EngineWorker:
    """Owns one pipeline on a dedicated thread.

    ``source`` is a built :class:`~tokenmill.Pipeline` or a zero-argument factory that builds one (called
    on the worker thread, so a server can answer ``/health`` while models load). ``state`` goes
    ``starting -> loading -> warming -> ready`` (or ``failed``), then ``stopped``. A pipeline the worker built
    itself is closed when it stops (plugins' ``shutdown`` hooks run); one handed in stays its owner's.
    """

    def __init__(self, name: str, source: Any, metrics=None, *, warmup: bool = True) -> None:
        self.name = name
        is_pipeline = hasattr(source, "engine") and hasattr(source, "step")
        self.pipeline = source if is_pipeline else None
        self._factory: Callable[[], Any] | None = None if is_pipeline else source
        self.metrics = metrics
        self.warmup = warmup
        self.state = "starting"
        self.error: str | None = None
        self.limits = self.pipeline.limits if is_pipeline else None
        self.max_token_chars: int | None = None  # prompt_limits.max_token_chars of the tokenizer, once loaded
        self.info: dict | None = None
        self.ready = threading.Event()
        # counters read across threads: each is written by one thread only
        self.posted = 0          # requests handed to submit() (event loop thread)
        self.received = 0        # requests the worker has taken from the queue (worker thread)
        self.num_waiting = 0     # engine's waiting queue after the last step / command (worker thread)
        self.num_running = 0
        self.mean_latency_s = 1.0  # moving average of finished requests' latency (Retry-After estimate)
        self._cmds: queue.SimpleQueue = queue.SimpleQueue()
        self._handles: dict[str, RequestHandle] = {}
        self._out: list[tuple[RequestHandle, Any]] = []
        self._stopping = False
        self._m = None if metrics is None else {
            "ttft": metrics.ttft.labels(name), "itl": metrics.itl.labels(name), "e2e": metrics.e2e.labels(name),
            "queue": metrics.queue.labels(name), "prompt": metrics.prompt_tokens.labels(name),
            "gen": metrics.generation_tokens.labels(name)}
        self.thread = threading.Thread(target=self._run, name=f"tokenmill-engine-{name}", daemon=True)

    # ------------------------------------------------------------------ API for the event loop thread
    def start(self) -> None:
        self.thread.start()

    def queued(self) -> int:
        """Requests of this pipeline not running yet: posted but not taken, plus the engine's waiting queue
        (as of the last step or submission; may count a request twice for an instant, never zero times)."""
        return max(0, self.posted - self.received) + self.num_waiting

    def submit(self, handles: list[RequestHandle]) -> None:
        """Queue requests; each handle's queue gets :class:`Accepted` or :class:`Rejected`, then a Final."""
        self.posted += len(handles)
        self._cmds.put(("submit", handles))

    def abort(self, request_id: str, reason: str) -> None:
        self._cmds.put(("abort", request_id, reason))

    def call(self, fn: Callable[[Any], Any]) -> asyncio.Future:
        """Run ``fn(pipeline)`` on the worker thread between engine steps; await the returned future."""
        loop = asyncio.get_running_loop()
        fut = loop.create_future()
        self._cmds.put(("call", fn, loop, fut))
        return fut

    def stop(self) -> None:
        """Abort whatever is in flight and end the thread (join it with ``thread.join``)."""
        self._cmds.put(("stop",))

    @property
    def alive(self) -> bool:
        return self.thread.is_alive()

    # ------------------------------------------------------------------ the thread
    def _run(self) -> None:
        try:
            if self.pipeline is None:
                self.state = "loading"
                self.pipeline = self._factory()
            listeners = getattr(self.pipeline.runner, "on_failure", None)  # a tensor-parallel runner's ranks
            if listeners is not None:
                listeners.append(lambda message: self._cmds.put(("fatal", message)))
            self.limits = self.pipeline.limits
            self.max_token_chars = max_token_chars(self.pipeline.tokenizer)
            self.state = "warming"
            if self.warmup:
                self._warm_up()
            self.info = describe(self.pipeline)
            self.state = "ready"
            log.info("pipeline '%s' ready", self.name)
        except Exception as exc:  # the server keeps running and reports the failure
            self.state = "failed"
            self.error = f"{type(exc).__name__}: {exc}"
            if isinstance(exc, (ModelLoadError, PipelineError)):  # messages meant for people: no traceback
                log.error("pipeline '%s' failed to start: %s", self.name, exc)
            else:
                log.exception("pipeline '%s' failed to start", self.name)
        finally:
            self.ready.set()
        try:
            self._loop()
        finally:
            if self._factory is not None and self.pipeline is not None:
                try:
                    self.pipeline.close()
                except Exception:  # closing must not hide the stop
                    log.exception("closing pipeline '%s' failed", self.name)
            self.state = "stopped"

    def _warm_up(self) -> None:
        """One short generation through the whole path (tokenizer, scheduler, KV, forward, sampler)."""
        pipe = self.pipeline
        rid = f"__warmup-{id(self)}__"
        pipe.submit(WARMUP_PROMPT, SamplingParams(max_tokens=2, ignore_eos=True), request_id=rid)
        while pipe.engine.has_unfinished():
            pipe.step()
            if pipe.engine.idle:
                time.sleep(0.001)  # the scheduler holds back on purpose (a batching window)
        out = pipe.collect(rid)
        if out.finish_reason == "error":
            raise RuntimeError(f"warm-up generation failed: {out.error}")

    def _loop(self) -> None:
        while not self._stopping:
            try:
                self._iteration()
            except Exception as exc:  # a bug here must not kill the thread: fail what is in flight
                log.exception("engine loop of '%s' failed", self.name)
                self._fail_all(f"{type(exc).__name__}: {exc}")
            self._flush()

    def _iteration(self) -> None:
        eng = self.pipeline.engine if self.pipeline is not None and self.state == "ready" else None
        if eng is None or not eng.has_unfinished():
            self._publish(eng)
            self._flush()
            self._handle(self._cmds.get())  # nothing to compute: sleep until a command arrives
        while True:  # take every pending command before the next step
            try:
                cmd = self._cmds.get_nowait()
            except queue.Empty:
                break
            self._handle(cmd)
        if self._stopping or eng is None or not eng.has_unfinished():
            return
        try:
            chunks = self.pipeline.step()
        except Exception as exc:  # schedule / propose / step_end raised: the step's state is unknown
            log.exception("engine step of '%s' raised", self.name)
            self._fail_all(f"{type(exc).__name__}: {exc}")
            return
        self._dispatch(chunks)
        self._publish(eng)
        if eng.idle and eng.has_unfinished():
            # the scheduler is holding requests back (e.g. a batching window): wait for a command or
            # 2 ms, sleeping, rather than stepping in a tight loop
            self._flush()
            try:
                cmd = self._cmds.get(timeout=0.002)
            except queue.Empty:
                return
            self._handle(cmd)

    def _publish(self, eng) -> None:
        if eng is not None:  # running first: a reader between the two writes over-counts, never under-counts
            self.num_running = len(eng.running)
            self.num_waiting = len(eng.waiting)

    # ------------------------------------------------------------------ commands
    def _handle(self, cmd: tuple) -> None:
        kind = cmd[0]
        if kind == "submit":
            self._submit(cmd[1])
        elif kind == "abort":
            self._abort(cmd[1], cmd[2])
        elif kind == "call":
            _, fn, loop, fut = cmd
            try:
                if self.state != "ready":
                    raise RuntimeError(f"pipeline '{self.name}' is {self.state}"
                                       + (f": {self.error}" if self.error else ""))
                result, exc = fn(self.pipeline), None
            except Exception as e:
                result, exc = None, e
            try:
                loop.call_soon_threadsafe(_settle, fut, result, exc)
            except RuntimeError:  # that event loop is gone
                pass
        elif kind == "fatal":  # the pipeline can run no more steps (a tensor-parallel rank died)
            self.state, self.error = "failed", cmd[1]
            self._fail_all(cmd[1])
        elif kind == "stop":
            self._stopping = True
            if self.state == "ready":
                for rid in list(self._handles):
                    self._abort(rid, "shutdown")
                self._publish(self.pipeline.engine)

    def _submit(self, handles: list[RequestHandle]) -> None:
        try:
            self._add(handles)
        finally:
            # publish the engine's queue before counting the handles as received, so that a reader on another
            # thread may count them twice for a moment (refusing conservatively) but never misses them
            if self.pipeline is not None and self.state == "ready":
                self._publish(self.pipeline.engine)
            self.received += len(handles)

    def _add(self, handles: list[RequestHandle]) -> None:
        if self.state != "ready":
            msg = (f"pipeline '{self.name}' failed to load: {self.error}" if self.state == "failed"
                   else f"pipeline '{self.name}' is {self.state}")
            self._reject(handles, 503, msg)
            return
        pipe = self.pipeline
        added: list[RequestHandle] = []
        failed: tuple[int, str] | None = None
        for i, h in enumerate(handles):
            try:
                if h.token_ids is not None:
                    ids = h.token_ids
                elif isinstance(h.prompt, list) and h.prompt and isinstance(h.prompt[0], dict):
                    ids = pipe.apply_chat_template(h.prompt)
                else:
                    ids = pipe.encode(h.prompt, chat=h.chat)
                if h.fill_max_tokens:
                    h.params = dataclasses.replace(h.params, max_tokens=max(1, self.limits.max_model_len - len(ids)))
                h.prompt_tokens = len(ids)
                h.submitted = time.perf_counter()
                pipe.submit(ids, h.params, request_id=h.request_id)
                added.append(h)
            except (RequestError, ValueError) as exc:
                failed = (400, str(exc) if len(handles) == 1 else f"prompt {i}: {exc}", getattr(exc, "field", None),
                          getattr(exc, "plugin", None))
            except Exception as exc:
                log.exception("submitting a request to '%s' failed", self.name)
                failed = (500, f"{type(exc).__name__}: {exc}")
            if failed:
                break
        if failed:  # all or nothing: a batch is refused as a whole
            for h in added:
                pipe.abort(h.request_id)
                pipe.collect(h.request_id)
            self._reject(handles, *failed)
            return
        for h in handles:
            self._handles[h.request_id] = h
            self._out.append((h, Accepted(h)))

    def _reject(self, handles: list[RequestHandle], status: int, message: str, field: str | None = None,
                plugin: str | None = None) -> None:
        if self.metrics is not None:
            self.metrics.requests.labels(self.name, outcome_for_status(status)).inc(len(handles))
        for h in handles:
            self._out.append((h, Rejected(h, status, message, field, plugin)))

    def _abort(self, request_id: str, reason: str) -> None:
        h = self._handles.get(request_id)
        if h is None:  # finished (or refused) already
            return
        eng = self.pipeline.engine
        self.pipeline.abort(request_id)  # frees its KV now
        self._finish(h, "", 0, reason)
        if not eng.has_unfinished():
            # the engine keeps the aborted request's last chunk for its next step; with nothing left to run,
            # take it now (a step with nothing to schedule computes nothing) so no request state lingers
            try:
                self.pipeline.step()
            except Exception:
                log.exception("flushing the engine of '%s' after an abort failed", self.name)

    def _fail_all(self, message: str) -> None:
        if self.pipeline is None:
            return
        for rid, h in list(self._handles.items()):
            try:
                self.pipeline.abort(rid)
                self._finish(h, "", 0, "error", error=message)
            except Exception:
                self._handles.pop(rid, None)
                log.exception("could not fail request %s cleanly", rid)

    # ------------------------------------------------------------------ results
    def _dispatch(self, chunks) -> None:
        now = time.perf_counter()
        m = self._m
        generated = 0
        for chunk in chunks:
            h = self._handles.get(chunk.request_id)
            if h is None:  # the final chunk of a request aborted (and collected) earlier
                continue
            n = len(chunk.token_ids)
            if n:
                if h.first_token is None:
                    h.first_token = now
                    if m is not None:
                        m["ttft"].observe(now - h.received)
                elif m is not None:
                    gap = (now - h.last_token) / n
                    for _ in range(n):
                        m["itl"].observe(gap)
                h.last_token = now
                h.num_tokens += n
                generated += n
            if chunk.finished:
                out = chunk.output
                self._finish(h, chunk.text, n, out.finish_reason if out is not None else "error",
                             error=out.error if out is not None else "no output", now=now)
            elif h.stream and (chunk.text or n):
                self._out.append((h, Delta(h, chunk.text, n, chunk.logprobs)))
        if generated and self.metrics is not None:
            self.metrics.record_generated(self.name, generated)

    def _finish(self, h: RequestHandle, text: str, n: int, reason: str, *, error: str | None = None,
                now: float | None = None) -> None:
        out = self.pipeline.collect(h.request_id)
        self._handles.pop(h.request_id, None)
        h.finished = now if now is not None else time.perf_counter()
        if reason == "error":
            error = error or out.error
        latency = h.finished - h.received
        self.mean_latency_s = 0.8 * self.mean_latency_s + 0.2 * latency
        m = self._m
        if m is not None:
            self.metrics.requests.labels(self.name, reason).inc()
            m["prompt"].inc(h.prompt_tokens)
            m["gen"].inc(len(out.token_ids))
            m["e2e"].observe(latency)
            if out.queue_s is not None and h.submitted is not None:
                m["queue"].observe(h.submitted - h.received + out.queue_s)
        self._out.append((h, Final(h, text, n, out, reason, error)))

    def _flush(self) -> None:
        """Hand the collected items to their event loops: one call_soon_threadsafe per loop."""
        if not self._out:
            return
        by_loop: dict[asyncio.AbstractEventLoop, list] = defaultdict(list)
        for h, item in self._out:
            by_loop[h.loop].append((h.queue, item))
        self._out = []
        for loop, items in by_loop.items():
            try:
                loop.call_soon_threadsafe(_put_all, items)
            except RuntimeError:  # the loop closed (server gone); nobody is listening
                pass
