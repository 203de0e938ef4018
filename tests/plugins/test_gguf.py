"""The ``gguf`` plugin: a GGUF file's own codes become the int4 / group-int8 modules, checked against the
float weights the model was loaded with."""
from __future__ import annotations

import gguf
import numpy as np
import pytest
import torch

from tests.conftest import tiny_pipeline_dict
from tokenmill import Pipeline, SamplingParams
from tokenmill.errors import PipelineError
from tokenmill.plugins.quant import GGUF, Int4Linear, Int8GroupLinear, QuantizedEmbedding
from tokenmill.plugins.quant.gguf import _rope_orders
from tokenmill.plugins.quant.gguf_codes import GgufFile, _decode


def encoded(w: np.ndarray, kind: str):
    """``w`` quantized by the gguf package (as llama.cpp's quantizer lays it out), decoded by us."""
    raw = gguf.quants.quantize(w, getattr(gguf.GGMLQuantizationType, kind))
    return raw, _decode("t", kind, raw, *w.shape)


@pytest.mark.parametrize("kind", ["Q4_0", "Q4_1", "Q8_0"])
def test_codes_dequantize_exactly_as_the_gguf_package(kind):
    w = np.random.default_rng(0).standard_normal((48, 96)).astype(np.float32)
    raw, t = encoded(w, kind)
    ref = gguf.quants.dequantize(raw, getattr(gguf.GGMLQuantizationType, kind))
    assert torch.equal(t.dequantize(), torch.from_numpy(ref))
    assert t.q.dtype == (torch.int8 if kind == "Q8_0" else torch.uint8) and t.d.dtype == torch.float16


def test_int4_module_from_q4_codes_is_the_gguf_weight():
    w = np.random.default_rng(1).standard_normal((64, 128)).astype(np.float32)
    _, t = encoded(w, "Q4_1")
    plugin = GGUF(GGUF.Options(compute_dtype="float32"))
    mod = plugin._module(t, None, torch.float32)
    assert isinstance(mod, Int4Linear) and mod.group_size == 32
    torch.testing.assert_close(mod.dequantize(), t.dequantize(), rtol=0, atol=1e-6)  # exact scales in float32
    x = torch.randn(3, 128)
    torch.testing.assert_close(mod(x), x @ t.dequantize().t(), rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("rows", [1, 5, 20])
def test_group_int8_matches_reference(rows):
    w = np.random.default_rng(2).standard_normal((80, 96)).astype(np.float32)
    _, t = encoded(w, "Q8_0")
    mod = Int8GroupLinear(t.q, t.d, torch.randn(80), compute_dtype=torch.float32)
    assert torch.equal(mod.dequantize(), t.dequantize())
    x = torch.randn(rows, 96)
    torch.testing.assert_close(mod(x), mod.reference_forward(x), rtol=1e-4, atol=1e-4)
    ids = torch.tensor([[0, 79], [3, 3]])
    assert torch.equal(mod.rows(ids, torch.float32), t.dequantize()[ids])
    meta, tensors = mod.portable_state()
    again = Int8GroupLinear.from_portable(meta, tensors, compute_dtype=torch.float32, device=torch.device("cpu"))
    assert torch.equal(again.dequantize(), mod.dequantize()) and torch.equal(again.bias, mod.bias)


class Names:
    def __init__(self, mapping):
        self.mapping = mapping

    def get_name(self, name):
        return self.mapping.get(name)


def plugin_over(tensors: dict, heads=(4, 2)) -> GGUF:
    """A plugin with an in-memory 'file' (what calibrate would have read)."""
    plugin = GGUF(GGUF.Options(compute_dtype="float32"))
    plugin.file = GgufFile("mem.gguf", "llama", tensors, {"blk.0.ffn_norm.weight": "F32"})
    plugin._names = Names({"q": "blk.0.attn_q", "k": "blk.0.attn_k", "x": "blk.0.attn_v", "n": "blk.0.ffn_norm"})
    plugin._heads = heads
    return plugin


def test_rotary_row_order_is_found_and_a_mismatch_is_an_error():
    w = np.random.default_rng(3).standard_normal((64, 64)).astype(np.float32)
    _, t = encoded(w, "Q4_0")
    plugin = plugin_over({"blk.0.attn_q.weight": t, "blk.0.attn_k.weight": t, "blk.0.attn_v.weight": t})
    order = _rope_orders(64, 4)[0]
    assert torch.equal(torch.sort(order).values, torch.arange(64)) and not torch.equal(order, torch.arange(64))
    permuted = torch.nn.Linear(64, 64, bias=False)
    permuted.weight.data = t.dequantize()[order].clone()  # what transformers' loader does to q/k rows
    mod = plugin.quantize_layer(name="q", module=permuted, model_config=None)
    torch.testing.assert_close(mod.dequantize(), permuted.weight, rtol=0, atol=1e-6)
    assert plugin.source["q"] == "Q4_0"
    other = torch.nn.Linear(64, 64, bias=False)
    with pytest.raises(PipelineError, match=r"blk\.0\.attn_v\.weight .*does not hold the weights of 'x'"):
        plugin.quantize_layer(name="x", module=other, model_config=None)
    assert plugin.quantize_layer(name="n", module=torch.nn.Linear(64, 64), model_config=None) is None
    assert "F32" in plugin.left_float["n"]


def test_options_and_a_model_without_a_gguf_fail_clearly(tiny_llama_dir):
    with pytest.raises(ValueError, match="'gptq' does not apply"):
        GGUF.Options(gptq=True)
    with pytest.raises(PipelineError, match="was not loaded from a GGUF file"):
        Pipeline.from_dict(tiny_pipeline_dict(tiny_llama_dir, plugins=[{"gguf": {}}]), progress=False)


def test_default_model_runs_from_its_shipped_codes(default_model_dir):
    """Integration: every decoder layer from the file's Q4_1 codes, the tied embedding / head from its Q8_0,
    about 0.18x of the float weights, and the next tokens those of the float model."""
    pipe = Pipeline.from_yaml("pipelines/gguf.yaml", progress=False)
    plugin = pipe.plugins["gguf"]
    assert set(plugin.source.values()) == {"Q4_1", "Q8_0", "shared"} and not plugin.left_float
    assert not plugin.file.tensors  # no second copy of the codes kept after the build
    model = pipe.loaded.model
    assert isinstance(model.model.embed_tokens, QuantizedEmbedding) and model.model.embed_tokens.table is model.lm_head
    assert pipe.info()["weight_bytes"] < 0.2 * 538_060_288
    float_pipe = Pipeline.from_yaml("pipelines/default.yaml", progress=False)
    q = model.model.layers[3].self_attn.q_proj.dequantize()
    err = (q - float_pipe.loaded.model.model.layers[3].self_attn.q_proj.weight).abs()
    assert err.max() < 1e-2 and err.mean() < 1e-3  # the codes are the file's; scales and zeros rounded to bf16
    ids = pipe.encode("The capital of France is", chat=True)
    params = SamplingParams(max_tokens=8, ignore_eos=True)
    assert pipe.generate([ids], params)[0].token_ids == float_pipe.generate([ids], params)[0].token_ids
