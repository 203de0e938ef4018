"""Default ``schedule``: first-come-first-served batches without chunking."""
from __future__ import annotations

from tokenmill.hooktypes import ScheduledSeq, ScheduleInput, SchedulerOutput
from tokenmill.plugin import Plugin, hookimpl


class FCFSScheduler(Plugin):
    """Runs every running sequence's next tokens, then admits waiting requests in arrival order while the
    sequence limit, the token budget and the KV cache allow. A prompt larger than the whole budget runs
    alone. Registered ``trylast``: any scheduler plugin in the pipeline overrides it."""

    name = "fcfs"

    @hookimpl(trylast=True)
    def schedule(self, state: ScheduleInput) -> SchedulerOutput:
        out = SchedulerOutput()
        budget = state.limits.max_num_batched_tokens
        for seq in state.running:
            n = seq.num_uncomputed_tokens
            if state.kv.allocate(seq, n):
                out.scheduled.append(ScheduledSeq(seq, n))
                budget -= n
            else:
                out.preempted.append(seq)
        num_running = len(out.scheduled)
        for seq in state.waiting:
            n = seq.num_uncomputed_tokens
            if num_running >= state.limits.max_num_seqs or (n > budget and out.scheduled):
                break
            if not state.kv.allocate(seq, n):
                break
            out.scheduled.append(ScheduledSeq(seq, n))
            budget -= n
            num_running += 1
        return out
