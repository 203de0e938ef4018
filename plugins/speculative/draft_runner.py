"""The draft model of the ``speculative`` plugin: its own KV rows (one per sequence), catch-up, k-step drafting.

Its single-token steps may run through ``torch.compile`` with dynamic shapes (batches padded to
``DRAFT_BUCKETS``); a self-draft may copy the K/V the target computed instead of recomputing them
(``target``). Every sampled draft token is drawn with the request's noise for its position
(``tokenmill.sampling.draw``), so verification accepts it exactly when the target draws the same token.
"""
from __future__ import annotations

import time

import torch

from tokenmill.hooktypes import KVPool
from tokenmill.speculation import Draft
from tokenmill.model import ModelRunner
from tokenmill.sampling import draw, filtered_probs
from tokenmill.sequence import Sequence
from tokenmill.spec import CompileSpec

DRAFT_BUCKETS = [1, 2, 4, 8, 16]  # batch sizes the compiled draft pads to; more sequences run eagerly
CATCH_UP_COMPILED = 2  # catch-up steps of up to this many tokens per sequence take the compiled path
WARM_UP_POSITION = 300  # warm-up steps also run at this position (a key length past the first kv bucket)
SHARED_MAX_NEW = CATCH_UP_COMPILED  # sharing the target's K/V: tokens left for the draft to compute, at most


