"""Sampling, stopping, streaming and request isolation on a tiny model."""
from __future__ import annotations

import pytest
import torch

from tokenmill import RequestError, SamplingParams
from tokenmill.engine.detokenizer import IncrementalDetokenizer


def test_seeded_sampling_is_reproducible_and_batch_independent(tiny_pipeline):
    params = SamplingParams(max_tokens=16, temperature=1.0, top_p=0.9, top_k=50, seed=7, ignore_eos=True)
    alone = tiny_pipeline.generate("Once upon a time", params)[0]
    others = SamplingParams(max_tokens=16, temperature=1.0, seed=99, ignore_eos=True)
    batched = tiny_pipeline.generate(["Hello", "Once upon a time", "x y z"], [others, params, others])[1]
    assert alone.token_ids == batched.token_ids
    different = tiny_pipeline.generate("Once upon a time",
                                       SamplingParams(max_tokens=16, temperature=1.0, seed=8, ignore_eos=True))[0]
    assert different.token_ids != alone.token_ids


def test_greedy_ignores_seed(tiny_pipeline):
    a = tiny_pipeline.generate("abc", SamplingParams(max_tokens=8, seed=1, ignore_eos=True))[0]
    b = tiny_pipeline.generate("abc", SamplingParams(max_tokens=8, seed=2, ignore_eos=True))[0]
    assert a.token_ids == b.token_ids


def test_top_k_one_is_greedy(tiny_pipeline):
    greedy = tiny_pipeline.generate("The sea", SamplingParams(max_tokens=10, ignore_eos=True))[0]
    topk1 = tiny_pipeline.generate("The sea", SamplingParams(max_tokens=10, temperature=2.0, top_k=1, seed=3,
                                                             ignore_eos=True))[0]
    assert greedy.token_ids == topk1.token_ids


def test_stop_string_cuts_text_and_stream_never_leaks_it(tiny_pipeline):
    base = tiny_pipeline.generate("Stop test", SamplingParams(max_tokens=30, ignore_eos=True))[0]
    assert len(base.text) > 6
    stop = base.text[4:7]
    params = SamplingParams(max_tokens=30, ignore_eos=True, stop=[stop])
    res = tiny_pipeline.generate("Stop test", params)[0]
    assert res.finish_reason == "stop"
    assert res.text == base.text[:base.text.index(stop)]
    streamed = "".join(c.text for c in tiny_pipeline.stream("Stop test", params))
    assert streamed == res.text


def test_max_tokens_and_eos(tiny_pipeline):
    res = tiny_pipeline.generate("hi", SamplingParams(max_tokens=5, ignore_eos=True))[0]
    assert res.finish_reason == "length" and len(res.token_ids) == 5
    first = res.token_ids[0]
    stopped = tiny_pipeline.generate("hi", SamplingParams(max_tokens=5, stop_token_ids=[first]))[0]
    assert stopped.finish_reason == "stop" and stopped.token_ids == [first]


def test_results_carry_timings(tiny_pipeline):
    res = tiny_pipeline.generate("timing", SamplingParams(max_tokens=6, ignore_eos=True))[0]
    assert 0 <= res.queue_s <= res.ttft_s <= res.total_s
    assert res.decode_tokens_per_s is not None and res.decode_tokens_per_s > 0


def test_incremental_detokenizer_never_splits_characters(tokenizer):
    text = "Café ☕ — naïve 東京タワー 🚀🎉 ok"
    ids = tokenizer.encode(text, add_special_tokens=False)
    detok = IncrementalDetokenizer(tokenizer)
    pieces = [detok.add(t) for t in ids] + [detok.flush()]
    assert all("\ufffd" not in p for p in pieces)
    assert "".join(pieces) == tokenizer.decode(ids)
    assert sum(1 for p in pieces if p) > 5  # really incremental


