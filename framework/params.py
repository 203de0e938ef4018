"""User-facing sampling parameters, validated at construction."""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

MIN_TEMPERATURE = 1e-5  # below this (but above 0) logits / T overflows float32: refused, not sampled as NaN
MIN_TOP_P = 1e-6        # below this a float32 nucleus keeps no token


def _is_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def check_temperature(v) -> None:
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) or v < 0 \
            or 0 < v < MIN_TEMPERATURE:
        raise ValueError(f"temperature must be 0 (greedy) or a finite number >= {MIN_TEMPERATURE:g}, got {v!r}")


def check_top_p(v) -> None:
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) or not MIN_TOP_P <= v <= 1.0:
        raise ValueError(f"top_p must be a finite number in [{MIN_TOP_P:g}, 1] (1 disables it), got {v!r}")


def _number(v, name: str, lo: float, hi: float, what: str) -> None:
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) or not lo <= v <= hi:
        raise ValueError(f"{name} must be a finite number in [{lo:g}, {hi:g}] ({what}), got {v!r}")


MAX_LOGPROBS = 20  # top alternatives reported per token at most (OpenAI's limit)


@dataclass(slots=True)
class SamplingParams:
    """How one request is decoded.

    ``temperature == 0`` is greedy decoding. ``top_k == 0``, ``top_p == 1`` and ``min_p == 0`` disable those
    filters (``min_p`` keeps tokens whose probability is at least ``min_p`` times the top token's).
    ``seed`` makes sampling reproducible per request, independent of what else is batched with it.
    ``stop`` strings end generation and are cut from the text; ``stop_token_ids`` end it on those tokens;
    ``ignore_eos`` keeps going past EOS (benchmarks); ``max_tokens`` bounds the generated tokens.

    Logits processing (the built-in ``logits_processors`` plugin, before sampling; the names and formulas of
    HF's processors and OpenAI's API): ``repetition_penalty`` (> 1 discourages every token already in the
    prompt or output: positive logits divided by it, negative ones multiplied), ``presence_penalty`` and
    ``frequency_penalty`` (subtracted once per generated token seen / per occurrence), ``logit_bias``
    (token id -> added to its logit, -100..100), ``min_tokens`` (EOS and ``stop_token_ids`` are banned
    until that many tokens are generated), ``bad_words`` (strings never generated: each is tokenized with
    and without a leading space) and ``bad_words_ids`` (token-id sequences never completed; a one-id
    sequence bans that token).

    ``logprobs``: None for none; else each generated token's log-probability under the model's raw
    distribution (``log_softmax`` of its logits, before any processing) and that many top alternatives
    (0..20). ``plugin_args``: per-request arguments for the pipeline's plugins (e.g. ``{"priority": 2}``
    for a priority scheduler); each key must be one some plugin declares (``request_args`` hook), and that
    plugin checks its value when the request is submitted.
    """

    max_tokens: int = 64
    temperature: float = 0.0
    top_k: int = 0
    top_p: float = 1.0
    seed: int | None = None
    stop: list[str] = field(default_factory=list)
    stop_token_ids: list[int] = field(default_factory=list)
    ignore_eos: bool = False
    min_p: float = 0.0
    repetition_penalty: float = 1.0
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    logit_bias: dict[int, float] = field(default_factory=dict)
    min_tokens: int = 0
    bad_words: list[str] = field(default_factory=list)
    bad_words_ids: list[list[int]] = field(default_factory=list)
    logprobs: int | None = None
    plugin_args: dict[str, Any] = field(default_factory=dict)

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
        if not isinstance(self.stop_token_ids, list) or any(not _is_int(t) or t < 0 for t in self.stop_token_ids):
            raise ValueError(f"stop_token_ids must be a list of token ids (integers >= 0), got {self.stop_token_ids!r}")
        _number(self.min_p, "min_p", 0.0, 1.0, "0 disables it")
        if isinstance(self.repetition_penalty, bool) or not isinstance(self.repetition_penalty, (int, float)) \
                or not math.isfinite(self.repetition_penalty) or self.repetition_penalty <= 0:
            raise ValueError(f"repetition_penalty must be a finite number > 0 (1 disables it), "
                             f"got {self.repetition_penalty!r}")
        _number(self.presence_penalty, "presence_penalty", -2.0, 2.0, "0 disables it")
        _number(self.frequency_penalty, "frequency_penalty", -2.0, 2.0, "0 disables it")
        if not isinstance(self.logit_bias, dict):
            raise ValueError(f"logit_bias must map token ids to biases in [-100, 100], got {self.logit_bias!r}")
        bias = {}
        for k, v in self.logit_bias.items():
            tok = int(k) if isinstance(k, str) and k.lstrip("-").isdigit() else k  # JSON object keys are strings
            if not _is_int(tok) or tok < 0:
                raise ValueError(f"logit_bias keys must be token ids (integers >= 0), got {k!r}")
            _number(v, f"logit_bias[{tok}]", -100.0, 100.0, "added to the token's logit")
            bias[tok] = float(v)
        self.logit_bias = bias
        if not _is_int(self.min_tokens) or self.min_tokens < 0:
            raise ValueError(f"min_tokens must be an integer >= 0, got {self.min_tokens!r}")
        if isinstance(self.bad_words, str):
            self.bad_words = [self.bad_words]
        if any(not isinstance(w, str) or not w for w in self.bad_words):
            raise ValueError(f"bad_words must be a list of non-empty strings, got {self.bad_words!r}")
        if not isinstance(self.bad_words_ids, list) or any(
                not isinstance(w, list) or not w or any(not _is_int(t) or t < 0 for t in w) for w in self.bad_words_ids):
            raise ValueError("bad_words_ids must be a list of non-empty lists of token ids (integers >= 0), "
                             f"got {self.bad_words_ids!r}")
        if self.logprobs is not None and (not _is_int(self.logprobs) or not 0 <= self.logprobs <= MAX_LOGPROBS):
            raise ValueError(f"logprobs must be None (off) or an integer in [0, {MAX_LOGPROBS}] (top alternatives "
                             f"per token), got {self.logprobs!r}")
        if not isinstance(self.plugin_args, dict) or any(not isinstance(k, str) for k in self.plugin_args):
            raise ValueError(f"plugin_args must be a mapping from argument names (strings) to values, "
                             f"got {self.plugin_args!r}")

    @property
    def processes_logits(self) -> bool:
        """Whether the built-in logits processors have anything to do for this request."""
        return bool(self.repetition_penalty != 1.0 or self.presence_penalty or self.frequency_penalty
                    or self.logit_bias or self.min_tokens or self.bad_words or self.bad_words_ids)

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0
