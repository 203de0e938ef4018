"""Speculative decoding's home: the draft tree (:mod:`.tree`: :class:`Draft`, masks, accepted paths, K/V
compaction), the acceptance rules (:mod:`.accept`: exact and typical) and the draft-depth planner
(:mod:`.budget`: measured costs and acceptance -> each sequence's draft depth). Drafters are plugins
(``plugins/speculative``) built on these; the engine verifies through the ``verify_tokens`` hook, whose
default (the ``sampler`` plugin) applies the exact rule.
"""
from tokenmill.speculation.accept import typical_accept, typical_accept_tree, verify_drafts, verify_tree
from tokenmill.speculation.tree import Draft, compaction, tree_children, tree_mask, tree_path

__all__ = ["Draft", "compaction", "tree_children", "tree_mask", "tree_path", "typical_accept", "typical_accept_tree",
           "verify_drafts", "verify_tree"]
