"""The KV handle the engine gives schedulers: every call routes to the KV hooks."""
from __future__ import annotations

from tokenmill.sequence import Sequence


class EngineKV:
    """The :class:`tokenmill.hooktypes.KVHandle` the engine gives schedulers: routes to the KV hooks."""

    def __init__(self, hook, block_size: int) -> None:
        self.hook = hook
        self.block_size = block_size

    def allocate(self, seq: Sequence, num_new_tokens: int, num_cached_tokens: int = 0) -> bool:
        assert num_cached_tokens == 0 or seq.num_computed_tokens == 0
        result = self.hook.allocate_kv(seq=seq, num_new_tokens=num_new_tokens, num_cached_tokens=num_cached_tokens)
        assert result is not None, "no plugin answered allocate_kv"
        if result is False:
            return False
        seq.block_table = result.block_table
        seq.num_computed_tokens += num_cached_tokens
        if num_cached_tokens:
            seq.num_cached_tokens = num_cached_tokens
        return True

    def cached_prefix(self, seq: Sequence) -> int:
        if seq.num_computed_tokens:
            return 0
        return self.hook.match_prefix(seq=seq) or 0

    def free(self, seq: Sequence, reusable: bool = True) -> None:
        self.hook.free_kv(seq=seq, reusable=reusable)
        seq.block_table = []

    def num_free_tokens(self) -> int:
        stats = self.hook.kv_stats()
        return stats["free_blocks"] * stats["block_size"]

    def num_slots(self, seq: Sequence) -> int:
        return len(seq.block_table) * self.block_size

    def capacity_tokens(self) -> int:
        """Token slots of the whole pool: the most one sequence could ever hold."""
        stats = self.hook.kv_stats()
        return stats["num_blocks"] * stats["block_size"]