class DraftModelRunner:
    """The draft model with its own KV rows (one per sequence) and bookkeeping of what it has seen."""

    def __init__(self, model, max_seqs: int, max_len: int, *, compile_spec: CompileSpec | None = None,
                 target: KVPool | None = None) -> None:
        spec = ModelRunner.kv_spec(model, dtype=next(model.parameters()).dtype,
                                   device=next(model.parameters()).device, max_model_len=max_len,
                                   max_num_seqs=max_seqs)
        shape = (max_seqs * max_len, spec.num_kv_heads, spec.head_dim)
        pool = KVPool([torch.zeros(shape, dtype=spec.dtype, device=spec.device) for _ in range(spec.num_layers)],
                      [torch.zeros(shape, dtype=spec.dtype, device=spec.device) for _ in range(spec.num_layers)],
                      block_size=max_len, num_blocks=max_seqs)
        self.runner = ModelRunner(model, pool, attention="sdpa_gather", compile_spec=compile_spec, max_model_len=max_len)
        self.max_len = max_len
        self.free_rows = list(range(max_seqs - 1, -1, -1))
        self.rows: dict[int, tuple[Sequence, int]] = {}
        self.seen: dict[int, list[int]] = {}  # tokens whose KV the draft cache holds, per sequence
        self.target = target  # the target's pool to copy computed K/V from (a self-draft), or None
        self.synced: dict[int, int] = {}  # leading positions of a sequence's row that hold the target's K/V
        if target is not None:
            assert len(target.k) == spec.num_layers and tuple(target.k[0].shape[1:]) == shape[1:], \
                "share_kv needs a draft with the target's KV layout"

    def warm_up(self) -> None:
        """Compile the draft's graphs now, not on the first requests: batch 1, 2 and the largest bucket, one-
        and two-token steps. Dynamic shapes cover every batch size, step width and key length in between,
        except where a quantized module branches on its row count (int8's and int4's packed kernels up to 8 /
        16 rows): the largest bucket crosses those, so no step compiles while requests wait (measured: a
        first 11-sequence draft step compiled for 5.9 s)."""
        if not self.runner.compiled:
            return
        rows = list(range(min(len(self.free_rows), DRAFT_BUCKETS[-1])))
        calls = [(b, width, 0) for b in (1, 2) for width in range(1, CATCH_UP_COMPILED + 1)]
        calls += [(b, 1, WARM_UP_POSITION) for b in (1, 2, len(rows))]
        for b, width, pos in calls:
            if 0 < b <= len(rows) and pos + width <= self.max_len:
                self._forward([([0] * width, pos, [row], 1) for row in rows[:b]])

    def step_seconds(self, batches: list[int]) -> dict[int, float]:
        """Seconds of one single-token draft step at each batch size (its second run: the first may compile or
        warm kernels), on free rows' scratch positions: what drafting one position costs, for the planner."""
        rows = self.free_rows[-1:-DRAFT_BUCKETS[-1] - 1:-1]
        out = {}
        for b in batches:
            if 0 < b <= len(rows) and WARM_UP_POSITION < self.max_len:
                items = [([0], WARM_UP_POSITION, [row], 1) for row in rows[:b]]
                self._forward(items)
                t0 = time.perf_counter()
                self._forward(items)
                out[b] = time.perf_counter() - t0
        return out

    def _forward(self, items: list) -> torch.Tensor:
        return self.runner.run(items, max_padded_tokens=CATCH_UP_COMPILED).logits

    def _release_finished(self) -> None:
        for sid, (seq, row) in list(self.rows.items()):
            if seq.is_finished:
                del self.rows[sid]
                self.seen.pop(sid, None)
                self.synced.pop(sid, None)
                self.free_rows.append(row)

    def _unseen(self, seq: Sequence) -> tuple[int, list[int]]:
        """(how many leading tokens of ``seq`` the draft's KV holds, the tokens after them)."""
        seen = self.seen.get(seq.seq_id, [])
        common = 0
        limit = min(len(seen), seq.num_tokens - 1)
        while common < limit and seen[common] == seq.token_ids[common]:
            common += 1
        return common, seq.token_ids[common:]

    def _copy_target_kv(self, spans: list[tuple[Sequence, int, int]]) -> None:
        """Copy the target's K/V of positions ``[lo, hi)`` of each sequence into the sequence's draft row."""
        t = self.target
        bs = t.block_size
        src, dst = [], []
        for seq, lo, hi in spans:
            bt, base = seq.block_table, self.rows[seq.seq_id][1] * self.max_len
            src.extend(bt[p // bs] * bs + p % bs for p in range(lo, hi))
            dst.extend(range(base + lo, base + hi))
            self.synced[seq.seq_id] = hi
        if not src:
            return
        dev = self.runner.pool.k[0].device
        s, d = torch.tensor(src, device=dev), torch.tensor(dst, device=dev)
        pool = self.runner.pool
        for from_, to in zip(t.k + t.v, pool.k + pool.v):
            to.index_copy_(0, d, from_.index_select(0, s).to(to.dtype))

    def propose(self, seqs: list[Sequence], k: int, max_catch_up_ratio: float | None = None) -> list[Draft]:
        """``k`` drafts per sequence. A sequence whose unseen tokens (the draft's own prefill of it) number more
        than ``max_catch_up_ratio`` times the tokens it may still generate gets none this step: catching up
        costs about as much as the target's prefill and would not pay for itself. Sharing the target's K/V,
        the unseen tokens are those the target has not computed either (more than ``SHARED_MAX_NEW``: no
        drafts this step)."""
        self._release_finished()
        active: list[Sequence] = []
        items = []
        spans = []
        for seq in seqs:
            if seq.num_tokens + k > self.max_len:
                continue
            common, new = self._unseen(seq)
            start = common
            if self.target is not None:
                computed = min(seq.num_computed_tokens, seq.num_tokens - 1)
                start = max(common, computed)
                if seq.num_tokens - start > SHARED_MAX_NEW:
                    continue
                new = seq.token_ids[start:]
            remaining = seq.params.max_tokens - seq.num_output_tokens
            if max_catch_up_ratio is not None and len(new) > max_catch_up_ratio * max(remaining, 0):
                continue
            if seq.seq_id not in self.rows:
                if not self.free_rows:
                    continue
                self.rows[seq.seq_id] = (seq, self.free_rows.pop())
            if self.target is not None:  # positions from the first not holding the target's K/V up to computed
                lo = min(self.synced.get(seq.seq_id, 0), common)
                if computed > lo:
                    spans.append((seq, lo, computed))
            self.seen[seq.seq_id] = list(seq.token_ids)
            active.append(seq)
            # 1) catch up: feed every token the draft has not seen (valid prefix kept), sample the first draft
            items.append((new, start, [self.rows[seq.seq_id][1]], 1))
        drafts: dict[int, list[int]] = {s.seq_id: [] for s in active}
        if not active:
            return [Draft([]) for _ in seqs]
        if spans:
            self._copy_target_kv(spans)
        for step in range(k):
            logits = self._forward(items)
            items = []
            for row, seq in enumerate(active):
                params = seq.params
                if params.greedy:
                    tok = int(logits[row].argmax())
                else:  # the noise the target's draw at this position uses: accepted when the two agree
                    tok = draw(filtered_probs(logits[row], params), seq.seed, seq.num_tokens + step)
                drafts[seq.seq_id].append(tok)
                if step < k - 1:
                    pos = seq.num_tokens + step
                    self.seen[seq.seq_id].append(tok)
                    items.append(([tok], pos, [self.rows[seq.seq_id][1]], 1))
        return [Draft(drafts.get(seq.seq_id, [])) for seq in seqs]
