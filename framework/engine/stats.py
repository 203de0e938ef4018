"""Measured engine statistics (counters and a sliding window of recent steps)."""
from __future__ import annotations

import time
from collections import deque

from tokenmill.hooktypes import StepStats


class EngineStats:
    def __init__(self, token_budget: int, window_s: float = 10.0) -> None:
        self.token_budget = token_budget
        self.window_s = window_s
        self.requests_arrived = 0
        self.finished: dict[str, int] = {}
        self.generated_tokens = 0
        self.prompt_tokens_computed = 0
        self.steps = 0
        self.preemptions = 0
        self.scheduled_tokens = 0
        self._recent: deque[tuple[float, int, int]] = deque()  # (time, generated, scheduled tokens)
        self.last_step: StepStats | None = None
        self.draft_tokens = 0
        self.accepted_draft_tokens = 0
        self.draft_steps = 0                   # (sequence, step) pairs that ran drafts
        self.accepted_at: list[int] = []       # accepted_at[i]: drafts accepted at position i
        self.proposed_at: list[int] = []

    def on_drafts(self, proposed: int, accepted: int) -> None:
        self.draft_tokens += proposed
        self.accepted_draft_tokens += accepted
        self.draft_steps += 1
        while len(self.proposed_at) < proposed:
            self.proposed_at.append(0)
            self.accepted_at.append(0)
        for i in range(proposed):
            self.proposed_at[i] += 1
            self.accepted_at[i] += i < accepted

    def on_arrival(self) -> None:
        self.requests_arrived += 1

    def on_tokens(self, n: int, first: bool) -> None:
        self.generated_tokens += n

    def on_finish(self, reason: str) -> None:
        self.finished[reason] = self.finished.get(reason, 0) + 1

    def on_step(self, s: StepStats) -> None:
        self.steps += 1
        self.prompt_tokens_computed += s.num_prefill_tokens
        scheduled = s.num_prefill_tokens + s.num_decode_tokens
        self.scheduled_tokens += scheduled
        now = time.perf_counter()
        self._recent.append((now, s.num_generated_tokens, scheduled))
        while self._recent and now - self._recent[0][0] > self.window_s:
            self._recent.popleft()
        self.last_step = s

    def snapshot(self) -> dict:
        """Counters plus recent throughput: tokens/s and batch utilization (scheduled tokens / budget)."""
        rec = list(self._recent)
        span = (rec[-1][0] - rec[0][0]) if len(rec) > 1 else 0.0
        gen = sum(r[1] for r in rec[1:]) if len(rec) > 1 else 0
        return {
            "requests_arrived": self.requests_arrived,
            "requests_finished": dict(self.finished),
            "generated_tokens": self.generated_tokens,
            "prompt_tokens_computed": self.prompt_tokens_computed,
            "steps": self.steps,
            "preemptions": self.preemptions,
            "tokens_per_s": gen / span if span > 0 else 0.0,
            "batch_utilization": (sum(r[2] for r in rec) / (len(rec) * self.token_budget)) if rec else 0.0,
            "spec": {
                "draft_tokens": self.draft_tokens,
                "accepted_tokens": self.accepted_draft_tokens,
                "acceptance_rate": self.accepted_draft_tokens / self.draft_tokens if self.draft_tokens else 0.0,
                "acceptance_by_position": [a / p for a, p in zip(self.accepted_at, self.proposed_at)],
                "mean_tokens_per_step": ((self.accepted_draft_tokens + self.draft_steps) / self.draft_steps
                                         if self.draft_steps else 0.0),
            },
        }
