"""What the engine hands back: finished results and streaming chunks."""
from __future__ import annotations

from dataclasses import dataclass, field

from tokenmill.sequence import Sequence


@dataclass(slots=True)
class TokenLogprob:
    """A generated token's log-probability under the model's raw distribution, and the most likely
    alternatives at that position (``(token_id, logprob)``, best first; as many as ``SamplingParams.logprobs``)."""

    token_id: int
    logprob: float
    top: list[tuple[int, float]] = field(default_factory=list)


@dataclass(slots=True)
class RequestOutput:
    """One finished request.

    ``finish_reason`` is ``stop`` (EOS, stop string or stop token), ``length`` (max_tokens or the model's
    max length), ``abort`` or ``error`` (then ``error`` says why). Times are seconds.
    """

    request_id: str
    text: str
    token_ids: list[int]
    prompt_token_ids: list[int]
    finish_reason: str | None
    error: str | None = None
    ttft_s: float | None = None
    queue_s: float | None = None
    total_s: float | None = None
    num_preemptions: int = 0
    logprobs: list[TokenLogprob] | None = None  # one per token of ``token_ids`` when the request asked
    num_cached_tokens: int = 0  # prompt tokens whose KV came from the prefix cache

    @property
    def num_output_tokens(self) -> int:
        return len(self.token_ids)

    @property
    def decode_tokens_per_s(self) -> float | None:
        if self.total_s is None or self.ttft_s is None or len(self.token_ids) < 2:
            return None
        span = self.total_s - self.ttft_s
        return (len(self.token_ids) - 1) / span if span > 0 else None

    @classmethod
    def from_seq(cls, seq: Sequence) -> "RequestOutput":
        t0 = seq.arrival_time
        return cls(
            request_id=seq.request_id, text=seq.text, token_ids=seq.output_token_ids,
            prompt_token_ids=list(seq.prompt_token_ids), finish_reason=seq.finish_reason, error=seq.error,
            ttft_s=None if seq.first_token_time is None else seq.first_token_time - t0,
            queue_s=None if seq.first_scheduled_time is None else seq.first_scheduled_time - t0,
            total_s=None if seq.finish_time is None else seq.finish_time - t0,
            num_preemptions=seq.num_preemptions,
            logprobs=None if seq.logprobs is None else list(seq.logprobs), num_cached_tokens=seq.num_cached_tokens,
        )


@dataclass(slots=True)
class StreamChunk:
    """Incremental output of one request after an engine step."""

    request_id: str
    text: str
    token_ids: list[int] = field(default_factory=list)
    finished: bool = False
    output: RequestOutput | None = None
    logprobs: list[TokenLogprob] | None = None  # parallel to ``token_ids`` when the request asked
