"""Default KV cache: one preallocated max-length row per concurrent sequence."""
from __future__ import annotations

from dataclasses import dataclass

from tokenmill.hooktypes import KVAllocation, KVCacheSpec, KVPool
from tokenmill.plugin import Plugin, hookimpl
from tokenmill.sequence import Sequence


class ContiguousKV(Plugin):
    """Each sequence gets one block of ``max_model_len`` slots for its whole life (no growth, no copies).

    Simple and fast, but every sequence reserves the maximum length: see ``paged_kv`` for sharing memory.
    """

    name = "contiguous_kv"

    @dataclass(slots=True)
    class Options:
        max_num_seqs: int | None = None  # rows in the pool; default: the pipeline's limits.max_num_seqs

        def __post_init__(self) -> None:
            if self.max_num_seqs is not None and self.max_num_seqs < 1:
                raise ValueError(f"max_num_seqs must be >= 1, got {self.max_num_seqs}")

    def __init__(self, options=None) -> None:
        super().__init__(options)
        self.pool: KVPool | None = None
        self.free_rows: list[int] = []
        self.rows: dict[int, int] = {}      # seq_id -> row
        self.reserved: dict[int, int] = {}  # seq_id -> token slots in use

    @hookimpl(trylast=True)
    def init_kv_cache(self, spec: KVCacheSpec) -> KVPool:
        rows = self.options.max_num_seqs or spec.max_num_seqs
        self.pool = spec.allocate(rows, spec.max_model_len)
        self.free_rows = list(range(rows - 1, -1, -1))
        return self.pool

    @hookimpl(trylast=True)
    def allocate_kv(self, seq: Sequence, num_new_tokens: int):
        if self.pool is None:
            return None  # another plugin owns the pool
        need = seq.num_computed_tokens + num_new_tokens
        if need > self.pool.block_size:
            return False
        row = self.rows.get(seq.seq_id)
        if row is None:
            if not self.free_rows:
                return False
            row = self.rows[seq.seq_id] = self.free_rows.pop()
        self.reserved[seq.seq_id] = need
        return KVAllocation([row])

    @hookimpl(trylast=True)
    def free_kv(self, seq: Sequence, reusable: bool) -> None:
        row = self.rows.pop(seq.seq_id, None)
        self.reserved.pop(seq.seq_id, None)
        if row is not None:
            self.free_rows.append(row)

    @hookimpl(trylast=True)
    def trim_kv(self, seq: Sequence) -> None:
        if seq.seq_id in self.reserved:  # rows past this hold stale drafts; they are simply overwritten
            self.reserved[seq.seq_id] = seq.num_computed_tokens

    @hookimpl(trylast=True)
    def kv_stats(self):
        if self.pool is None:
            return None
        used = len(self.rows)
        total = self.pool.num_blocks
        return {
            "kind": "contiguous", "num_blocks": total, "block_size": self.pool.block_size,
            "used_blocks": used, "free_blocks": total - used, "usage": used / total,
            "allocated_token_slots": used * self.pool.block_size,
            "used_token_slots": sum(self.reserved.values()),
            "pool_bytes": self.pool.nbytes,
            "extra_bytes": {owner: pool.nbytes for owner, pool in self.pool.extra.items()},
        }
