"""The engine requests of one HTTP request: admission, submission, waiting, timeout, disconnect, cleanup.

A call holds ``n`` copies of each of its prompts (OpenAI's ``n``). Only the first copy of a prompt is submitted
at first; the other ``n - 1`` follow once it has produced its first token (or finished), so its prompt's KV
exists by then and a pipeline with a prefix cache supplies the prompt to them instead of computing it again.
"""
from __future__ import annotations

import asyncio
import dataclasses
import hashlib
import re
import time
import uuid
from typing import Any, Callable

from starlette.requests import Request

from tokenmill.engine.outputs import RequestOutput
from tokenmill.errors import RequestError
from tokenmill.params import SamplingParams
from tokenmill.serve.metrics import current_account, outcome_for_status
from tokenmill.serve.service import APIError, Service
from tokenmill.serve.items import Accepted, Delta, Final, Interrupted, Rejected, RequestHandle
from tokenmill.serve.worker import EngineWorker

ABORTED = ("cancelled", "abort", "timeout", "shutdown", "error")
SEED_MAX = 2**63 - 1


class ClientGone(Exception):
    """The client closed the connection; nobody is listening for the answer."""


def copy_seed(seed: int | None, copy: int) -> int | None:
    """The seed of copy ``copy`` of a request seeded ``seed``: the seed itself for the first copy (so ``n: 1``
    samples as before), a hash of (seed, copy) for the others; None stays None (the engine draws one)."""
    if seed is None or copy == 0:
        return seed
    digest = hashlib.blake2b(f"{seed}:{copy}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big") & SEED_MAX


_REFUSED = re.compile(r"(?:prompt \d+: )?plugin '[^']+' refused the request: ([A-Za-z_]+)")


def rejection_param(item: Rejected, fields: dict[str, str], default: str) -> str:
    """The request field an engine refusal is about. ``fields`` maps ``"plugin:NAME"`` (that plugin's refusal
    in ``check_request``) and ``"plugin_args"`` to the request field that carried them, and lists the request's
    own sampling fields (``field: field``) the engine may name (``RequestError.field``)."""
    if item.plugin is not None:
        if f"plugin:{item.plugin}" in fields:
            return fields[f"plugin:{item.plugin}"]
        said = _REFUSED.match(item.message)  # a plugin checking a sampling field names it first
        if said and said.group(1) in fields:
            return fields[said.group(1)]
    if item.field == "plugin_args":
        return fields.get("plugin_args", "plugin_args")
    return item.field or default


