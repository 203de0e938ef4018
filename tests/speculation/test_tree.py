"""The draft tree: depth cuts, the attention mask, the accepted path and the K/V moves that compact it."""
from __future__ import annotations

import pytest
import torch

from tokenmill.speculation import Draft, compaction, tree_mask, tree_path

#         0   1   2   3   4      node 2 and 3 are children of 0, node 4 of 3
PARENTS = [-1, -1, 0, 0, 3]
TOKENS = [10, 11, 20, 21, 30]


def test_cut_keeps_nodes_by_depth_and_renumbers():
    assert Draft(TOKENS, parents=PARENTS).cut(2) == Draft([10, 11, 20, 21], parents=[-1, -1, 0, 0])
    assert Draft([5, 6, 7]).cut(2) == Draft([5, 6])
    assert Draft(TOKENS, parents=PARENTS).depths() == [1, 1, 2, 2, 3]
    with pytest.raises(ValueError, match="repeat a token"):
        Draft([1, 1], parents=[-1, -1]).cut(3)


def test_mask_lets_each_node_see_its_ancestors_only():
    m = tree_mask(PARENTS)
    assert m.shape == (6, 6) and bool(m[:, 0].all())
    assert m[5].nonzero().flatten().tolist() == [0, 1, 4, 5]  # node 4: root, node 0, node 3, itself
    assert m[2].nonzero().flatten().tolist() == [0, 2]        # node 1 sees no sibling
    assert torch.equal(m.sum(1), torch.tensor([1, 2, 2, 3, 3, 4]))


def test_accepted_path_and_its_compaction():
    path = tree_path(TOKENS, PARENTS, [10, 21, 30, 99])  # root -> 0 -> 3 -> 4, then the target's own token
    assert path == [0, 3, 4]
    # the path's K/V sits at start + 0, start + 3, start + 4; it belongs at start + 0, 1, 2
    assert compaction(path, 100) == ([103, 104], [101, 102])
    assert compaction([0, 1], 7) == ([], [])
