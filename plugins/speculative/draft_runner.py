"""The draft model of the ``speculative`` plugin: its K/V in the pipeline's KV blocks, catch-up, k-step drafting.

The draft writes its K/V into the blocks the sequences hold, through their block tables: into its own layers
there (``KVPool.extra``, declared through ``kv_layers``), or, for a self-draft sharing K/V, into the target's
layers themselves, at positions the target has not computed yet (its verify overwrites them in the same step),
reading the target's exact K/V below them. So the draft holds no KV of its own: its memory is the pipeline's
KV budget, ``kv_stats`` counts it, and it goes back with the sequence's blocks. The slots of the positions it
drafts at are reserved through the KV handle first.

Its single-token steps may run through ``torch.compile`` with dynamic shapes (batches padded to
``DRAFT_BUCKETS``). Every sampled draft token is drawn with the request's noise for its position
(``tokenmill.sampling.draw``), so verification accepts it exactly when the target draws the same token.
"""
from __future__ import annotations

from contextlib import contextmanager

import torch

from tokenmill.hooktypes import KVHandle, KVPool
from tokenmill.speculation import Draft
from tokenmill.model import ModelRunner
from tokenmill.sampling import draw, filtered_probs, greedy_tokens
from tokenmill.sequence import Sequence
from tokenmill.spec import CompileSpec

DRAFT_BUCKETS = [1, 2, 4, 8, 16]  # batch sizes the compiled draft pads to; more sequences run eagerly
CATCH_UP_COMPILED = 2  # catch-up steps of up to this many tokens per sequence take the compiled path
WARM_UP_POSITION = 300  # warm-up steps also run at this position (a key length past the first kv bucket)
SHARED_MAX_NEW = CATCH_UP_COMPILED  # sharing the target's K/V: tokens left for the draft to compute, at most


