"""Dynamic batching: batches form by size or wait time, bounded by tokens, and run to completion."""
from __future__ import annotations

from tests.conftest import tiny_pipeline_dict
from tokenmill import Pipeline, SamplingParams


def make(model_dir, **opts):
    return Pipeline.from_dict(tiny_pipeline_dict(model_dir, plugins=[{"dynamic_batching": opts}, "contiguous_kv"]),
                              progress=False)


def run_all(pipe):
    order = []
    while pipe.engine.has_unfinished():
        order += [c.request_id for c in pipe.step() if c.finished]
    return order


def test_batch_forms_when_full_and_runs_to_completion(tiny_llama_dir):
    pipe = make(tiny_llama_dir, max_batch_size=2, max_wait_ms=60_000)
    plugin = pipe.plugins["dynamic_batching"]
    params = SamplingParams(max_tokens=4, ignore_eos=True)
    a = pipe.submit([5, 6], params)
    pipe.step()
    assert plugin.batches_formed == 0 and pipe.engine.idle  # window still open, one request
    b = pipe.submit([7, 8, 9], params)
    pipe.step()
    assert plugin.batches_formed == 1 and {s.request_id for s in pipe.engine.running} == {a, b}
    c = pipe.submit([1, 2], params)  # arrives mid-batch: waits for the next one
    pipe.step()
    assert c not in {s.request_id for s in pipe.engine.running}
    d = pipe.submit([3], params)
    order = run_all(pipe)
    assert set(order[:2]) == {a, b} and set(order[2:]) == {c, d}
    assert plugin.batches_formed == 2


def test_wait_window_releases_a_partial_batch(tiny_llama_dir):
    pipe = make(tiny_llama_dir, max_batch_size=8, max_wait_ms=0)
    res = pipe.generate(["only one"], SamplingParams(max_tokens=3, ignore_eos=True))[0]
    assert res.finish_reason == "length" and pipe.plugins["dynamic_batching"].batches_formed == 1


def test_token_budget_bounds_the_batch(tiny_llama_dir):
    pipe = make(tiny_llama_dir, max_batch_size=8, max_wait_ms=0, max_tokens_per_batch=30)
    params = SamplingParams(max_tokens=10, ignore_eos=True)
    ids = [pipe.submit(list(range(100, 110)), params) for _ in range(4)]  # 20 tokens each
    pipe.step()
    assert len(pipe.engine.running) == 1
    assert len(run_all(pipe)) == 4 and pipe.plugins["dynamic_batching"].batches_formed == 4
    assert all(len(pipe.collect(r).token_ids) == 10 for r in ids)
