"""Continuous batching + paged KV: exact outputs under chunking, prefix reuse and preemption; fuzzing."""
from __future__ import annotations

import random

import pytest
import torch
from transformers import AutoModelForCausalLM

from tests.conftest import tiny_pipeline_dict
from tests.engine.test_hf_equality import hf_greedy
from tokenmill import Pipeline, SamplingParams

SHARED = list(range(1000, 1037))  # a 37-token "system prompt"


def make(model_dir, *, budget=512, blocks=256, block_size=4, prefix=True, max_seqs=8):
    return Pipeline.from_dict(tiny_pipeline_dict(
        model_dir,
        limits={"max_model_len": 256, "max_num_seqs": max_seqs, "max_num_batched_tokens": budget},
        plugins=[{"continuous_batching": {"chunked_prefill": True}},
                 {"paged_kv": {"block_size": block_size, "num_blocks": blocks, "prefix_caching": prefix}}],
    ), progress=False)


def prompts(seed=0, n=6):
    rng = random.Random(seed)
    out = [SHARED + [rng.randrange(200, 5000) for _ in range(rng.randrange(1, 12))] for _ in range(n // 2)]
    out += [[rng.randrange(200, 5000) for _ in range(rng.randrange(2, 60))] for _ in range(n - n // 2)]
    return out


@pytest.fixture(scope="module")
def hf_tiny(tiny_llama_dir):
    return AutoModelForCausalLM.from_pretrained(tiny_llama_dir, dtype=torch.float32).eval()


@pytest.mark.parametrize("case", ["chunked", "prefix", "preempt"])
def test_outputs_match_alone_and_hf(tiny_llama_dir, hf_tiny, case):
    params = SamplingParams(max_tokens=12, ignore_eos=True)
    ps = prompts(n=6)
    kwargs = {"chunked": dict(budget=16), "prefix": dict(budget=64), "preempt": dict(blocks=20, budget=64)}[case]
    pipe = make(tiny_llama_dir, **kwargs)
    if case == "prefix":  # warm the cache with the shared prompt so later requests hit it
        pipe.generate([SHARED + [7]], SamplingParams(max_tokens=1))
    results = pipe.generate(ps, params)
    stats = pipe.stats()
    if case == "prefix":
        assert stats["kv"]["prefix_hits_tokens"] >= 3 * 36
    if case == "preempt":
        assert stats["preemptions"] > 0
        assert any(r.num_preemptions for r in results)
    alone = make(tiny_llama_dir)
    for ids, res in zip(ps, results):
        assert res.token_ids == alone.generate([ids], params)[0].token_ids
        assert res.token_ids == hf_greedy(hf_tiny, ids, 12)
    assert stats["kv"]["used_blocks"] == 0
    pipe.pm.get_plugin("paged_kv").manager.check()


def test_prefix_hit_rate_on_shared_system_prompt(tiny_llama_dir):
    pipe = make(tiny_llama_dir, budget=2048, block_size=4)
    ps = [SHARED * 3 + [300 + i, 301 + i, 302 + i] for i in range(16)]  # 111 shared + 3 unique tokens
    pipe.generate([ps[0]], SamplingParams(max_tokens=1))  # first request populates the cache
    pipe.generate(ps[1:], SamplingParams(max_tokens=2))
    kv = pipe.stats()["kv"]
    assert kv["prefix_hit_rate"] > 0.75
    assert pipe.clear_prefix_cache() > 0
    assert pipe.stats()["kv"]["cached_blocks"] == 0


def test_clear_prefix_cache_never_touches_blocks_in_use(tiny_llama_dir):
    pipe = make(tiny_llama_dir)
    pipe.generate([SHARED + [5]], SamplingParams(max_tokens=1))
    rid = pipe.submit(SHARED + [6], SamplingParams(max_tokens=5, ignore_eos=True))
    pipe.step()
    used = pipe.stats()["kv"]["used_blocks"]
    pipe.clear_prefix_cache()
    assert pipe.stats()["kv"]["used_blocks"] == used
    while pipe.engine.has_unfinished():
        pipe.step()
    assert len(pipe.collect(rid).token_ids) == 5


def test_long_prompt_does_not_stall_decodes(tiny_llama_dir):
    pipe = make(tiny_llama_dir, budget=16)
    short = pipe.submit([5, 6, 7], SamplingParams(max_tokens=10, ignore_eos=True))
    pipe.step()
    long = pipe.submit(list(range(300, 500)), SamplingParams(max_tokens=2, ignore_eos=True))
    decoded_during_prefill = 0
    for _ in range(8):  # the 200-token prompt needs >12 steps at 16 tokens/step
        for chunk in pipe.step():
            decoded_during_prefill += chunk.request_id == short and len(chunk.token_ids)
    assert decoded_during_prefill >= 8
    while pipe.engine.has_unfinished():
        pipe.step()
    assert pipe.collect(long).finish_reason == "length"


def test_fuzz_random_requests_and_aborts_leak_nothing(tiny_llama_dir):
    rng = random.Random(1234)
    pipe = make(tiny_llama_dir, blocks=40, block_size=4, budget=48, max_seqs=12)
    manager = pipe.pm.get_plugin("paged_kv").manager
    live: list[str] = []
    submitted = finished = aborted = 0
    while submitted < 520 or pipe.engine.has_unfinished():
        while submitted < 520 and rng.random() < 0.7:
            n = rng.randrange(1, 50)
            share = SHARED[:rng.randrange(0, 37)] if rng.random() < 0.4 else []
            ids = (share + [rng.randrange(200, 5000) for _ in range(n)])[:100]
            params = SamplingParams(max_tokens=rng.randrange(1, 25), temperature=rng.choice([0.0, 0.8]),
                                    seed=rng.randrange(1000), ignore_eos=rng.random() < 0.5)
            live.append(pipe.submit(ids, params))
            submitted += 1
        if live and rng.random() < 0.15:
            victim = live.pop(rng.randrange(len(live)))
            pipe.abort(victim)
        for chunk in pipe.step():
            if chunk.finished:
                out = pipe.collect(chunk.request_id)
                if chunk.request_id in live:
                    live.remove(chunk.request_id)
                assert out.finish_reason in ("stop", "length", "abort"), out.error
                finished += out.finish_reason != "abort"
                aborted += out.finish_reason == "abort"
        manager.check()
    assert finished + aborted == 520 and aborted > 20
    assert not pipe.engine.requests
    assert manager.num_used == 0 and not manager.tables  # 0 leaked blocks
    manager.check()
    assert pipe.stats()["preemptions"] > 0
