"""A shortest-job-first scheduler for tokenmill, packaged the way any third-party plugin would be.

The package declares one entry point (group ``tokenmill.plugins``, name ``sjf``); once it is installed, a
pipeline selects it by name::

    plugins:
      - sjf:
          max_prompt_tokens: 1024
"""
from __future__ import annotations

from dataclasses import dataclass

import tokenmill
from tokenmill.hooktypes import ScheduledSeq, ScheduleInput, SchedulerOutput

__all__ = ["ShortestJobFirst"]
__version__ = "0.1.0"


class ShortestJobFirst(tokenmill.Plugin):
    """Admits waiting sequences shortest-prompt-first (ties by arrival), without chunking.

    Each step, every running sequence gets its next tokens first (one whose KV cannot grow is preempted);
    then waiting sequences are admitted in order of the tokens they still have to prefill, while the
    sequence limit, the step's token budget and the KV cache allow. A prompt larger than the whole budget
    runs alone. With ``max_prompt_tokens`` set, longer prompts are rejected with a reason instead of
    queueing. Short requests get low latency; long ones can wait while short ones keep arriving.
    """

    name = "sjf"

    @dataclass(slots=True)
    class Options:
        max_prompt_tokens: int | None = None  # reject prompts longer than this; None: no limit

        def __post_init__(self) -> None:
            if self.max_prompt_tokens is not None and self.max_prompt_tokens < 1:
                raise ValueError(f"max_prompt_tokens must be >= 1 or null, got {self.max_prompt_tokens}")

    def __init__(self, options: Options | None = None) -> None:
        super().__init__(options)
        self.calls = 0      # schedule calls, so tests and users can see the plugin ran
        self.admitted = 0   # waiting sequences this plugin admitted

    @tokenmill.hookimpl
    def schedule(self, state: ScheduleInput) -> SchedulerOutput:
        self.calls += 1
        out = SchedulerOutput()
        limits = state.limits
        budget = limits.max_num_batched_tokens
        for seq in state.running:
            n = seq.num_uncomputed_tokens
            if state.kv.allocate(seq, n):
                out.scheduled.append(ScheduledSeq(seq, n))
                budget -= n
            else:
                out.preempted.append(seq)

        cap = self.options.max_prompt_tokens
        candidates = []
        for seq in state.waiting:
            if cap is not None and seq.prompt_len > cap:
                out.rejected.append((seq, f"prompt has {seq.prompt_len} tokens; the sjf scheduler of this "
                                          f"pipeline accepts at most {cap} (option max_prompt_tokens)"))
            else:
                candidates.append(seq)
        # Python's sort is stable, so equal keys keep the engine's order (preempted first, then arrival).
        candidates.sort(key=lambda s: (s.num_uncomputed_tokens, s.arrival_time))

        num_seqs = len(out.scheduled)
        for seq in candidates:
            n = seq.num_uncomputed_tokens
            if num_seqs >= limits.max_num_seqs:
                break
            if n > budget and out.scheduled:
                break  # candidates are sorted: no later one fits either
            if not state.kv.allocate(seq, n):
                break  # a longer prompt would not fit either; try again next step
            out.scheduled.append(ScheduledSeq(seq, n))
            budget -= n
            num_seqs += 1
            self.admitted += 1
        return out
