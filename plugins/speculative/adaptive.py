"""A measured on/off switch for speculation, per batch-size bucket.

Speculation pays while verifying k extra tokens is nearly free (memory-bound decode) and costs throughput
once the batch is large enough to be compute-bound. Instead of guessing the crossover, the switch measures
generated tokens per second of decode steps with speculation on and off for each batch-size bucket, keeps
an exponential moving average of each, explores an arm until it has a few samples, then picks the faster.
"""
from __future__ import annotations

import math


class AdaptiveSwitch:
    def __init__(self, *, min_samples: int = 3, alpha: float = 0.3, reexplore_every: int = 64,
                 always_below: int = 1, never_above: int | None = None) -> None:
        self.min_samples = min_samples
        self.alpha = alpha
        self.reexplore_every = reexplore_every
        self.always_below = always_below
        self.never_above = never_above
        self.rate: dict[tuple[int, bool], float] = {}
        self.count: dict[tuple[int, bool], int] = {}
        self.decisions = 0
        self.last: tuple[int, bool] | None = None

    @staticmethod
    def bucket(batch: int) -> int:
        return 1 << max(0, math.ceil(math.log2(max(batch, 1))))

    def decide(self, batch: int) -> bool:
        """Speculate for a step of ``batch`` decoding sequences?"""
        if self.never_above is not None and batch > self.never_above:
            self.last = None
            return False
        if batch <= self.always_below:
            choice = True
        else:
            b = self.bucket(batch)
            on, off = self.count.get((b, True), 0), self.count.get((b, False), 0)
            self.decisions += 1
            if on < self.min_samples or off < self.min_samples:
                choice = on <= off
            elif self.decisions % self.reexplore_every == 0:
                choice = not (self.rate[(b, True)] >= self.rate[(b, False)])  # occasionally re-check
            else:
                choice = self.rate[(b, True)] >= self.rate[(b, False)]
        self.last = (self.bucket(batch), choice)
        return choice

    def observe(self, generated_tokens: int, duration_s: float) -> None:
        """Feed back the measured outcome of the step decided last (decode-only steps)."""
        if self.last is None or duration_s <= 0:
            return
        key = self.last
        r = generated_tokens / duration_s
        self.rate[key] = r if key not in self.rate else (1 - self.alpha) * self.rate[key] + self.alpha * r
        self.count[key] = self.count.get(key, 0) + 1
        self.last = None

    def snapshot(self) -> dict:
        return {f"batch<={b} {'on' if on else 'off'}": round(r, 2) for (b, on), r in sorted(self.rate.items())}
