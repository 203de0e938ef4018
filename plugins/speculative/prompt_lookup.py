"""``prompt_lookup``: drafts copied from earlier in the prompt/output where the last n-gram occurred."""
from __future__ import annotations

from dataclasses import dataclass

from tokenmill.plugins.speculative.base import DrafterPlugin
from tokenmill.sequence import Sequence
from tokenmill.speculation import Draft


def lookup(tokens: list[int], max_ngram: int, min_ngram: int, k: int, window: int) -> list[int]:
    """The ``k`` tokens that followed the most recent earlier occurrence of the longest trailing n-gram."""
    return lookup_match(tokens, max_ngram, min_ngram, k, window)[0]


def lookup_match(tokens: list[int], max_ngram: int, min_ngram: int, k: int, window: int
                 ) -> tuple[list[int], int]:
    """Like :func:`lookup`, also returning the length of the n-gram that matched (0: none)."""
    n_tok = len(tokens)
    start = max(0, n_tok - window)
    for n in range(min(max_ngram, n_tok - 1), min_ngram - 1, -1):
        tail = tokens[n_tok - n:]
        first = tail[0]
        for i in range(n_tok - n - 1, start - 1, -1):  # most recent match first
            if tokens[i] == first and tokens[i:i + n] == tail:
                follow = tokens[i + n:i + n + k]
                if follow:
                    return follow, n
    return [], 0


class PromptLookup(DrafterPlugin):
    """No draft model: finds the last ``max_ngram``..``min_ngram`` tokens earlier in the sequence and
    proposes what came next. Strong on input-grounded tasks (editing, summarising, code rewrites).

    A short match is weak evidence, so a match shorter than ``full_draft_ngram`` proposes at most
    ``short_draft_tokens`` tokens: verifying 2-3 tokens costs about one plain decode step on a CPU
    (a GEMV-like GEMM), verifying ``num_speculative_tokens`` costs more, and pays only when the copy runs on.
    """

    name = "prompt_lookup"

    @dataclass(slots=True)
    class Options(DrafterPlugin.Options):
        max_ngram: int = 3
        min_ngram: int = 1
        search_window: int = 4096
        full_draft_ngram: int | None = None  # matches this long (default: max_ngram) propose every token
        short_draft_tokens: int | None = None  # shorter matches propose at most this many (None: no cap)

        def __post_init__(self) -> None:
            DrafterPlugin.Options.__post_init__(self)
            if not 1 <= self.min_ngram <= self.max_ngram:
                raise ValueError(f"need 1 <= min_ngram <= max_ngram, got {self.min_ngram}, {self.max_ngram}")
            if self.full_draft_ngram is not None and not 1 <= self.full_draft_ngram <= self.max_ngram:
                raise ValueError(f"full_draft_ngram must be in 1..max_ngram ({self.max_ngram}), "
                                 f"got {self.full_draft_ngram}")
            if self.short_draft_tokens is not None and self.short_draft_tokens < 1:
                raise ValueError(f"short_draft_tokens must be >= 1, got {self.short_draft_tokens}")

    def cheap_drafts(self, seqs: list[Sequence]) -> list[Draft]:
        return self.copies(seqs, self.options.num_speculative_tokens)  # a lookup costs next to nothing

    def draft(self, seqs: list[Sequence], depth: int, *, hidden: list, kv) -> list[Draft]:
        return self.copies(seqs, depth)

    def copies(self, seqs: list[Sequence], depth: int) -> list[Draft]:
        """Each sequence's copy (empty: no match), of kind the n-gram length it matched."""
        o = self.options
        full = o.full_draft_ngram or o.max_ngram
        out = []
        for s in seqs:
            follow, n = lookup_match(s.token_ids, o.max_ngram, o.min_ngram, min(depth, o.num_speculative_tokens),
                                     o.search_window)
            if o.short_draft_tokens is not None and n < full:
                follow = follow[:o.short_draft_tokens]
            out.append(Draft(follow, kind=n))
        return out
