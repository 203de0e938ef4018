"""Paged KV bookkeeping: allocation, ref counts, prefix cache, LRU eviction."""
from __future__ import annotations

from tokenmill.plugins.kv.block_manager import BlockManager


def test_allocate_grows_by_blocks_and_free_returns_all():
    m = BlockManager(8, 4)
    toks = list(range(10))
    t = m.allocate(1, toks, 0, 10, 0)
    assert len(t) == 3 and m.num_free == 5
    assert m.allocate(1, toks + [99], 10, 1, 0) == t  # position 10 still fits block 3
    assert len(m.allocate(1, toks + [99, 98, 97], 11, 2, 0)) == 4  # grows by one block
    m.check()
    m.free(1)
    assert m.num_free == 8
    m.check()


def test_no_room_reserves_nothing():
    m = BlockManager(3, 4)
    assert m.allocate(1, list(range(8)), 0, 8, 0) is not None
    assert m.allocate(2, list(range(8)), 0, 8, 0) is None
    assert m.num_free == 1 and 2 not in m.tables
    m.check()


def test_prefix_cache_hits_and_ref_counts():
    m = BlockManager(16, 4)
    prompt = list(range(100, 113))  # 13 tokens: 3 full blocks
    m.allocate(1, prompt, 0, 13, 0)
    assert m.match(prompt) == []  # nothing is offered before its K/V has been computed
    m.allocate(1, prompt + [5], 13, 1, 0)  # the next step: the prompt's blocks are computed now
    assert m.match(prompt) == m.tables[1][:3]
    other = prompt[:8] + [7, 7, 7, 7, 7]
    hits = m.match(other)
    assert hits == m.tables[1][:2]
    m.allocate(2, other, 0, 5, 8)
    assert m.tables[2][:2] == m.tables[1][:2]
    assert m.blocks[hits[0]].ref_count == 2
    assert m.hits == 8 and m.queries == 26
    assert m.used_slots() == 14 + 5  # shared blocks counted once
    m.check()
    m.free(1)
    assert m.blocks[hits[0]].ref_count == 1
    m.free(2)
    m.check()
    assert len(m.evictable) >= 3  # full blocks stay cached after their users finish
    assert m.match(prompt) != []


def test_match_leaves_last_token_to_compute():
    m = BlockManager(8, 4)
    prompt = list(range(8))
    m.allocate(1, prompt, 0, 8, 0)
    m.free(1, token_ids=prompt, num_computed=8)
    assert len(m.match(prompt)) == 1  # 8 tokens = 2 full blocks, but the last token must be computed


def test_lru_eviction_and_clear():
    m = BlockManager(4, 2)
    m.allocate(1, [1, 2, 3, 4], 0, 4, 0)
    m.free(1, token_ids=[1, 2, 3, 4], num_computed=4)
    assert len(m.evictable) == 2 and m.num_free == 4
    m.allocate(2, [9, 9, 9, 9, 9, 9], 0, 6, 0)  # needs 3 blocks: 2 fresh + 1 evicted
    assert len(m.evictable) == 1
    m.check()
    m.free(2, token_ids=[9] * 6, num_computed=6)
    assert m.clear_cache() == 4  # seq 1's root block + seq 2's three
    assert not m.evictable and not m.cached and m.num_free == 4
    m.check()


def test_unreusable_free_drops_hashes():
    m = BlockManager(4, 2)
    m.allocate(1, [1, 2, 3, 4, 5], 0, 5, 0)
    m.allocate(1, [1, 2, 3, 4, 5, 6], 5, 1, 0)  # blocks of the computed prompt are cached now
    assert m.cached
    m.free(1, reusable=False)
    assert not m.cached and not m.evictable and m.match([1, 2, 3, 4, 5]) == []
    m.check()


def test_blocks_of_a_step_that_never_ran_are_not_cached():
    m = BlockManager(8, 4)
    prompt = list(range(12))
    m.allocate(1, prompt, 0, 12, 0)
    m.free(1, token_ids=prompt, num_computed=0)  # preempted before its forward ran
    assert m.match(prompt + [1]) == [] and not m.cached
    m.check()
