"""Block pool bookkeeping for paged KV: free list, ref counts, and a prefix cache of full blocks.

A full block is identified by a hash chained over its tokens and its parent block's hash, so equal
hashes mean equal whole prefixes. Blocks nobody references but that carry a hash stay cached (LRU) until
their memory is needed.
"""
from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass


def block_hash(parent: int | None, tokens: tuple[int, ...]) -> int:
    return hash((parent, tokens))


@dataclass(slots=True)
class Block:
    block_id: int
    ref_count: int = 0
    hash: int | None = None


class BlockManager:
    def __init__(self, num_blocks: int, block_size: int, *, prefix_caching: bool = True) -> None:
        self.block_size = block_size
        self.num_blocks = num_blocks
        self.prefix_caching = prefix_caching
        self.blocks = [Block(i) for i in range(num_blocks)]
        self.free_ids: list[int] = list(range(num_blocks - 1, -1, -1))  # never-cached free blocks
        self.evictable: OrderedDict[int, None] = OrderedDict()           # ref 0 but cached, LRU first
        self.cached: dict[int, int] = {}                                 # hash -> block id
        self.tables: dict[int, list[int]] = {}                           # seq id -> block ids
        self.hashes: dict[int, list[int]] = {}                           # seq id -> hashes of its full blocks
        self.tokens: dict[int, int] = {}                                 # seq id -> token slots in use
        self.queries = 0
        self.hits = 0

    # ---------------------------------------------------------------- capacity
    @property
    def num_free(self) -> int:
        return len(self.free_ids) + len(self.evictable)

    @property
    def num_used(self) -> int:
        return self.num_blocks - self.num_free

    def _take(self) -> int:
        if self.free_ids:
            bid = self.free_ids.pop()
        else:
            bid, _ = self.evictable.popitem(last=False)
            block = self.blocks[bid]
            if block.hash is not None and self.cached.get(block.hash) == bid:
                del self.cached[block.hash]
            block.hash = None
        self.blocks[bid].ref_count = 1
        return bid

    def _release(self, bid: int, reusable: bool) -> None:
        block = self.blocks[bid]
        block.ref_count -= 1
        assert block.ref_count >= 0
        if block.ref_count == 0:
            if reusable and block.hash is not None and self.cached.get(block.hash) == bid:
                self.evictable[bid] = None
            else:
                if block.hash is not None and self.cached.get(block.hash) == bid:
                    del self.cached[block.hash]
                block.hash = None
                self.free_ids.append(bid)

    # ---------------------------------------------------------------- prefix cache
    def _chain(self, token_ids: list[int], n_blocks: int) -> list[int]:
        out, parent, bs = [], None, self.block_size
        for i in range(n_blocks):
            parent = block_hash(parent, tuple(token_ids[i * bs:(i + 1) * bs]))
            out.append(parent)
        return out

    def match(self, token_ids: list[int]) -> list[int]:
        """Block ids of the longest cached prefix, leaving at least the last token to compute."""
        if not self.prefix_caching:
            return []
        hits = []
        for h in self._chain(token_ids, (len(token_ids) - 1) // self.block_size):
            bid = self.cached.get(h)
            if bid is None:
                break
            hits.append(bid)
        return hits

    def _register_full_blocks(self, seq_id: int, token_ids: list[int], upto: int) -> None:
        """Give hashes to the sequence's blocks that are full of known tokens below position ``upto``."""
        if not self.prefix_caching:
            return
        hashes = self.hashes.setdefault(seq_id, [])
        table = self.tables[seq_id]
        n_full = min(min(upto, len(token_ids)) // self.block_size, len(table))
        bs = self.block_size
        parent = hashes[-1] if hashes else None
        for i in range(len(hashes), n_full):
            parent = block_hash(parent, tuple(token_ids[i * bs:(i + 1) * bs]))
            hashes.append(parent)
            block = self.blocks[table[i]]
            if block.hash is None and parent not in self.cached:
                block.hash = parent
                self.cached[parent] = table[i]

    # ---------------------------------------------------------------- per sequence
    def allocate(self, seq_id: int, token_ids: list[int], num_computed: int, num_new: int,
                 num_cached: int) -> list[int] | None:
        """Grow ``seq_id``'s table to hold ``num_computed + num_cached + num_new`` tokens; None if no room."""
        table = self.tables.get(seq_id)
        hit_ids: list[int] = []
        if table is None:
            table = []
            if num_cached:
                hit_ids = self.match(token_ids)[:num_cached // self.block_size]
                assert len(hit_ids) * self.block_size == num_cached, "cached prefix changed since match_prefix"
        need_tokens = num_computed + num_cached + num_new
        need_blocks = -(-need_tokens // self.block_size) - len(table) - len(hit_ids)
        # hit blocks that are evictable are not available for fresh allocation
        available = self.num_free - sum(1 for b in hit_ids if self.blocks[b].ref_count == 0)
        if need_blocks > available:
            return None
        if seq_id not in self.tables:
            self.tables[seq_id] = table
            self.queries += len(token_ids)
            self.hits += num_cached
        for bid in hit_ids:
            block = self.blocks[bid]
            if block.ref_count == 0:
                self.evictable.pop(bid)
            block.ref_count += 1
            table.append(bid)
        for _ in range(max(need_blocks, 0)):
            table.append(self._take())
        self.tokens[seq_id] = need_tokens
        # only blocks whose K/V already exist are offered for reuse; the ones this step computes are
        # registered on the sequence's next allocation or when it is freed after a successful step
        self._register_full_blocks(seq_id, token_ids, num_computed + num_cached)
        return table

    def trim(self, seq_id: int, num_tokens: int) -> None:
        """Return blocks past the first ``num_tokens`` tokens (rejected speculative tokens)."""
        table = self.tables.get(seq_id)
        if table is None:
            return
        keep = -(-num_tokens // self.block_size)
        while len(table) > keep:
            self._release(table.pop(), reusable=False)
        hashes = self.hashes.get(seq_id)
        if hashes is not None:
            del hashes[keep:]
        self.tokens[seq_id] = min(self.tokens.get(seq_id, 0), num_tokens)

    def free(self, seq_id: int, reusable: bool = True, token_ids: list[int] | None = None,
             num_computed: int = 0) -> None:
        """Release a sequence's blocks; with ``reusable``, first cache its full blocks of computed tokens."""
        if reusable and token_ids is not None and seq_id in self.tables:
            self._register_full_blocks(seq_id, token_ids, num_computed)
        table = self.tables.pop(seq_id, None)
        self.hashes.pop(seq_id, None)
        self.tokens.pop(seq_id, None)
        if table:
            for bid in reversed(table):  # tail blocks first, so LRU evicts a chain's end before its root
                self._release(bid, reusable)

    def clear_cache(self) -> int:
        """Forget every cached block with no users; returns how many were freed."""
        freed = 0
        for bid in list(self.evictable):
            block = self.blocks[bid]
            self.cached.pop(block.hash, None)
            block.hash = None
            self.free_ids.append(bid)
            freed += 1
        self.evictable.clear()
        return freed

    def used_slots(self) -> int:
        """Token slots holding K/V of live sequences, each physical block counted once (shared prefixes)."""
        filled: dict[int, int] = {}
        for sid, table in self.tables.items():
            n = self.tokens.get(sid, 0)
            for i, bid in enumerate(table):
                f = min(self.block_size, max(0, n - i * self.block_size))
                if f > filled.get(bid, 0):
                    filled[bid] = f
        return sum(filled.values())

    def check(self) -> None:
        """Invariant check (tests): ref counts equal table references, no block both free and used."""
        refs = [0] * self.num_blocks
        for table in self.tables.values():
            for bid in table:
                refs[bid] += 1
        assert refs == [b.ref_count for b in self.blocks], "ref counts disagree with block tables"
        free = set(self.free_ids)
        assert len(free) == len(self.free_ids) and not free & set(self.evictable)
        for bid in free | set(self.evictable):
            assert self.blocks[bid].ref_count == 0
        for h, bid in self.cached.items():
            assert self.blocks[bid].hash == h
        assert self.num_free + sum(1 for b in self.blocks if b.ref_count > 0) == self.num_blocks
