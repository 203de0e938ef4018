"""``continuous_batching``: iteration-level scheduling with chunked prefill and preemption by recompute."""
from __future__ import annotations

from dataclasses import dataclass

from tokenmill.hooktypes import ScheduledSeq, ScheduleInput, SchedulerOutput
from tokenmill.plugin import Plugin, hookimpl


class ContinuousBatching(Plugin):
    """Requests join and leave the batch at every step.

    Each step: running sequences first, decodes before partial prefills, in arrival order; then waiting
    requests in arrival order while the sequence limit and the token budget allow. With
    ``chunked_prefill`` a prompt larger than the remaining budget runs in chunks, so one long prompt never
    stalls the decodes. When the KV cache cannot grow a running sequence, the most recently arrived
    running sequence is preempted (its KV freed, recomputed later, producing the same tokens).
    """

    name = "continuous_batching"

    @dataclass(slots=True)
    class Options:
        max_num_seqs: int | None = None            # default: the pipeline's limits.max_num_seqs
        max_num_batched_tokens: int | None = None  # default: the pipeline's limits.max_num_batched_tokens
        chunked_prefill: bool = True

        def __post_init__(self) -> None:
            for key in ("max_num_seqs", "max_num_batched_tokens"):
                val = getattr(self, key)
                if val is not None and val < 1:
                    raise ValueError(f"{key} must be >= 1, got {val}")

    def __init__(self, options=None) -> None:
        super().__init__(options)
        self.preemptions = 0

    @hookimpl
    def schedule(self, state: ScheduleInput) -> SchedulerOutput:
        opts = self.options
        max_seqs = min(opts.max_num_seqs or state.limits.max_num_seqs, state.limits.max_num_seqs)
        budget = opts.max_num_batched_tokens or state.limits.max_num_batched_tokens
        out = SchedulerOutput()
        kv = state.kv
        # decodes first, then sequences in the middle of their prompt; arrival order within each
        running = sorted(state.running, key=lambda s: (s.num_uncomputed_tokens > 1, s.arrival_time))
        by_age = sorted(state.running, key=lambda s: s.arrival_time)
        preempted: set[int] = set()
        scheduled: dict[int, ScheduledSeq] = {}
        for seq in running:
            if seq.seq_id in preempted:
                continue
            if budget <= 0:
                break
            n = min(seq.num_uncomputed_tokens, budget)
            while not kv.allocate(seq, n):
                # no room: preempt the newest running sequence (possibly this one) and retry
                victim = next(v for v in reversed(by_age) if v.seq_id not in preempted)
                preempted.add(victim.seq_id)
                kv.free(victim)
                out.preempted.append(victim)
                self.preemptions += 1
                dropped = scheduled.pop(victim.seq_id, None)
                if dropped is not None:
                    budget += dropped.num_new_tokens
                if victim is seq:
                    break
            else:
                scheduled[seq.seq_id] = ScheduledSeq(seq, n)
                budget -= n
        out.scheduled = list(scheduled.values())
        if preempted:
            return out  # memory is tight: admit nobody new this step
        num_running = len(state.running)
        for seq in state.waiting:
            if num_running >= max_seqs or budget <= 0:
                break
            cached = kv.cached_prefix(seq)
            n = seq.num_uncomputed_tokens - cached
            if n > budget:
                if not opts.chunked_prefill and out.scheduled:
                    break
                n = budget if opts.chunked_prefill else n
            if not kv.allocate(seq, n, cached):
                break
            out.scheduled.append(ScheduledSeq(seq, n))
            budget -= n
            num_running += 1
        return out
