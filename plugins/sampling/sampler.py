"""Default ``verify_tokens``: plain sampling of the next token when no drafts were proposed."""
from __future__ import annotations

from tokenmill.hooktypes import VerifyInput
from tokenmill.plugin import Plugin, hookimpl
from tokenmill.sampling import sample_next


class Sampler(Plugin):
    """Greedy / temperature / top-k / top-p sampling with per-request seeds (registered ``trylast``)."""

    name = "sampler"

    @hookimpl(trylast=True)
    def verify_tokens(self, batch: VerifyInput):
        if any(batch.drafts):
            return None  # drafts need a speculative verifier plugin
        rows = batch.logits[batch.row_start]
        tokens = sample_next(rows, [s.params for s in batch.seqs], [s.generator for s in batch.seqs])
        return [[t] for t in tokens]
