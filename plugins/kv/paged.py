"""``paged_kv``: a block pool sized from a memory budget, per-sequence block tables, prefix caching."""
from __future__ import annotations

import os
from dataclasses import dataclass

import torch

from tokenmill.hooktypes import KVAllocation, KVCacheSpec, KVPool
from tokenmill.plugin import Plugin, hookimpl
from tokenmill.plugins.kv.block_manager import BlockManager
from tokenmill.sequence import Sequence


def available_memory_bytes(device: torch.device) -> int:
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return free
    try:
        with open("/proc/meminfo") as fh:
            for line in fh:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_AVPHYS_PAGES")


class PagedKV(Plugin):
    """KV in fixed-size blocks shared by all sequences; attention reads through block tables.

    Memory is only held for tokens that exist (plus less than one block per sequence), so many more
    sequences fit than with max-length rows. With ``prefix_caching``, full blocks are kept by a hash of
    their whole prefix and reused by later requests sharing it.
    """

    name = "paged_kv"

    @dataclass(slots=True)
    class Options:
        block_size: int = 16
        num_blocks: int | str = "auto"     # a count, or "auto": from kv_memory_gb or the free memory
        kv_memory_gb: float | None = None  # budget for the pool when num_blocks is auto
        memory_fraction: float = 0.3       # share of the free memory used when no budget is given
        prefix_caching: bool = True

        def __post_init__(self) -> None:
            if self.block_size < 1:
                raise ValueError(f"block_size must be >= 1, got {self.block_size}")
            if isinstance(self.num_blocks, str) and self.num_blocks != "auto":
                raise ValueError(f"num_blocks must be a positive integer or 'auto', got {self.num_blocks!r}")
            if isinstance(self.num_blocks, int) and self.num_blocks < 1:
                raise ValueError(f"num_blocks must be a positive integer or 'auto', got {self.num_blocks}")
            if self.kv_memory_gb is not None and self.kv_memory_gb <= 0:
                raise ValueError(f"kv_memory_gb must be > 0, got {self.kv_memory_gb}")
            if not 0 < self.memory_fraction <= 0.95:
                raise ValueError(f"memory_fraction must be in (0, 0.95], got {self.memory_fraction}")

    def __init__(self, options=None) -> None:
        super().__init__(options)
        self.pool: KVPool | None = None
        self.manager: BlockManager | None = None

    def _num_blocks(self, spec: KVCacheSpec) -> int:
        opts = self.options
        if isinstance(opts.num_blocks, int):
            return opts.num_blocks
        block_bytes = spec.bytes_per_token * opts.block_size
        budget = (opts.kv_memory_gb * 2**30 if opts.kv_memory_gb is not None
                  else available_memory_bytes(torch.device(spec.device)) * opts.memory_fraction)
        # never more than every sequence at full length could use
        useful = spec.max_num_seqs * -(-spec.max_model_len // opts.block_size)
        return max(1, min(int(budget // block_bytes), useful))

    @hookimpl
    def init_kv_cache(self, spec: KVCacheSpec) -> KVPool:
        n = self._num_blocks(spec)
        self.pool = spec.allocate(n, self.options.block_size)
        self.manager = BlockManager(n, self.options.block_size, prefix_caching=self.options.prefix_caching)
        return self.pool

    @hookimpl
    def match_prefix(self, seq: Sequence):
        if self.manager is None:
            return None
        return len(self.manager.match(seq.token_ids)) * self.manager.block_size

    @hookimpl
    def allocate_kv(self, seq: Sequence, num_new_tokens: int, num_cached_tokens: int):
        if self.manager is None:
            return None
        table = self.manager.allocate(seq.seq_id, seq.token_ids, seq.num_computed_tokens, num_new_tokens,
                                      num_cached_tokens)
        return False if table is None else KVAllocation(list(table))

    @hookimpl
    def free_kv(self, seq: Sequence, reusable: bool) -> None:
        if self.manager is not None:
            self.manager.free(seq.seq_id, reusable, seq.token_ids, seq.num_computed_tokens)

    @hookimpl
    def trim_kv(self, seq: Sequence) -> None:
        if self.manager is not None:
            self.manager.trim(seq.seq_id, seq.num_computed_tokens)

    @hookimpl
    def clear_prefix_cache(self):
        return None if self.manager is None else self.manager.clear_cache()

    @hookimpl
    def kv_stats(self):
        m = self.manager
        if m is None:
            return None
        used = m.num_used
        return {
            "kind": "paged", "num_blocks": m.num_blocks, "block_size": m.block_size,
            "used_blocks": used, "free_blocks": m.num_free, "cached_blocks": len(m.evictable),
            "usage": used / m.num_blocks,
            "allocated_token_slots": used * m.block_size,
            "used_token_slots": m.used_slots(),
            "pool_bytes": self.pool.nbytes,
            "extra_bytes": {owner: pool.nbytes for owner, pool in self.pool.extra.items()},
            "prefix_caching": m.prefix_caching,
            "prefix_queries_tokens": m.queries, "prefix_hits_tokens": m.hits,
            "prefix_hit_rate": m.hits / m.queries if m.queries else 0.0,
        }
