"""Default ``verify_tokens``: plain sampling, and exact verification of drafts when there are some."""
from __future__ import annotations

from tokenmill.hooktypes import VerifyInput
from tokenmill.plugin import Plugin, hookimpl
from tokenmill.sampling import sample_next
from tokenmill.speculation import verify_drafts, verify_tree


class Sampler(Plugin):
    """Greedy / temperature / top-k / top-p sampling, each draw a function of the request's seed and the
    token's position, and exact verification of draft chains and trees (the target's own token at each
    position, so drafts change speed, never tokens). Registered ``trylast``."""

    name = "sampler"

    @hookimpl(trylast=True)
    def verify_tokens(self, batch: VerifyInput):
        if any(batch.drafts):
            out = []
            for i, seq in enumerate(batch.seqs):
                d = batch.drafts[i]
                start = batch.row_start[i]
                rows = batch.logits[start:start + 1 + len(d)]
                tree = batch.tree(i)
                if tree is not None:
                    out.append(verify_tree(rows, d, tree, seq.params, seq.seed, seq.num_tokens))
                else:
                    out.append(verify_drafts(rows, d, seq.params, seq.seed, seq.num_tokens))
            return out
        logits = batch.logits  # no drafts: one row per sequence, in order
        rows = logits if logits.shape[0] == len(batch.seqs) else logits[batch.row_start]
        seqs = batch.seqs
        tokens = sample_next(rows, [s.params for s in seqs], [s.seed for s in seqs], [s.num_tokens for s in seqs])
        return [[t] for t in tokens]
