"""The draft tree: what a drafter proposes (:class:`Draft`, a chain or a tree), the attention mask a tree is
verified under, the path the target accepted and the K/V moves that compact that path.

A tree's nodes are numbered in draft order, ``parents[i]`` naming node ``i``'s parent (``-1``: the last
accepted token, the root). The forward places node ``i`` at position ``root + depth(i)`` and writes its K/V
to the next slot in draft order; after verification the accepted path's K/V moves to consecutive positions
(:func:`compaction`) and the rest is trimmed.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch


@dataclass(slots=True)
class Draft:
    """Draft tokens proposed for one sequence.

    A drafter that samples draws the token for position ``t`` with ``tokenmill.sampling.draw(q, seq.seed,
    t)``: the same noise the target's draw at ``t`` uses, so verification accepts it exactly when it is the
    target's own token there (a draft drawn any other way is still verified exactly, just accepted less).

    ``parents`` makes the drafts a *tree* verified in one forward (a tree attention mask): ``parents[i]`` is
    the index of token ``i``'s parent among ``tokens`` (earlier in the list), or ``-1`` for a child of the
    last accepted token; siblings must carry distinct tokens. None means a chain (``parents[i] == i - 1``).

    ``kind`` is the drafter's label for how the draft was found (e.g. the length of the n-gram a copy
    matched): the draft-depth planner (:mod:`tokenmill.speculation.budget`) learns acceptance per kind. The
    engine ignores it.
    """

    tokens: list[int]
    parents: list[int] | None = field(default=None, kw_only=True)
    kind: int = field(default=0, kw_only=True)

    def cut(self, room: int) -> "Draft":
        """At most ``room`` tokens deep: a chain keeps its first ``room`` tokens, a tree its nodes of depth <=
        ``room`` (renumbered). Raises ValueError for a malformed tree (bad parents, repeated siblings)."""
        if self.parents is None:
            return Draft(self.tokens[:room], kind=self.kind)
        parents = self.parents
        if len(parents) != len(self.tokens) or any(not -1 <= p < i for i, p in enumerate(parents)):
            raise ValueError(f"draft tree parents {parents} must give each of the {len(self.tokens)} tokens an "
                             "earlier parent index or -1")
        if len(set(zip(parents, self.tokens))) != len(parents):
            raise ValueError("sibling draft-tree nodes repeat a token")
        keep, index = [], {-1: -1}
        for i, depth in enumerate(self.depths()):
            if depth <= room:
                index[i] = len(keep)
                keep.append(i)
        return Draft([self.tokens[i] for i in keep], parents=[index[parents[i]] for i in keep], kind=self.kind)

    def depths(self) -> list[int]:
        """1-based depth of each draft token (its offset from the last accepted token)."""
        if self.parents is None:
            return list(range(1, len(self.tokens) + 1))
        out: list[int] = []
        for p in self.parents:
            out.append(1 if p < 0 else out[p] + 1)
        return out


def tree_mask(parents: list[int]) -> torch.Tensor:
    """``[n+1, n+1]`` bool: token ``a`` (0 = the root, ``i + 1`` = draft ``i``) may attend to token ``b``, its
    ancestor or itself (so row ``i + 1`` holds ``depth(i) + 1`` trues)."""
    n = len(parents)
    m = torch.eye(n + 1, dtype=torch.bool)
    m[:, 0] = True
    for i, p in enumerate(parents):
        m[i + 1] |= m[p + 1]
    return m


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


def compaction(path: list[int], start: int) -> tuple[list[int], list[int]]:
    """(source, destination) positions that move an accepted path's K/V to consecutive slots: node ``j`` of
    the path (its draft index) sits at ``start + j`` and belongs at ``start + k`` for the path's ``k``-th node;
    nodes already in place are left out."""
    moved = [(start + j, start + k) for k, j in enumerate(path) if j != k]
    return [a for a, _ in moved], [b for _, b in moved]
