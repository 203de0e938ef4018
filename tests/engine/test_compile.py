"""torch.compile path: compiled decode gives the same greedy tokens as eager."""
from __future__ import annotations

import pytest
import torch

from tests.conftest import make_tiny_model, tiny_pipeline_dict
from tokenmill import Pipeline, SamplingParams
from tokenmill.model.attention import AttentionLayout
from tokenmill.model.attention.flex_paged import FlexPaged
from tokenmill.model.attention.fused_paged import FusedPaged
from tokenmill.model.attention.sdpa_gather import SdpaGather
from tokenmill.model.batch import build_batch


def test_compiled_matches_eager(tiny_llama_dir):
    """Two sequences pad to 4 rows, five to 8: above the small-row GEMM path, where the eager step calls oneDNN,
    which inductor cannot trace on a plain weight (the compiled step uses its own GEMM there)."""
    prompts = ["Compile me", "A second, longer prompt for the batch"]
    prompts5 = prompts + ["three", "four is here", "and five"]
    params = SamplingParams(max_tokens=10, ignore_eos=True)
    eager_pipe = Pipeline.from_dict(tiny_pipeline_dict(tiny_llama_dir), progress=False)
    eager, eager5 = eager_pipe.generate(prompts, params), eager_pipe.generate(prompts5, params)
    pipe = Pipeline.from_dict(tiny_pipeline_dict(tiny_llama_dir, compile={"enabled": True, "buckets": [1, 4, 8]}),
                              progress=False)
    calls = []
    compiled_fn = pipe.runner._compiled
    pipe.runner._compiled = lambda *a: calls.append(1) or compiled_fn(*a)
    compiled = pipe.generate(prompts, params)
    assert [r.token_ids for r in compiled] == [r.token_ids for r in eager]
    assert len(calls) >= 9  # every all-decode step went through the compiled graph
    assert [r.token_ids for r in pipe.generate(prompts5, params)] == [r.token_ids for r in eager5]
    assert len(calls) >= 18
    assert pipe.info()["compiled"]


def test_decode_padding_duplicates_first_row():
    items = [([5], 7, [0], 1), ([6], 3, [1], 1), ([9], 12, [2], 1)]
    batch = build_batch(items, 16, decode_buckets=[1, 4, 8])
    assert batch.decode_padded and batch.num_tokens == 4 and batch.num_seqs == 4
    assert batch.input_ids.tolist() == [5, 6, 9, 5] and batch.slot_mapping.tolist() == [7, 19, 44, 7]
    assert batch.logits_idx.tolist() == [0, 1, 2]
    layout = AttentionLayout(4, 2, 16, 16, 3, 256, torch.device("cpu"), torch.float32, (None,), kv_multiple=8)
    (tok, kv_idx, mask, causal, out_idx, out_sel), = SdpaGather(layout).prepare(batch, None)
    assert kv_idx.shape == (4, 16) and mask is not None and not causal
    assert mask[1, 0, 0].tolist() == [True] * 4 + [False] * 12


@pytest.mark.parametrize("cls", [FlexPaged, FusedPaged], ids=["flex_paged", "fused_paged"])
def test_compiled_in_place_backend_matches_eager(cls, tiny_llama_dir, monkeypatch):
    """The compile path on the paged backends: decode steps run the compiled graph (FlexAttention called from it,
    the fused decode traced into it), with the eager gather pipeline's tokens; the build's warm-up compiled every
    graph the requests use, the backend's eager kernel of mixed steps (decodes beside a chunk) included."""
    from torch._dynamo.utils import counters

    monkeypatch.setattr(cls, "min_keys", 0)  # tiny contexts: decodes in place all the same
    prompts = ["Compile me", "A second, longer prompt for the batch"]
    params = SamplingParams(max_tokens=8, ignore_eos=True)
    plugins = ["continuous_batching", {"paged_kv": {"block_size": 4}}]
    eager = Pipeline.from_dict(tiny_pipeline_dict(tiny_llama_dir, plugins=plugins), progress=False)
    pipe = Pipeline.from_dict(tiny_pipeline_dict(tiny_llama_dir, plugins=plugins, attention=cls.name,
                                                 compile={"enabled": True, "buckets": [1, 2]},
                                                 limits={"max_model_len": 256, "max_num_seqs": 2,
                                                         "max_num_batched_tokens": 512}), progress=False)
    assert pipe.runner.attention._fns
    calls = []
    compiled_fn = pipe.runner._compiled
    pipe.runner._compiled = lambda *a: calls.append(1) or compiled_fn(*a)
    before = counters["stats"]["unique_graphs"]
    out = pipe.generate(prompts, params)
    assert [r.token_ids for r in out] == [r.token_ids for r in eager.generate(prompts, params)]
    assert len(calls) >= 7 and pipe.info()["attention"] == cls.name
    assert counters["stats"]["unique_graphs"] == before


