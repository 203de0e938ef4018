"""Attention backends: flex_paged and fused_paged (blocks read in place) equal sdpa_gather on every kind of
query group, and a third-party backend plugs in through the entry-point group."""
from __future__ import annotations

import importlib.metadata as md

import pytest
import torch
import torch.nn.functional as F
from transformers import AutoModelForCausalLM

from tests.conftest import tiny_pipeline_dict
from tests.engine.test_hf_equality import PROMPTS, hf_greedy
from tokenmill import Pipeline, SamplingParams
from tokenmill.errors import PipelineError
from tokenmill.model.archs import LayerAttention
from tokenmill.model.attention import AttentionLayout, base
from tokenmill.model.attention.flex_paged import FlexPaged
from tokenmill.model.attention.fused_paged import FusedPaged
from tokenmill.model.attention.sdpa_gather import SdpaGather, decode_attention
from tokenmill.model.batch import build_batch

HQ, HK, D, BS, NB = 4, 2, 16, 4, 40


def _mixed_batch():
    """Decodes at different lengths, a 7-token prefill chunk after cached context, a 5-token verification and
    a 4-draft tree, over shuffled (non-contiguous) blocks."""
    perm = torch.randperm(NB, generator=torch.Generator().manual_seed(0)).tolist()
    tables, at = [], 0
    for n in (6, 3, 5, 4, 4):
        tables.append(perm[at:at + n])
        at += n
    items = [([1], 21, tables[0], 1), ([2], 9, tables[1], 1), ([3] * 7, 12, tables[2], 1),
             ([4] * 5, 10, tables[3], 5), ([5] * 5, 11, tables[4], 5)]
    return build_batch(items, BS, trees={4: [-1, 0, -1, 2]})


@pytest.mark.parametrize("layer", [LayerAttention(0.25), LayerAttention(0.25, window=6, softcap=5.0)],
                         ids=["global", "window-softcap"])
def test_flex_paged_equals_gather(layer, monkeypatch):
    monkeypatch.setattr(FlexPaged, "max_query", 8)  # every group through FlexAttention, not only decodes,
    monkeypatch.setattr(FlexPaged, "min_keys", 0)  # however few keys it reads
    layout = AttentionLayout(HQ, HK, D, BS, NB, 64, torch.device("cpu"), torch.float32, (layer.window,))
    batch = _mixed_batch()
    g = torch.Generator().manual_seed(1)
    q = torch.randn(batch.num_tokens, HQ, D, generator=g)
    k, v = torch.randn(NB * BS, HK, D, generator=g), torch.randn(NB * BS, HK, D, generator=g)
    flex, gather = FlexPaged(layout), SdpaGather(layout)
    meta = flex.prepare(batch, layer.window)
    assert [kind for kind, _ in meta] == ["flex", "flex"]  # decodes, then the 5..8-token group
    out = flex.forward(q, k, v, meta, layer)
    ref = gather.forward(q, k, v, gather.prepare(batch, layer.window), layer)
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("cls,attention", [(FlexPaged, "flex_paged"), (FusedPaged, "auto")],
                         ids=["flex_paged", "fused_paged-by-auto"])
def test_in_place_backend_pipeline_matches_hf(cls, attention, tiny_llama_dir, monkeypatch):
    """Greedy tokens equal HF's with every decode through the backend's in-place kernel; ``auto`` picks
    ``fused_paged`` for a paged pool on CPU."""
    monkeypatch.setattr(cls, "min_keys", 0)  # tiny contexts: decodes through the in-place kernel all the same
    calls = []
    real = cls._fn
    monkeypatch.setattr(cls, "_fn", lambda self, *a: calls.append(1) or real(self, *a))
    pipe = Pipeline.from_dict(tiny_pipeline_dict(tiny_llama_dir, attention=attention,
                                                 plugins=["continuous_batching", {"paged_kv": {"block_size": 4}}]),
                              progress=False)
    assert pipe.info()["attention"] == cls.name
    hf = AutoModelForCausalLM.from_pretrained(tiny_llama_dir, dtype=torch.float32).eval()
    results = pipe.generate(PROMPTS, SamplingParams(max_tokens=12, ignore_eos=True))
    for prompt, res in zip(PROMPTS, results):
        assert res.token_ids == hf_greedy(hf, pipe.encode(prompt), 12), prompt
    assert pipe.stats()["kv"]["used_blocks"] == 0
    assert calls


