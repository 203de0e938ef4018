"""``prompt_lookup``: drafts copied from earlier in the prompt/output where the last n-gram occurred."""
from __future__ import annotations

from dataclasses import dataclass

from tokenmill.plugins.speculative.base import DrafterPlugin
from tokenmill.sequence import Sequence


def lookup(tokens: list[int], max_ngram: int, min_ngram: int, k: int, window: int) -> list[int]:
    """The ``k`` tokens that followed the most recent earlier occurrence of the longest trailing n-gram."""
    n_tok = len(tokens)
    start = max(0, n_tok - window)
    for n in range(min(max_ngram, n_tok - 1), min_ngram - 1, -1):
        tail = tokens[n_tok - n:]
        first = tail[0]
        for i in range(n_tok - n - 1, start - 1, -1):  # most recent match first
            if tokens[i] == first and tokens[i:i + n] == tail:
                follow = tokens[i + n:i + n + k]
                if follow:
                    return follow
    return []


class PromptLookup(DrafterPlugin):
    """No draft model: finds the last ``max_ngram``..``min_ngram`` tokens earlier in the sequence and
    proposes what came next. Strong on input-grounded tasks (editing, summarising, code rewrites)."""

    name = "prompt_lookup"

    @dataclass(slots=True)
    class Options(DrafterPlugin.Options):
        max_ngram: int = 3
        min_ngram: int = 1
        search_window: int = 4096

        def __post_init__(self) -> None:
            DrafterPlugin.Options.__post_init__(self)
            if not 1 <= self.min_ngram <= self.max_ngram:
                raise ValueError(f"need 1 <= min_ngram <= max_ngram, got {self.min_ngram}, {self.max_ngram}")

    def draft(self, seqs: list[Sequence]) -> list[list[int]]:
        o = self.options
        return [lookup(s.token_ids, o.max_ngram, o.min_ngram, o.num_speculative_tokens, o.search_window)
                for s in seqs]
