"""Per-request state owned by the engine. Plugins receive these objects read-only."""
from __future__ import annotations

import enum
from dataclasses import dataclass, field
from typing import Any

from tokenmill.params import SamplingParams


class SeqStatus(enum.Enum):
    WAITING = "waiting"
    RUNNING = "running"
    FINISHED = "finished"


@dataclass(slots=True, eq=False)
class Sequence:
    """One request's tokens and progress.

    ``token_ids`` holds the prompt followed by the generated tokens. ``num_computed_tokens`` counts the
    leading tokens whose K/V are in the cache; the rest still have to go through the model.
    ``block_table`` is the KV plugin's answer for this sequence (block ids in position order).
    """

    seq_id: int
    request_id: str
    prompt_token_ids: list[int]
    params: SamplingParams
    arrival_time: float
    token_ids: list[int] = field(default_factory=list)
    num_computed_tokens: int = 0
    status: SeqStatus = SeqStatus.WAITING
    block_table: list[int] = field(default_factory=list)
    seed: int = 0  # the request's seed (or one drawn for it): every draw is a function of (seed, position)
    first_scheduled_time: float | None = None
    first_token_time: float | None = None
    finish_time: float | None = None
    finish_reason: str | None = None
    error: str | None = None
    num_preemptions: int = 0
    text: str = ""
    emitted_len: int = 0
    detok: Any = None
    user_data: dict = field(default_factory=dict)
    logprobs: list | None = None  # TokenLogprob per generated token, when params.logprobs is not None
    num_cached_tokens: int = 0  # prompt tokens whose KV the prefix cache supplied (latest admission)

    def __post_init__(self) -> None:
        if not self.token_ids:
            self.token_ids = list(self.prompt_token_ids)
        if self.logprobs is None and self.params.logprobs is not None:
            self.logprobs = []

    @property
    def prompt_len(self) -> int:
        return len(self.prompt_token_ids)

    @property
    def num_tokens(self) -> int:
        return len(self.token_ids)

    @property
    def num_output_tokens(self) -> int:
        return len(self.token_ids) - len(self.prompt_token_ids)

    @property
    def output_token_ids(self) -> list[int]:
        return self.token_ids[len(self.prompt_token_ids):]

    @property
    def num_uncomputed_tokens(self) -> int:
        return len(self.token_ids) - self.num_computed_tokens

    @property
    def is_finished(self) -> bool:
        return self.status is SeqStatus.FINISHED