def test_compile_mode_builds_with_the_runner_options(tiny_llama_dir):
    """A ``compile.mode`` becomes its options beside the runner's own (torch.compile refuses a mode and options
    together): reduce-overhead builds on CPU, where it has no CUDA graphs to take, and gives the eager tokens."""
    params = SamplingParams(max_tokens=6, ignore_eos=True)
    limits = {"max_model_len": 128, "max_num_seqs": 1, "max_num_batched_tokens": 128}
    eager = Pipeline.from_dict(tiny_pipeline_dict(tiny_llama_dir, limits=limits), progress=False)
    pipe = Pipeline.from_dict(tiny_pipeline_dict(tiny_llama_dir, limits=limits, compile={
        "enabled": True, "mode": "reduce-overhead", "buckets": [1]}), progress=False)
    assert pipe.generate(["Hello"], params)[0].token_ids == eager.generate(["Hello"], params)[0].token_ids


def test_compiled_decode_compiles_nothing_after_the_build(tiny_llama_dir):
    """The build's warm-up compiles the graph that serves every key length (dynamo recompiles once, on the first
    new padded length), so a request whose context crosses several padded lengths compiles nothing."""
    from torch._dynamo.utils import counters

    pipe = Pipeline.from_dict(tiny_pipeline_dict(tiny_llama_dir, compile={"enabled": True, "buckets": [1]},
                                                 limits={"max_model_len": 256, "max_num_seqs": 1,
                                                         "max_num_batched_tokens": 256}), progress=False)
    before = counters["stats"]["unique_graphs"]
    out = pipe.generate(["Compile me"], SamplingParams(max_tokens=150, ignore_eos=True))
    assert len(out[0].token_ids) == 150  # past three padded key lengths (kv_multiple 64)
    assert counters["stats"]["unique_graphs"] == before


def test_the_build_compiles_one_graph_per_bucket(tiny_llama_dir):
    """A compiled decode step's key length is dynamic from its first trace (the gather path marks it), so the
    build's warm-up compiles one graph per batch bucket, not a graph for its first key length and then a dynamic
    one at the second (default model, int8 compiled: a cached build 21.7 -> 13.6 s)."""
    from torch._dynamo.utils import counters

    before = counters["stats"]["unique_graphs"]
    pipe = Pipeline.from_dict(tiny_pipeline_dict(tiny_llama_dir, attention="sdpa_gather",
                                                 compile={"enabled": True, "buckets": [1, 2]},
                                                 limits={"max_model_len": 256, "max_num_seqs": 2,
                                                         "max_num_batched_tokens": 256}), progress=False)
    assert counters["stats"]["unique_graphs"] - before == 2
    out = pipe.generate(["Compile me"], SamplingParams(max_tokens=80, ignore_eos=True))  # past a padded length
    assert len(out[0].token_ids) == 80 and counters["stats"]["unique_graphs"] - before == 2


def test_two_compiled_runners_keep_their_own_graphs(tiny_llama_dir, tmp_path, tokenizer):
    """Each runner compiles its own copy of the forward and guards only its arguments, not the model it closes over:
    two models whose steps take the same arguments (other weights, int8 projections in the second), compiled in
    one process, each give their own eager tokens; one shared graph would run the first model's code on both."""
    other = make_tiny_model("llama", tmp_path / "other", tokenizer, initializer_range=0.3)
    params = SamplingParams(max_tokens=12, ignore_eos=True)
    limits = {"max_model_len": 256, "max_num_seqs": 1, "max_num_batched_tokens": 256}
    plain = ["continuous_batching", "paged_kv"]
    models = [(tiny_llama_dir, plain), (other, plain + ["int8"])]
    eager = [Pipeline.from_dict(tiny_pipeline_dict(d, limits=limits, plugins=plugins), progress=False)
             .generate(["Two models"], params)[0].token_ids for d, plugins in models]
    assert eager[0] != eager[1]
    pipes = [Pipeline.from_dict(tiny_pipeline_dict(d, limits=limits, plugins=plugins,
                                                   compile={"enabled": True, "buckets": [1]}), progress=False)
             for d, plugins in models]
    for _ in range(2):
        assert [p.generate(["Two models"], params)[0].token_ids for p in pipes] == eager


def test_compiled_step_holds_the_weights_instead_of_taking_them_as_inputs(tiny_llama_dir):
    """The runner traces with dynamo's ``install_free_tensors``: the weights become attributes of the graph, so the
    code run before each call does not gather every weight from the modules. The graph's inputs are the step's
    own (tokens, positions, slots, logit rows, attention metadata, the KV pool), whatever the model's size."""
    from torch._dynamo import register_backend

    seen = []

    @register_backend(name="tokenmill_test_inputs")
    def record_inputs(gm, example_inputs):
        seen.append([x.data_ptr() for x in example_inputs if isinstance(x, torch.Tensor)])
        return gm.forward

    pipe = Pipeline.from_dict(tiny_pipeline_dict(tiny_llama_dir, compile={"enabled": True, "buckets": [1],
                                                                         "backend": "tokenmill_test_inputs"}),
                              progress=False)
    pipe.generate(["Compile me"], SamplingParams(max_tokens=4, ignore_eos=True))
    weights = {p.data_ptr() for p in pipe.runner.model.parameters()}
    assert seen and all(inputs and not weights & set(inputs) for inputs in seen)
