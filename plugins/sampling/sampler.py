"""Default ``verify_tokens``: plain sampling, and exact verification of drafts when there are some."""
from __future__ import annotations

from tokenmill.hooktypes import VerifyInput
from tokenmill.plugin import Plugin, hookimpl
from tokenmill.sampling import sample_next, verify_drafts, verify_tree


class Sampler(Plugin):
    """Greedy / temperature / top-k / top-p sampling with per-request seeds, and speculative verification
    (greedy prefix match, or exact speculative sampling) of draft chains and trees. Registered ``trylast``."""

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
                    out.append(verify_tree(rows, d, tree, seq.params, seq.generator))
                    continue
                probs = batch.draft_probs[i] if batch.draft_probs else None
                out.append(verify_drafts(rows, d, probs, seq.params, seq.generator))
            return out
        rows = batch.logits[batch.row_start]
        tokens = sample_next(rows, [s.params for s in batch.seqs], [s.generator for s in batch.seqs])
        return [[t] for t in tokens]