def scratch_pool(pool: KVPool, num_tokens: int) -> KVPool:
    """A zero pool with ``pool``'s layer shapes and block size, holding ``num_tokens`` positions of one
    sequence: where warm-up and timing steps write, away from the sequences' blocks."""
    blocks = -(-num_tokens // pool.block_size)
    shape = lambda t: (blocks * pool.block_size, *t.shape[1:])  # noqa: E731
    return KVPool([torch.zeros(shape(t), dtype=t.dtype, device=t.device) for t in pool.k],
                  [torch.zeros(shape(t), dtype=t.dtype, device=t.device) for t in pool.v], pool.block_size, blocks)


class DraftModelRunner:
    """The draft model over the sequences' KV blocks, and what of each sequence its K/V there cover."""

    def __init__(self, model, pool: KVPool, *, shared: bool, max_len: int,
                 compile_spec: CompileSpec | None = None) -> None:
        """``pool``: the draft's layers in the pipeline's blocks, or the target's own with ``shared``."""
        self.runner = ModelRunner(model, pool, attention="sdpa_gather", compile_spec=compile_spec, max_model_len=max_len)
        self.shared = shared
        self.max_len = max_len
        self.seen: dict[int, list[int]] = {}  # own layers: tokens whose draft K/V the sequence's blocks hold

    def warm_up(self) -> None:
        """Compile the draft's graphs now, not on the first requests: batch 1, 2 and the largest bucket, one-
        and two-token steps. Dynamic shapes cover every batch size, step width and key length in between,
        except where a quantized module branches on its row count (int8's and int4's packed kernels up to 8 /
        16 rows): the largest bucket crosses those, so no step compiles while requests wait (measured: a
        first 11-sequence draft step compiled for 5.9 s). Runs on a scratch pool (requests may be running)."""
        if not self.runner.compiled:
            return
        calls = [(b, width, 0) for b in (1, 2) for width in range(1, CATCH_UP_COMPILED + 1)]
        calls += [(b, 1, WARM_UP_POSITION) for b in (1, 2, DRAFT_BUCKETS[-1])]
        with self._scratch() as blocks:
            for b, width, pos in calls:
                if pos + width <= self.max_len:
                    self._forward([([0] * width, pos, blocks, 1)] * b)

    def step_seconds(self, batches: list[int], runs: int = 3) -> dict[int, float]:
        """Seconds of one single-token draft step at each batch size (the median of ``runs`` after an untimed
        one, which may compile or warm kernels: one timing can be off by a third on a busy machine), at position
        ``WARM_UP_POSITION`` of a scratch pool: what drafting one position costs."""
        out = {}
        if WARM_UP_POSITION >= self.max_len:
            return out
        with self._scratch() as blocks:
            for b in batches:
                out[b] = self.runner.time_run([([0], WARM_UP_POSITION, blocks, 1)] * b, runs=runs,
                                              max_padded_tokens=CATCH_UP_COMPILED)
        return out

    @contextmanager
    def _scratch(self):
        """The runner writes to a scratch pool inside; yields the block table of its one sequence."""
        real = self.runner.pool
        self.runner.pool = scratch = scratch_pool(real, min(WARM_UP_POSITION + CATCH_UP_COMPILED, self.max_len))
        try:
            yield list(range(scratch.num_blocks))
        finally:
            self.runner.pool = real

    def _forward(self, items: list) -> torch.Tensor:
        return self.runner.run(items, max_padded_tokens=CATCH_UP_COMPILED).logits

    def forget(self, seq_id: int) -> None:
        """The sequence's blocks went back (finished, aborted or preempted): its draft K/V with them."""
        self.seen.pop(seq_id, None)

    def _start(self, seq: Sequence) -> int:
        """The first position whose draft K/V the sequence's blocks do not hold. Shared: the target's computed
        positions. Own layers: what the draft has seen of the tokens, below the positions the target has
        computed (the blocks past those may have gone back after rejected drafts)."""
        limit = min(seq.num_computed_tokens, seq.num_tokens - 1)
        if self.shared:
            return limit
        seen = self.seen.get(seq.seq_id, [])
        common = 0
        limit = min(len(seen), limit)
        while common < limit and seen[common] == seq.token_ids[common]:
            common += 1
        return common

    def propose(self, seqs: list[Sequence], k: int, kv: KVHandle,
                max_catch_up_ratio: float | None = None) -> list[Draft]:
        """``k`` drafts per sequence (none for those below). The draft first runs the tokens whose K/V it lacks
        (:meth:`_start` on). A sequence whose unseen tokens (the draft's own prefill of it) number more than
        ``max_catch_up_ratio`` times the tokens it may still generate gets none this step: catching up costs
        about as much as the target's prefill and would not pay for itself. Sharing the target's K/V, the
        unseen tokens are those the target has not computed either (more than ``SHARED_MAX_NEW``: none). A
        sequence whose blocks cannot take the ``k - 1`` drafted positions the draft writes gets none."""
        active: list[Sequence] = []
        items = []
        for seq in seqs:
            if seq.num_tokens + k > self.max_len:
                continue
            start = self._start(seq)
            new = seq.token_ids[start:]
            if self.shared and len(new) > SHARED_MAX_NEW:
                continue
            remaining = seq.params.max_tokens - seq.num_output_tokens
            if max_catch_up_ratio is not None and len(new) > max_catch_up_ratio * max(remaining, 0):
                continue
            if k > 1 and not kv.allocate(seq, seq.num_uncomputed_tokens + k - 1):
                continue
            if not self.shared:
                self.seen[seq.seq_id] = list(seq.token_ids)
            active.append(seq)
            items.append((new, start, seq.block_table, 1))
        if not active:
            return [Draft([]) for _ in seqs]
        drafts: dict[int, list[int]] = {s.seq_id: [] for s in active}
        for step in range(k):
            logits = self._forward(items)
            items = []
            best = greedy_tokens(logits) if any(seq.params.greedy for seq in active) else None
            for row, seq in enumerate(active):
                params = seq.params
                if params.greedy:
                    tok = best[row]
                else:  # the noise the target's draw at this position uses: accepted when the two agree
                    tok = draw(filtered_probs(logits[row], params), seq.seed, seq.num_tokens + step)
                drafts[seq.seq_id].append(tok)
                if step < k - 1:
                    if not self.shared:
                        self.seen[seq.seq_id].append(tok)
                    items.append(([tok], seq.num_tokens + step, seq.block_table, 1))
        return [Draft(drafts.get(seq.seq_id, [])) for seq in seqs]
