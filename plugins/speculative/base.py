"""Shared behaviour of drafter plugins: options, the adaptive switch, statistics."""
from __future__ import annotations

from dataclasses import dataclass

from tokenmill.hooktypes import StepStats
from tokenmill.plugin import Plugin, hookimpl
from tokenmill.plugins.speculative.adaptive import AdaptiveSwitch
from tokenmill.sequence import Sequence


class DrafterPlugin(Plugin):
    """Subclasses implement :meth:`draft`; this class decides when to speculate at all."""

    @dataclass(slots=True)
    class Options:
        num_speculative_tokens: int = 4
        adaptive: bool = True                   # measure and switch speculation off where it costs throughput
        max_batch_size: int | None = None       # never speculate above this many decoding sequences

        def __post_init__(self) -> None:
            if not 1 <= self.num_speculative_tokens <= 16:
                raise ValueError(f"num_speculative_tokens must be in 1..16, got {self.num_speculative_tokens}")
            if self.max_batch_size is not None and self.max_batch_size < 1:
                raise ValueError(f"max_batch_size must be >= 1, got {self.max_batch_size}")

    def __init__(self, options=None) -> None:
        super().__init__(options)
        self.switch = AdaptiveSwitch(never_above=self.options.max_batch_size)
        self.batch_limit = self.options.max_batch_size  # a drafter may lower it where its fast path ends
        self.steps_on = 0
        self.steps_off = 0

    def draft(self, seqs: list[Sequence]) -> list:
        raise NotImplementedError

    def ready(self) -> bool:
        """Whether the drafter can draft yet (one preparing in the background is not: no speculation then)."""
        return True

    @hookimpl
    def propose_tokens(self, seqs: list[Sequence]):
        if not self.ready():
            self.steps_off += 1
            return None
        decoding = [s for s in seqs if s.num_output_tokens > 0]
        self.switch.never_above = self.batch_limit
        on = self.switch.decide(len(seqs)) if self.options.adaptive else (
            self.batch_limit is None or len(seqs) <= self.batch_limit)
        if not on or not decoding:
            self.steps_off += 1
            if not decoding:
                self.switch.last = None  # a prefill step says nothing about decode speed
            return None
        self.steps_on += 1
        return self.draft(seqs)

    @hookimpl
    def step_end(self, stats: StepStats) -> None:
        if stats.num_prefill_tokens == 0:
            self.switch.observe(stats.num_generated_tokens, stats.duration_s)
        else:
            self.switch.last = None
