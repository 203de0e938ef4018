"""Acceptance rules: which drafted tokens a step keeps, and the one token the target adds.

* exact (:func:`verify_drafts`, :func:`verify_tree`): at each position the target's own token (argmax, or its
  seeded draw, :func:`tokenmill.sampling.draw`), walking on while a draft holds it. Every emitted token is
  the one plain decoding emits, greedy or sampled.
* typical (:func:`typical_accept`, :func:`typical_accept_tree`, Medusa's rule): a draft ``x`` is kept when
  ``p(x) > min(epsilon, delta * exp(-H(p)))``; faster at temperature > 0, but not the target's law exactly.
"""
from __future__ import annotations

import math

import torch

from tokenmill.params import SamplingParams
from tokenmill.sampling import draw, filtered_probs, greedy_tokens
from tokenmill.speculation.tree import tree_children


def verify_drafts(logits: torch.Tensor, drafts: list[int], params: SamplingParams, seed: int,
                  position: int) -> list[int]:
    """Accept a prefix of ``drafts`` and append one token from the target, keeping the target's law exactly.

    :param logits: ``[len(drafts) + 1, vocab]`` target logits, row ``i`` predicting the token after draft
        ``i - 1`` (row 0 after the last accepted token), i.e. the token at ``position + i``.
    :return: at each row the target's own token (its argmax, or its :func:`draw` at that position); the
        walk goes on while that token equals the draft. Every emitted token is the one plain decoding emits.
    """
    return verify_tree(logits, drafts, list(range(-1, len(drafts) - 1)), params, seed, position)


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
    best = greedy_tokens(logits) if params.greedy else None  # every row's argmax at once: cheaper than row by row
    node, out = -1, []
    while True:
        tok = best[node + 1] if best is not None else draw(filtered_probs(logits[node + 1], params), seed,
                                                            position + len(out))
        out.append(tok)
        nxt = next((c for c in children.get(node, []) if drafts[c] == tok), None)
        if nxt is None:
            return out
        node = nxt


def typical_accept(logits: torch.Tensor, drafts: list[int], params, seed: int, position: int, epsilon: float,
                   delta: float) -> list[int]:
    """Medusa typical acceptance along a chain, then one token sampled from the target (``position``: where
    the first emitted token goes)."""
    out = []
    for i, tok in enumerate(drafts):
        p = filtered_probs(logits[i], params)
        entropy = float(-(p * torch.log(p.clamp_min(1e-12))).sum())
        if float(p[tok]) > min(epsilon, delta * math.exp(-entropy)):
            out.append(tok)
        else:
            break
    out.append(draw(filtered_probs(logits[len(out)], params), seed, position + len(out)))
    return out


def typical_accept_tree(logits: torch.Tensor, drafts: list[int], parents: list[int], params, seed: int,
                        position: int, epsilon: float, delta: float) -> list[int]:
    """Typical acceptance down a candidate tree: at each node the child the target finds most likely among
    those passing the criterion, then one token sampled from the target after the last accepted node."""
    children = tree_children(parents)
    node, out = -1, []
    while True:
        p = filtered_probs(logits[node + 1], params)
        entropy = float(-(p * torch.log(p.clamp_min(1e-12))).sum())
        bound = min(epsilon, delta * math.exp(-entropy))
        ok = [c for c in children.get(node, []) if float(p[drafts[c]]) > bound]
        if not ok:
            out.append(draw(p, seed, position + len(out)))
            return out
        node = max(ok, key=lambda c: float(p[drafts[c]]))
        out.append(drafts[node])
