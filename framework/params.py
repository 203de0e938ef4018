"""User-facing sampling parameters, validated at construction."""
from __future__ import annotations

import math
from dataclasses import dataclass, field

MIN_TEMPERATURE = 1e-5  # below this (but above 0) logits / T overflows float32: refused, not sampled as NaN
MIN_TOP_P = 1e-6        # below this a float32 nucleus keeps no token


def check_temperature(v) -> None:
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) or v < 0 \
            or 0 < v < MIN_TEMPERATURE:
        raise ValueError(f"temperature must be 0 (greedy) or a finite number >= {MIN_TEMPERATURE:g}, got {v!r}")


def check_top_p(v) -> None:
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) or not MIN_TOP_P <= v <= 1.0:
        raise ValueError(f"top_p must be a finite number in [{MIN_TOP_P:g}, 1] (1 disables it), got {v!r}")


@dataclass(slots=True)
class SamplingParams:
    """How one request is decoded.

    ``temperature == 0`` is greedy decoding. ``top_k == 0`` and ``top_p == 1`` disable those filters.
    ``seed`` makes sampling reproducible per request, independent of what else is batched with it.
    ``stop`` strings end generation and are cut from the text; ``ignore_eos`` keeps going past EOS
    (benchmarks); ``max_tokens`` bounds the generated tokens.
    """

    max_tokens: int = 64
    temperature: float = 0.0
    top_k: int = 0
    top_p: float = 1.0
    seed: int | None = None
    stop: list[str] = field(default_factory=list)
    stop_token_ids: list[int] = field(default_factory=list)
    ignore_eos: bool = False

    def __post_init__(self) -> None:
        if isinstance(self.stop, str):
            self.stop = [self.stop]
        if not isinstance(self.max_tokens, int) or isinstance(self.max_tokens, bool) or self.max_tokens < 1:
            raise ValueError(f"max_tokens must be an integer >= 1, got {self.max_tokens!r}")
        check_temperature(self.temperature)
        if not isinstance(self.top_k, int) or self.top_k < 0:
            raise ValueError(f"top_k must be an integer >= 0 (0 disables it), got {self.top_k!r}")
        check_top_p(self.top_p)
        if any(not isinstance(s, str) or not s for s in self.stop):
            raise ValueError(f"stop must be a list of non-empty strings, got {self.stop!r}")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0