def test_flex_paged_small_groups_take_the_gather_path():
    layout = AttentionLayout(HQ, HK, D, BS, NB, 64, torch.device("cpu"), torch.float32, (None,))
    flex = FlexPaged(layout)
    assert [kind for kind, _ in flex.prepare(_mixed_batch(), None)] == ["gather", "gather"]
    assert flex.warm_up_positions(1) == (0,)  # 4096 keys: past this pool's 64-token sequences


@pytest.mark.parametrize("layer,dtype", [(LayerAttention(0.25), torch.float32),
                                         (LayerAttention(0.25, window=6, softcap=5.0), torch.float32),
                                         (LayerAttention(0.25), torch.bfloat16)],
                         ids=["global", "window-softcap", "bfloat16"])
def test_fused_paged_equals_gather(layer, dtype, monkeypatch):
    """Decodes through the fused kernel (other groups through the gather path) give the gather backend's output,
    at two batch sizes and key lengths of one compiled graph."""
    monkeypatch.setattr(FusedPaged, "min_keys", 0)
    layout = AttentionLayout(HQ, HK, D, BS, NB, 64, torch.device("cpu"), dtype, (layer.window,))
    fused, gather = FusedPaged(layout), SdpaGather(layout)
    g = torch.Generator().manual_seed(1)
    k, v = torch.randn(NB * BS, HK, D, generator=g).to(dtype), torch.randn(NB * BS, HK, D, generator=g).to(dtype)
    decodes = build_batch([([1], 21, _mixed_batch().block_tables[0].tolist(), 1),
                           ([2], 9, _mixed_batch().block_tables[1].tolist(), 1),
                           ([3], 14, _mixed_batch().block_tables[2].tolist(), 1)], BS)
    for batch in (_mixed_batch(), decodes):
        q = torch.randn(batch.num_tokens, HQ, D, generator=g).to(dtype)
        meta = fused.prepare(batch, layer.window)
        assert meta[0][0] == "fused" and all(kind == "gather" for kind, _ in meta[1:])
        out = fused.forward(q, k, v, meta, layer)
        ref = gather.forward(q, k, v, gather.prepare(batch, layer.window), layer)
        tol = 1e-5 if dtype == torch.float32 else 2e-2
        torch.testing.assert_close(out, ref, rtol=tol, atol=tol)


def test_fused_paged_small_groups_take_the_gather_path():
    layout = AttentionLayout(HQ, HK, D, BS, NB, 4096, torch.device("cpu"), torch.float32, (None,))
    fused = FusedPaged(layout)
    assert [kind for kind, _ in fused.prepare(_mixed_batch(), None)] == ["gather", "gather"]
    assert fused.warm_up_positions(64) == (0, 32) and fused.warm_up_positions(1) == (0, 2048)
    # 46 decodes reach 2,048 keys at 45 + 1 keys each: one more, as equal sizes would share a symbol when traced
    assert fused.warm_up_positions(46) == (0, 46) and fused.warm_up_positions(2048) == (0, 1)


def test_unknown_backend_is_refused_with_the_list(tiny_llama_dir):
    with pytest.raises(PipelineError, match="unknown attention backend 'flash'; allowed: auto, flex_paged, "
                                            "fused_paged, sdpa_gather"):
        Pipeline.from_dict(tiny_pipeline_dict(tiny_llama_dir, attention="flash"), progress=False)


class CountingGather(SdpaGather):
    """A third-party backend: today's gather path, counting its calls."""

    name = "counting"
    calls = 0

    def forward(self, q, k_cache, v_cache, meta, layer, out=None):
        CountingGather.calls += 1
        return super().forward(q, k_cache, v_cache, meta, layer, out=out)


