"""Finishing within the token budget: as a constrained request nears ``max_tokens``, only tokens after which its
grammar can still be completed in the tokens left are allowed, so a JSON answer closes its strings, arrays and
objects before the limit instead of being cut mid-document.

xgrammar has no shortest-completion query, so :meth:`Closer.plan` builds a short completion greedily on the
matcher itself (accept, then roll back): the stop token if the grammar is complete, else the first of ``"``,
``}``, ``]``, ``0``, ``:``, space the grammar accepts (these close strings and containers and fill missing
values in JSON), else the longest token the grammar allows (fixed text, such as a schema's required keys, in the
fewest tokens)."""
from __future__ import annotations

from typing import Any

import torch

from tokenmill.plugins.structured.masks import unpack

SLACK = 16  # a free token may lengthen the completion by at most this much (opening ~4 containers at once)
CANDIDATES = 8  # in the closing zone, the best-scored allowed tokens checked for a completion that still fits
MAX_PLAN = 256  # longest completion searched for; past it the request is left to its grammar alone
CLOSERS = (b'"', b"}", b"]", b"0", b":", b" ")


class Closer:
    """Greedy completions for one tokenizer: ``closers`` are the ids of the single-byte tokens of
    :data:`CLOSERS`, tried in that order; ``stop_id`` ends a complete grammar."""

    def __init__(self, decoded_vocab: list[bytes], vocab_size: int, stop_id: int, words: int) -> None:
        first: dict[bytes, int] = {}
        lengths = torch.zeros(words * 32)
        for i, text in enumerate(decoded_vocab[:vocab_size]):
            lengths[i] = len(text)
            if len(text) == 1 and bytes(text) not in first:
                first[bytes(text)] = i
        lengths[stop_id] = 0
        self.lengths = lengths  # each token's length in bytes (0: the stop token, never a fallback)
        self.closers = [first[c] for c in CLOSERS if c in first]
        self.stop_id = stop_id
        self.scratch = torch.zeros(1, words, dtype=torch.int32)

    def plan(self, matcher: Any, safe: torch.Tensor | None, limit: int = MAX_PLAN) -> list[int] | None:
        """Tokens that complete the grammar from the matcher's state (``[]`` if it is complete), at most ``limit``
        of them, or None if none were found; the matcher is left as it was. ``safe`` (a bitmask row) narrows the
        fallback tokens (JSON: no raw control characters)."""
        out: list[int] = []
        try:
            while True:
                if matcher.accept_token(self.stop_id):
                    matcher.rollback(1)
                    return out
                if len(out) >= limit:
                    return None
                tok = next((t for t in self.closers if matcher.accept_token(t)), None)
                if tok is None:
                    tok = self._fallback(matcher, safe)
                    if tok is None or not matcher.accept_token(tok):
                        return None
                out.append(tok)
        finally:
            if out:
                matcher.rollback(len(out))

    def _fallback(self, matcher: Any, safe: torch.Tensor | None) -> int | None:
        """The longest token the grammar allows next (and ``safe`` keeps), other than the stop token."""
        if not matcher.fill_next_token_bitmask(self.scratch, 0):
            return None
        words = self.scratch[0] if safe is None else self.scratch[0] & safe
        best = self.lengths.masked_fill(~unpack(words), -1.0).argmax()
        return int(best) if self.lengths[best] > 0 and unpack(words)[best] else None

    def narrow(self, matcher: Any, row: torch.Tensor, allowed: torch.Tensor, left: int, plan: list[int],
               safe: torch.Tensor | None, stop_ids: frozenset[int]) -> torch.Tensor:
        """The tokens to allow at a row with ``left`` tokens left (this one included), whose completion ``plan``
        is close to not fitting: of the :data:`CANDIDATES` best-scored ``allowed`` tokens (a bool vector), those
        after which a completion of at most ``left - 1`` tokens exists, and always ``plan[0]``. Greedy decoding
        is unchanged whenever its token still fits."""
        n = min(row.shape[0], allowed.shape[0])
        scores = row[:n].masked_fill(~allowed[:n], float("-inf"))
        top = scores.topk(min(CANDIDATES, scores.shape[0]))
        keep = torch.zeros_like(allowed)
        if plan:
            keep[plan[0]] = True
        for tok in top.indices[torch.isfinite(top.values)].tolist():
            if tok in stop_ids:
                keep[tok] = True
                continue
            if not matcher.accept_token(tok):
                continue
            after = self.plan(matcher, safe, limit=left - 1)
            matcher.rollback(1)
            if after is not None:
                keep[tok] = True
        return keep