def test_stream_matches_generate(tiny_pipeline):
    params = SamplingParams(max_tokens=20, ignore_eos=True)
    full = tiny_pipeline.generate("Stream me", params)[0]
    chunks = list(tiny_pipeline.stream("Stream me", params))
    assert chunks[-1].finished and chunks[-1].output.token_ids == full.token_ids
    assert "".join(c.text for c in chunks) == full.text
    assert [t for c in chunks for t in c.token_ids] == full.token_ids


def test_bad_requests_fail_alone(tiny_pipeline):
    with pytest.raises(RequestError, match="empty"):
        tiny_pipeline.generate([""], SamplingParams(max_tokens=4))
    with pytest.raises(RequestError, match="max_model_len"):
        tiny_pipeline.generate(["ok", "too long"], [SamplingParams(max_tokens=4), SamplingParams(max_tokens=10_000)])
    with pytest.raises(ValueError, match="top_p"):
        SamplingParams(top_p=0.0)
    with pytest.raises(ValueError, match="temperature"):
        SamplingParams(temperature=-1)
    assert not tiny_pipeline.engine.requests  # nothing half-queued
    assert tiny_pipeline.stats()["kv"]["used_blocks"] == 0
    assert tiny_pipeline.generate("still fine", SamplingParams(max_tokens=3))[0].finish_reason


def test_abort_frees_kv_and_others_continue(tiny_pipeline):
    params = SamplingParams(max_tokens=20, ignore_eos=True)
    a = tiny_pipeline.submit("first request", params)
    b = tiny_pipeline.submit("second request", params)
    tiny_pipeline.step()
    assert tiny_pipeline.stats()["kv"]["used_blocks"] == 2
    assert tiny_pipeline.abort(a)
    assert tiny_pipeline.stats()["kv"]["used_blocks"] == 1
    while tiny_pipeline.engine.has_unfinished():
        tiny_pipeline.step()
    assert tiny_pipeline.engine.pop_finished(a).finish_reason == "abort"
    assert len(tiny_pipeline.engine.pop_finished(b).token_ids) == 20
    assert tiny_pipeline.stats()["kv"]["used_blocks"] == 0


def test_closing_a_stream_aborts(tiny_pipeline):
    gen = tiny_pipeline.stream("abandon me", SamplingParams(max_tokens=50, ignore_eos=True))
    next(gen)
    gen.close()
    assert not tiny_pipeline.engine.has_unfinished()
    assert tiny_pipeline.stats()["kv"]["used_blocks"] == 0


def test_chat_template(tiny_pipeline):
    ids = tiny_pipeline.encode("hello", chat=True)
    text = tiny_pipeline.tokenizer.decode(ids)
    assert "hello" in text and "assistant" in text


def test_runner_uses_cpu_gemm_dispatch_keeping_weight_layout(tiny_pipeline):
    """An fp32 CPU pipeline's runner routes its GEMMs through CpuLinear; weights keep their ordinary layout."""
    arch = tiny_pipeline.runner.arch
    assert arch.linear.cpu is not None
    x = torch.randn(3, arch.config.hidden_size)
    hf = tiny_pipeline.loaded.model.model.layers[0]
    w = hf.self_attn.o_proj.weight
    torch.testing.assert_close(arch.linear(x, w, None), torch.nn.functional.linear(x, w), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(arch.layers[0].o_proj(x), torch.nn.functional.linear(x, w), rtol=1e-5, atol=1e-5)
    for mod in (hf.self_attn.q_proj, hf.mlp.down_proj, tiny_pipeline.loaded.model.lm_head):
        assert mod.weight.is_contiguous()


def test_one_token_prefill_counts_as_prefill(tiny_pipeline):
    from tokenmill.plugin import hookimpl

    class Recorder:
        def __init__(self):
            self.steps = []

        @hookimpl
        def step_end(self, stats):
            self.steps.append((stats.num_prefill_tokens, stats.num_decode_tokens))

    rec = Recorder()
    tiny_pipeline.pm.register(rec)
    try:
        tiny_pipeline.generate([[5]], SamplingParams(max_tokens=3, ignore_eos=True))
    finally:
        tiny_pipeline.pm.unregister(rec)
    assert rec.steps == [(1, 0), (0, 1), (0, 1)]
