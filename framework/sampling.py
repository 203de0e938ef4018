"""Sampling math shared by plugins: the sampled distribution (temperature, top-k, top-p, min-p) and draws.

Every random draw is a pure function of the request's seed and the position of the token being drawn
(:func:`draw`): the token at position ``t`` is ``argmax(p / E_t)`` over the vocabulary, where ``E_t`` is
exponential noise generated from ``(seed, t)`` alone (the Gumbel-max trick in its exponential-race form,
an exact sample from ``p``). So a seeded request gets the same tokens whatever it is batched with, whatever
is aborted beside it, and whether or not it speculates: a drafter that samples draws its token for position
``t`` with the same noise, and verification (``tokenmill.speculation.accept``) accepts a draft
exactly when it is the token the target draws there (the coupling of draft and target through shared
noise). The emitted tokens are the ones plain sampling gives with that seed. Verification itself lives in
:mod:`tokenmill.speculation.accept`.
"""
from __future__ import annotations

import torch

from tokenmill.params import SamplingParams

_MASK64 = (1 << 64) - 1


def filtered_probs(logits: torch.Tensor, params: SamplingParams) -> torch.Tensor:
    """The distribution ``params`` samples from: softmax(logits / T) restricted by top-k, top-p, then min-p
    (HF's warper order).

    :param logits: ``[..., vocab]`` raw logits.
    :return: float32 probabilities, renormalised, zero outside the kept set. For ``temperature == 0``
        a one-hot of the argmax.
    """
    logits = logits.float()
    if params.greedy:
        return torch.nn.functional.one_hot(logits.argmax(-1), logits.shape[-1]).float()
    logits = logits / params.temperature
    if params.top_k and params.top_k < logits.shape[-1]:
        kth = torch.topk(logits, params.top_k, dim=-1).values[..., -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    probs = torch.softmax(logits, dim=-1)
    if params.top_p < 1.0:
        sorted_p, idx = torch.sort(probs, dim=-1, descending=True)
        cum = torch.cumsum(sorted_p, dim=-1)
        drop_sorted = (cum - sorted_p) >= params.top_p  # keep the smallest prefix reaching top_p
        drop = torch.zeros_like(drop_sorted).scatter(-1, idx, drop_sorted)
        probs = probs.masked_fill(drop, 0.0)
        probs = probs / probs.sum(-1, keepdim=True)
    if params.min_p > 0.0:
        floor = params.min_p * probs.max(-1, keepdim=True).values
        probs = probs.masked_fill(probs < floor, 0.0)
        probs = probs / probs.sum(-1, keepdim=True)
    return probs


def position_seed(seed: int, position: int) -> int:
    """A 63-bit generator seed for the draw at ``position`` of a request seeded ``seed`` (splitmix64 of both)."""
    z = (seed * 0x9E3779B97F4A7C15 + (position + 1) * 0xD1B54A32D192ED03) & _MASK64
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & _MASK64
    return (z ^ (z >> 31)) >> 1


def position_noise(seed: int, position: int, vocab: int) -> torch.Tensor:
    """Exponential(1) noise ``[vocab]`` (float64, on the CPU whatever the model's device, so the same on every
    machine and for every vocabulary width's prefix) for the draw at ``position``: a function of the two only."""
    gen = torch.Generator().manual_seed(position_seed(seed, position))
    u = torch.rand(vocab, generator=gen, dtype=torch.float64)
    return -torch.log1p(-u)  # u in [0, 1): noise in [0, inf)


def draw(probs: torch.Tensor, seed: int, position: int) -> int:
    """The token at ``position`` drawn from the 1-D distribution ``probs`` with the request's ``seed``."""
    e = position_noise(seed, position, probs.shape[-1])
    p = probs.detach().to("cpu", torch.float64)
    return int(torch.where(p > 0, p / e, -1.0).argmax())


def greedy_tokens(logits: torch.Tensor) -> list[int]:
    """Each row's argmax (``[rows, vocab]``; its first maximum, as ``torch.argmax``, NaN counted as the maximum).

    On CPU ``argmax`` over a vocabulary is a scalar loop (~50 us a 49,152-wide row here, 1.9 ms for 64 rows),
    while a max over short contiguous blocks is vectorized: so the maximum of each block of 256 (or 128, 64, 32)
    logits, the first block holding the row's maximum, and the first maximum inside it (~20 us for one row,
    0.2 ms for 64). Other devices, and vocabularies no such block divides, take ``argmax``."""
    rows, n = logits.shape
    size = next((b for b in (256, 128, 64, 32) if n % b == 0), 0)
    if logits.device.type != "cpu" or not size or not logits.is_contiguous():
        return logits.argmax(-1).tolist()
    blocks = logits.view(rows, n // size, size)
    block = blocks.amax(-1).argmax(-1)
    inner = blocks.gather(1, block.view(rows, 1, 1).expand(rows, 1, size)).view(rows, size).argmax(-1)
    return (block * size + inner).tolist()


def sample_next(logits: torch.Tensor, params_list: list[SamplingParams], seeds: list[int],
                positions: list[int]) -> list[int]:
    """Sample one token per row of ``logits`` (``[rows, vocab]``), greedy rows in one :func:`greedy_tokens`; row
    ``i`` is the token at ``positions[i]`` of a request seeded ``seeds[i]``."""
    out = greedy_tokens(logits)
    for row, params in enumerate(params_list):
        if not params.greedy:
            out[row] = draw(filtered_probs(logits[row], params), seeds[row], positions[row])
    return out