def test_third_party_backend_through_entry_point(tiny_llama_dir, monkeypatch):
    ep = md.EntryPoint("counting", f"{__name__}:CountingGather", base.ENTRY_POINT_GROUP)
    found = dict(base.discover_backends(), counting=ep)
    monkeypatch.setattr(base, "discover_backends", lambda: found)
    monkeypatch.setattr("tokenmill.model.attention.discover_backends", lambda: found)
    pipe = Pipeline.from_dict(tiny_pipeline_dict(tiny_llama_dir, attention="counting"), progress=False)
    assert pipe.info()["attention"] == "counting"
    before = CountingGather.calls  # the build's warm-up steps ran through it too
    out = pipe.generate(["Hello there"], SamplingParams(max_tokens=4, ignore_eos=True))[0]
    assert len(out.token_ids) == 4
    assert CountingGather.calls - before == 4 * pipe.loaded.config.num_hidden_layers


def test_decode_attention_equals_sdpa():
    """The compiled batch-1 decode's attention (a fused score reduction, then a matmul with the values) gives SDPA's
    result, grouped query heads and a padded key mask included, in float32 and bf16."""
    g = torch.Generator().manual_seed(3)
    q, k, v = (torch.randn(1, 6, 1, 16, generator=g), torch.randn(1, 2, 40, 16, generator=g),
               torch.randn(1, 2, 40, 16, generator=g))
    mask = (torch.arange(40) < 29)[None, None, None]
    for m in (None, mask):
        torch.testing.assert_close(decode_attention(q, k, v, m, 0.25),
                                   F.scaled_dot_product_attention(q, k, v, attn_mask=m, scale=0.25, enable_gqa=True))
        # bf16 inputs: the product with the values runs in float32, the result comes back in bf16
        half = decode_attention(q.bfloat16(), k.bfloat16(), v.bfloat16(), m, 0.25)
        assert half.dtype == torch.bfloat16
        ref = F.scaled_dot_product_attention(*(t.bfloat16().float() for t in (q, k, v)), attn_mask=m, scale=0.25,
                                             enable_gqa=True)
        torch.testing.assert_close(half.float(), ref, atol=2e-2, rtol=2e-2)


def test_whole_prompts_run_causal_without_a_mask():
    """Prompts from position 0 of one length class form a group of their own and run SDPA's causal kernel (no
    explicit mask), giving each prompt's own causal attention although the shorter ones are padded; a later chunk
    of the same length class keeps its masked group."""
    g = torch.Generator().manual_seed(4)
    layout = AttentionLayout(HQ, HK, D, BS, NB, 4096, torch.device("cpu"), torch.float32, (None,))
    gather = SdpaGather(layout)
    perm = torch.randperm(NB, generator=g).tolist()
    items = [([1] * 7, 0, perm[0:2], 1), ([2] * 5, 0, perm[2:4], 1), ([3] * 6, 4, perm[4:7], 1)]
    batch = build_batch(items, BS)
    meta = gather.prepare(batch, None)
    assert [(m[2] is None, m[3]) for m in meta] == [(False, False), (True, True)]
    n = batch.num_tokens
    q = torch.randn(n, HQ, D, generator=g)
    kc, vc = torch.randn(NB * BS, HK, D, generator=g), torch.randn(NB * BS, HK, D, generator=g)
    out = gather.forward(q, kc, vc, meta, LayerAttention(0.25))
    for i in range(3):  # each sequence alone, through SDPA with its own causal mask
        at, cnt, start = batch.offsets[i], batch.counts[i], batch.starts[i]
        slots = torch.tensor([items[i][2][p // BS] * BS + p % BS for p in range(start + cnt)])
        qi = q[at:at + cnt].transpose(0, 1)[None]
        ki, vi = kc[slots].transpose(0, 1)[None], vc[slots].transpose(0, 1)[None]
        mask = torch.ones(cnt, start + cnt, dtype=torch.bool).tril(start)
        ref = F.scaled_dot_product_attention(qi, ki, vi, attn_mask=mask, scale=0.25, enable_gqa=True)
        torch.testing.assert_close(out[at:at + cnt], ref[0].transpose(0, 1).reshape(cnt, HQ * D))
