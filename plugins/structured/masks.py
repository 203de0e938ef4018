"""Vocabulary bitmasks: one int32 word per 32 tokens (bit ``t % 32`` of word ``t // 32`` set = token ``t``
allowed), filled by the grammar matchers and applied to all constrained logits rows in one kernel call."""
from __future__ import annotations

import importlib.util

import torch


class Bitmasks:
    """A reusable CPU buffer with one bitmask row per logits row of a step (grown when a step has more rows),
    the row that allows only the stop tokens, and the apply step (xgrammar's kernels: C++ on the CPU, triton
    on CUDA where it is installed, plain torch elsewhere)."""

    def __init__(self, xgr, vocab_size: int, stop_token_ids: list[int]) -> None:
        self.xgr, self.vocab_size = xgr, vocab_size
        self.words = (vocab_size + 31) // 32
        self.buffer = torch.zeros(0, self.words, dtype=torch.int32)
        only = torch.zeros(self.words * 32, dtype=torch.bool)
        only[list(stop_token_ids)] = True
        self.stop_only = pack(only)

    def rows(self, n: int) -> torch.Tensor:
        """A ``[n, words]`` int32 buffer (its contents are stale: only rows written are applied)."""
        if self.buffer.shape[0] < n:
            self.buffer = torch.zeros(max(n, 2 * self.buffer.shape[0]), self.words, dtype=torch.int32)
        return self.buffer[:n]

    def apply(self, logits: torch.Tensor, masks: torch.Tensor, rows: list[int]) -> None:
        """Set ``logits[r]`` to -inf outside ``masks[r]``'s tokens for every ``r`` in ``rows``, in place; tokens
        past the grammar's vocabulary are banned too."""
        if logits.shape[1] > self.vocab_size:
            logits[torch.tensor(rows, device=logits.device), self.vocab_size:] = float("-inf")
        if logits.device.type == "cpu":
            backend = "cpu"
        else:
            masks = masks.to(logits.device, non_blocking=True)
            backend = "auto" if logits.device.type != "cuda" or importlib.util.find_spec("triton") else "torch_native"
        self.xgr.apply_token_bitmask_inplace(logits, masks, vocab_size=min(self.vocab_size, logits.shape[1]),
                                             indices=rows, backend=backend)


def pack(allowed: torch.Tensor) -> torch.Tensor:
    """The bitmask row (int32 words) of a bool vector whose length is a multiple of 32."""
    bits = allowed.view(-1, 32).to(torch.int64) << torch.arange(32, dtype=torch.int64)
    words = bits.sum(dim=1)
    return torch.where(words >= 2**31, words - 2**32, words).to(torch.int32)


def unpack(words: torch.Tensor) -> torch.Tensor:
    """The bool vector (``32 * len(words)`` long) of one bitmask row."""
    return ((words.unsqueeze(1) >> torch.arange(32, dtype=torch.int32)) & 1).bool().flatten()