class GenerationCall:
    """Deadlines and disconnects never poll: a ``call_later`` timer and a task blocked on the ASGI ``receive``
    channel post an :class:`Interrupted` item into the call's queue and abort the engine requests at once.

    ``handles[i]`` is copy ``i % n`` of prompt ``i // n`` (its ``index`` is ``i``, the OpenAI choice index).
    ``encode(pipeline, prompt, chat)`` tokenizes a prompt (default: ``Pipeline.encode``); ``fields`` names the request
    fields engine refusals are about (:func:`rejection_param`).
    """

    def __init__(self, service: Service, worker: EngineWorker, request: Request | None,
                 prompts: list[Any], params: SamplingParams, *, received: float, stream: bool = False,
                 chat: bool = False, fill_max_tokens: bool = False, prefix: str = "req",
                 param: str | None = None, n: int = 1, encode: Callable[[Any, Any, bool], list[int]] | None = None,
                 fields: dict[str, str] | None = None) -> None:
        self.service = service
        self.worker = worker
        self.request = request
        self.loop = asyncio.get_running_loop()
        self.queue: asyncio.Queue = asyncio.Queue()
        self.received = received
        self.id = f"{prefix}-{uuid.uuid4().hex[:24]}"
        self.n = n
        self.num_prompts = len(prompts)
        total = len(prompts) * n
        self.account = current_account()
        self.account.prompts = total
        self.handles = [RequestHandle(request_id=self.id if total == 1 else f"{self.id}-{i}", prompt=prompts[i // n],
                                      params=dataclasses.replace(params, seed=copy_seed(params.seed, i % n))
                                      if i % n else params, loop=self.loop, queue=self.queue, received=received,
                                      index=i, chat=chat, fill_max_tokens=fill_max_tokens, stream=stream)
                        for i in range(total)]
        self.leaders = self.handles[::n]
        self.pending: dict[int, list[RequestHandle]] = {h.index: self.handles[h.index + 1:h.index + n]
                                                        for h in self.leaders if n > 1}
        # the request field holding the prompts, for error messages: indexed when the request carries several
        self.param = param or ("prompts" if prefix == "batch" else "prompt")
        self.stream = stream
        self.fill_max_tokens = fill_max_tokens
        self.encode = encode
        self.fields = fields or {}
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
        return self.param if self.num_prompts == 1 else f"{self.param}[{h.index // self.n}]"

    async def tokenize(self) -> None:
        """Token ids of every prompt (once per prompt: its copies share them), computed on a pool thread, never
        on the engine thread (where a long text stalled every running stream). Refuses at once a prompt too
        long to fit, by its length alone."""
        svc, w = self.service, self.worker
        for h in self.leaders:
            svc.check_prompt_length(w, h.prompt, h.params, self.param_of(h), fill_max_tokens=self.fill_max_tokens)
        pipe = w.pipeline
        encode = self.encode or (lambda p, prompt, chat: p.encode(prompt, chat=chat))

        def encode_all() -> tuple[RequestHandle, Exception] | None:
            for h in self.leaders:
                try:
                    h.token_ids = encode(pipe, h.prompt, h.chat)
                except (RequestError, ValueError) as exc:
                    return h, exc
                for copy in self.handles[h.index + 1:h.index + self.n]:
                    copy.token_ids = h.token_ids
            return None

        failed = await asyncio.to_thread(encode_all)
        if failed is not None:
            h, exc = failed
            svc.count(w, "invalid", len(self.handles))
            param = self.param_of(h)
            raise APIError(400, str(exc) if self.num_prompts == 1 else f"{param}: {exc}", param=param)

    async def start(self) -> None:
        """Tokenize, admit and submit; returns when the engine accepted the first copy of every prompt (raises
        :class:`APIError`). Admission counts every copy."""
        svc = self.service
        which = "n" if self.n > 1 else None
        svc.admit(self.worker, len(self.handles), which)  # refuse before tokenizing when the queue is full already
        await self.tokenize()
        svc.admit(self.worker, len(self.handles), which)  # admit and submit with nothing awaited in between
        svc.track(self)
        self._tracked = True
        for h in self.leaders:
            h.stream = self.stream or h.index in self.pending  # its first token releases its copies
        self.worker.submit(self.leaders)
        self.account.counted = True  # the engine thread counts each request: when it refuses it, or it finishes
        timeout = svc.config.request_timeout
        if timeout:
            self._timer = self.loop.call_at(self.loop.time() + max(0.0, timeout - (time.perf_counter()
                                                                                   - self.received)),
                                            self.interrupt, "timeout")
        if self.request is not None:
            self._watcher = self.loop.create_task(self._watch_disconnect())
        accepted = 0
        while accepted < len(self.leaders):
            item = await self.queue.get()
            if isinstance(item, Accepted):
                accepted += 1
            elif isinstance(item, Rejected):
                self._aborted.update(h.request_id for h in self.handles)  # nothing reached the engine
                unsent = len(self.handles) - len(self.leaders)  # the worker counted the first copies
                if unsent:
                    self.service.metrics.requests.labels(self.worker.name, outcome_for_status(item.status)).inc(unsent)
                self.close()
                param = rejection_param(item, self.fields, self.param) if item.status == 400 else None
                raise APIError(item.status, item.message, param=param)
            elif isinstance(item, Interrupted):
                self.raise_interrupted()

    async def next_item(self):
        """The next Delta / Final / Interrupted of this call (a Delta only when streaming)."""
        while True:
            item = await self.queue.get()
            if isinstance(item, Accepted):  # a later copy was accepted
                continue
            if isinstance(item, Rejected):  # a later copy was refused (the worker counted it): it fails alone
                item = self._final(item.handle, "error", item.message, count=False)
            if isinstance(item, (Delta, Final)) and item.handle.index in self.pending:
                self._release(item.handle, item if isinstance(item, Final) else None)
            if isinstance(item, Delta) and not self.stream:
                continue
            if isinstance(item, Final):
                item.handle.done = True
                self.finals[item.handle.index] = item
                if len(self.finals) == len(self.handles):
                    self.close()
            return item

    def _release(self, leader: RequestHandle, final: Final | None) -> None:
        """Submit the other copies of ``leader``'s prompt, now that its prompt KV exists; if it ended without a
        result (aborted or failed before its first token), end them the same way."""
        copies = self.pending.pop(leader.index)
        leader.stream = self.stream
        live = [h for h in copies if h.request_id not in self._aborted]
        if final is not None and final.finish_reason in ABORTED and not final.output.token_ids:
            for h in live:
                self._aborted.add(h.request_id)
                self.queue.put_nowait(self._final(h, final.finish_reason, final.error))
        elif live and not self._closed:
            self.worker.submit(live)

    def _final(self, h: RequestHandle, reason: str, error: str | None, *, count: bool = True) -> Final:
        """The Final of a copy that never ran: counted in tokenmill_requests_total like one that did."""
        h.finished = time.perf_counter()
        if count:
            self.service.metrics.requests.labels(self.worker.name, reason).inc()
        out = RequestOutput(h.request_id, "", [], list(h.token_ids or []), reason, error=error)
        return Final(h, "", 0, out, reason, error)

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
        """Abort what runs; copies not submitted yet are never submitted (and are counted here, with ``reason``)."""
        unsubmitted = {h.request_id for copies in self.pending.values() for h in copies}
        n = 0
        for h in self.handles:
            if not h.done and h.request_id not in self._aborted:
                self._aborted.add(h.request_id)
                if h.request_id in unsubmitted:
                    self.service.metrics.requests.labels(self.worker.name, reason).inc()
                else:
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
