"""HF's ``no_repeat_ngram_size`` for tokenmill: a logits processor packaged as a third-party plugin.

The package declares one entry point (group ``tokenmill.plugins``, name ``norepeat``). A pipeline that
names it accepts the per-request argument ``no_repeat_ngram_size``::

    plugins:
      - norepeat

    SamplingParams(plugin_args={"no_repeat_ngram_size": 3})

and such a request never generates an n-gram (of prompt and output) that already occurred, the way
``transformers``' ``generate(no_repeat_ngram_size=3)`` does. Requests without the argument are left alone.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch

import tokenmill
from tokenmill.hooktypes import VerifyInput
from tokenmill.sequence import Sequence

__all__ = ["NoRepeatNGram", "NGrams", "KEY"]
__version__ = "0.1.0"

KEY = "no_repeat_ngram_size"


@dataclass(slots=True)
class NGrams:
    """One request's n-grams so far, as the tokens seen after each (n - 1)-token prefix; folded in as the
    request grows, never recounted."""

    n: int
    seen: int = 0  # tokens of the sequence folded in: every n-gram ending before this index is in ``after``
    after: dict[tuple[int, ...], set[int]] = field(default_factory=dict)

    def catch_up(self, tokens: list[int]) -> None:
        m = self.n - 1
        for end in range(max(self.seen, m), len(tokens)):
            self.after.setdefault(tuple(tokens[end - m:end]), set()).add(tokens[end])
        self.seen = len(tokens)

    def banned(self, tokens: list[int], follows: list[int]) -> set[int]:
        """The tokens that would repeat an n-gram after ``tokens + follows`` (``tokens`` already caught up)."""
        m = self.n - 1
        if len(tokens) + len(follows) < m:
            return set()
        tail = tokens[max(0, len(tokens) - m):] + follows  # the n-grams ending in ``follows`` lie in here
        prefix = tuple(tail[len(tail) - m:])
        out = set(self.after.get(prefix, ()))
        for end in range(max(len(tail) - len(follows), m), len(tail)):
            if tuple(tail[end - m:end]) == prefix:
                out.add(tail[end])
        return out


class NoRepeatNGram(tokenmill.Plugin):
    """Bans, for requests with ``plugin_args["no_repeat_ngram_size"] = n``, every token that would complete
    an n-gram already present in the prompt and output (HF's ``NoRepeatNGramLogitsProcessor``). Draft rows
    are processed with the drafts before them as context, so speculation stays exact."""

    name = "norepeat"

    def __init__(self, options=None) -> None:
        super().__init__(options)
        self.requests: dict[int, NGrams] = {}  # seq_id -> n-grams, from check_request to request_finished

    @tokenmill.hookimpl
    def request_args(self) -> dict[str, str]:
        return {KEY: "never repeat an n-gram of this many tokens (an integer >= 1), as HF's no_repeat_ngram_size"}

    @tokenmill.hookimpl
    def check_request(self, seq: Sequence) -> None:
        args = seq.params.plugin_args
        if KEY not in args:
            return
        n = args[KEY]
        if not isinstance(n, int) or isinstance(n, bool) or n < 1:
            raise ValueError(f"plugin_args[{KEY!r}] must be an integer >= 1 (the n-gram size), got {n!r}")
        self.requests[seq.seq_id] = NGrams(n)

    @tokenmill.hookimpl
    def request_finished(self, seq: Sequence) -> None:
        self.requests.pop(seq.seq_id, None)

    @tokenmill.hookimpl
    def process_logits(self, batch: VerifyInput) -> None:
        rows: list[int] = []
        ids: list[int] = []
        for i, seq in enumerate(batch.seqs):
            ngrams = self.requests.get(seq.seq_id)
            if ngrams is None:
                continue
            ngrams.catch_up(seq.token_ids)
            for k in range(1 + len(batch.drafts[i])):  # row start + k follows seq.token_ids + follows(i, k)
                banned = ngrams.banned(seq.token_ids, batch.follows(i, k))
                rows += [batch.row_start[i] + k] * len(banned)
                ids += banned
        if rows:
            dev = batch.logits.device
            batch.logits[torch.tensor(rows, device=dev), torch.tensor(ids, device=dev)] = float("-inf")
