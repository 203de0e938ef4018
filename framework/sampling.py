"""Sampling math shared by plugins: the sampled distribution (temperature, top-k, top-p, min-p) and draws.

Every random draw is a pure function of the request's seed and the position of the token being drawn
(:func:`draw`): the token at position ``t`` is ``argmax(p / E_t)`` over the vocabulary, where ``E_t`` is
exponential noise generated from ``(seed, t)`` alone (the Gumbel-max trick in its exponential-race form,
an exact sample from ``p``). So a seeded request gets the same tokens whatever it is batched with, whatever
is aborted beside it, and whether or not it speculates: a drafter that samples draws its token for position
``t`` with the same noise, and verification (:func:`verify_drafts`, :func:`verify_tree`) accepts a draft
exactly when it is the token the target draws there (the coupling of draft and target through shared
noise). The emitted tokens are the ones plain sampling gives with that seed.
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


def sample_next(logits: torch.Tensor, params_list: list[SamplingParams], seeds: list[int],
                positions: list[int]) -> list[int]:
    """Sample one token per row of ``logits`` (``[rows, vocab]``), greedy rows in one argmax; row ``i`` is the
    token at ``positions[i]`` of a request seeded ``seeds[i]``."""
    out = logits.argmax(-1).tolist()
    for row, params in enumerate(params_list):
        if not params.greedy:
            out[row] = draw(filtered_probs(logits[row], params), seeds[row], positions[row])
    return out


def verify_drafts(logits: torch.Tensor, drafts: list[int], params: SamplingParams, seed: int,
                  position: int) -> list[int]:
    """Accept a prefix of ``drafts`` and append one token from the target, keeping the target's law exactly.

    :param logits: ``[len(drafts) + 1, vocab]`` target logits, row ``i`` predicting the token after draft
        ``i - 1`` (row 0 after the last accepted token), i.e. the token at ``position + i``.
    :return: at each row the target's own token (its argmax, or its :func:`draw` at that position); the
        walk goes on while that token equals the draft. Every emitted token is the one plain decoding emits.
    """
    return verify_tree(logits, drafts, list(range(-1, len(drafts) - 1)), params, seed, position)


def tree_children(parents: list[int]) -> dict[int, list[int]]:
    """``parents[i]`` (``-1``: the root, i.e. the last accepted token) -> children lists, in draft order."""
    children: dict[int, list[int]] = {}
    for i, p in enumerate(parents):
        children.setdefault(p, []).append(i)
    return children


def tree_path(drafts: list[int], parents: list[int], accepted: list[int]) -> list[int]:
    """The draft indices along the tree path that ``accepted`` (accepted drafts + one target token) took."""
    children = tree_children(parents)
    node, path = -1, []
    for tok in accepted[:-1]:
        node = next(c for c in children.get(node, []) if drafts[c] == tok)
        path.append(node)
    return path


def verify_tree(logits: torch.Tensor, drafts: list[int], parents: list[int], params: SamplingParams,
                seed: int, position: int) -> list[int]:
    """Accept a path of a draft *tree* (deterministic drafts) and append one target token, exactly.

    :param logits: ``[len(drafts) + 1, vocab]``: row 0 after the last accepted token, row ``i + 1`` after
        draft ``i`` (which followed its ancestors).
    :param parents: parent index of each draft (``-1`` = the root); siblings carry distinct tokens.
    :param position: where the first emitted token goes (a node at depth ``d`` predicts ``position + d``).
    :return: the tokens along the accepted path, then one token from the target. At each node the target's
        token is chosen (argmax, or a draw from the filtered distribution) and the walk goes on into the
        child holding that token, if any: every emitted token is the target's own choice, so the law is the
        target's exactly.
    """
    children = tree_children(parents)
    node, out = -1, []
    while True:
        row = logits[node + 1]
        tok = int(row.argmax()) if params.greedy else draw(filtered_probs(row, params), seed, position + len(out))
        out.append(tok)
        nxt = next((c for c in children.get(node, []) if drafts[c] == tok), None)
        if nxt is None:
            return out
        node = nxt
