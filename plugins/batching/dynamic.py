"""``dynamic_batching``: request-level batches formed by size or waiting time, run to completion."""
from __future__ import annotations

from dataclasses import dataclass

from tokenmill.hooktypes import ScheduledSeq, ScheduleInput, SchedulerOutput
from tokenmill.plugin import Plugin, hookimpl


class DynamicBatching(Plugin):
    """A batch forms when ``max_batch_size`` requests wait or the oldest has waited ``max_wait_ms``; it
    holds at most ``max_tokens_per_batch`` tokens counted with the real tokenizer (prompt tokens +
    max_tokens of each request) and runs to completion before the next batch forms."""

    name = "dynamic_batching"

    @dataclass(slots=True)
    class Options:
        max_batch_size: int = 16
        max_wait_ms: float = 20.0
        max_tokens_per_batch: int = 8192

        def __post_init__(self) -> None:
            if self.max_batch_size < 1:
                raise ValueError(f"max_batch_size must be >= 1, got {self.max_batch_size}")
            if self.max_wait_ms < 0:
                raise ValueError(f"max_wait_ms must be >= 0, got {self.max_wait_ms}")
            if self.max_tokens_per_batch < 1:
                raise ValueError(f"max_tokens_per_batch must be >= 1, got {self.max_tokens_per_batch}")

    def __init__(self, options=None) -> None:
        super().__init__(options)
        self.batch: set[int] = set()
        self.batches_formed = 0

    @hookimpl
    def schedule(self, state: ScheduleInput) -> SchedulerOutput:
        out = SchedulerOutput()
        running_ids = {s.seq_id for s in state.running}
        self.batch &= running_ids  # finished or aborted members leave
        if not self.batch and state.waiting:
            self._form(state, out)
            return out
        for seq in state.running:
            if seq.seq_id in self.batch:
                n = seq.num_uncomputed_tokens
                if state.kv.allocate(seq, n):
                    out.scheduled.append(ScheduledSeq(seq, n))
                else:
                    out.preempted.append(seq)
                    self.batch.discard(seq.seq_id)
        return out

    def _form(self, state: ScheduleInput, out: SchedulerOutput) -> None:
        opts = self.options
        size = min(opts.max_batch_size, state.limits.max_num_seqs)
        oldest = min(s.arrival_time for s in state.waiting)
        if len(state.waiting) < size and (state.now - oldest) * 1000 < opts.max_wait_ms:
            return  # keep the window open
        tokens = 0
        for seq in state.waiting:
            cost = seq.num_tokens + seq.params.max_tokens - seq.num_output_tokens
            if len(self.batch) >= size or (self.batch and tokens + cost > opts.max_tokens_per_batch):
                break
            if not state.kv.allocate(seq, seq.num_uncomputed_tokens):
                break
            tokens += cost
            self.batch.add(seq.seq_id)
            out.scheduled.append(ScheduledSeq(seq, seq.num_uncomputed_tokens))
        if self.batch:
            self.batches_formed += 1
