"""What a handler's queue receives from its :class:`~tokenmill.serve.worker.EngineWorker`, and the handle of
one request of a call (what the handler asked, what the worker reports back)."""
from __future__ import annotations

import asyncio
from dataclasses import dataclass
from typing import Any

from tokenmill.engine.outputs import RequestOutput
from tokenmill.params import SamplingParams


# ------------------------------------------------------------------------------------------- items
# What a handler's queue receives. ``handle`` says which request of the call it belongs to.
@dataclass(slots=True)
class Accepted:
    handle: "RequestHandle"


@dataclass(slots=True)
class Rejected:
    handle: "RequestHandle"
    status: int
    message: str
    field: str | None = None   # the request field an engine RequestError named
    plugin: str | None = None  # the plugin that refused it


@dataclass(slots=True)
class Delta:
    handle: "RequestHandle"
    text: str
    num_tokens: int
    logprobs: list | None = None  # TokenLogprob per new token, when the request asked


@dataclass(slots=True)
class Final:
    """The request is over. ``text`` is the last piece of output not sent in a :class:`Delta`."""

    handle: "RequestHandle"
    text: str
    num_tokens: int
    output: RequestOutput
    finish_reason: str   # the engine's reason, or the abort reason (cancelled, timeout, shutdown)
    error: str | None


@dataclass(slots=True)
class Interrupted:
    """Posted on the event loop itself: the deadline passed or the client went away."""

    handle: "RequestHandle | None"
    reason: str  # "timeout" | "cancelled"


@dataclass(eq=False)
class RequestHandle:
    """One engine request, as the service tracks it. Created by a handler, then owned by the worker."""

    request_id: str
    prompt: Any                      # text, token ids, or chat messages (list of dicts)
    params: SamplingParams
    loop: asyncio.AbstractEventLoop
    queue: asyncio.Queue
    received: float                  # perf_counter() when the HTTP request arrived
    index: int = 0                   # position in its HTTP request (batch / several prompts)
    chat: bool = False               # wrap a text prompt in the chat template
    fill_max_tokens: bool = False    # max_tokens = whatever room max_model_len leaves after the prompt
    stream: bool = False             # deliver Delta items (non-streaming calls only get Accepted/Final)
    token_ids: list[int] | None = None  # the prompt tokenized by the handler (off the engine thread)
    # filled in by the worker thread
    prompt_tokens: int = 0
    submitted: float | None = None
    first_token: float | None = None
    last_token: float | None = None
    finished: float | None = None
    num_tokens: int = 0
    done: bool = False               # set on the event loop when the Final item is consumed
