"""int8 activations (``int8: {activations: int8}``): the smoothed module against its float reference, the
compiled VNNI product against the float rounding of the same activations, the calibrated pipeline."""
from __future__ import annotations

import pytest
import torch

from tests.conftest import tiny_pipeline_dict
from tokenmill import Pipeline, PipelineError, SamplingParams
from tokenmill.plugins.quant import Int8Linear, int8_act
from tokenmill.plugins.quant.int8 import quantize_int8

needs_onednn = pytest.mark.skipif(not int8_act.available(), reason="no oneDNN quantized linear in this build")


def smoothed_module(n: int, k: int, outliers: int = 3, seed: int = 0) -> tuple[Int8Linear, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(n, k, generator=g)
    amax = torch.rand(k, generator=g) + 0.1
    amax[:outliers] *= 40  # a few loud channels, as in real hidden states
    smooth = int8_act.smoothing(amax, w, 0.5)
    q, scales = quantize_int8(w * smooth)
    idx, splits = int8_act.outlier_channels(amax, smooth, outliers)
    mod = Int8Linear(q, scales, None, compute_dtype=torch.float32, kernel_max_rows=8, smooth=smooth,
                     outliers=idx, splits=splits)
    return mod, w


@needs_onednn
def test_smoothing_is_undone_by_the_module():
    mod, w = smoothed_module(48, 70)
    assert set(mod.act.outliers.tolist()) == {0, 1, 2}  # the loud channels leave the int8 product
    # the weight in its own units, to half an int8 step of its smoothed row, divided back by each column's factor
    half_step = (w * mod.act.smooth).abs().amax(1, keepdim=True) / 127 / 2 / mod.act.smooth
    assert ((mod.dequantize() - w).abs() <= half_step * 1.001 + 1e-7).all()
    ids = torch.tensor([[0, 47], [5, 9]])
    assert torch.allclose(mod.rows(ids, torch.float32), mod.dequantize()[ids])


@needs_onednn
def test_activations_are_rounded_per_row_with_the_loud_channels_split():
    mod, _ = smoothed_module(32, 64)
    x = torch.randn(5, 64) * 3
    x[:, :3] *= 40  # loud where the calibration saw loud channels
    xs = x / mod.act.smooth
    fq = mod.act.fake_quantize(xs)
    assert (mod.act.splits > 1).all() and len(mod.act.outliers) == 3  # the loud channels enter as several copies
    step = (xs * mod.act.scale_in[:64]).abs().amax(-1, keepdim=True) / 127  # the row's step follows the quiet ones
    assert (xs.abs().amax(-1, keepdim=True) > 127 * step).any()  # a loud channel is past its row's int8 range ...
    assert ((fq - xs).abs() <= step / 2 + 1e-6).all()  # ... and still, as every channel, within half a step
    assert not torch.equal(fq, xs)
    torch.testing.assert_close(mod(x), torch.nn.functional.linear(fq, mod.dequantize() * mod.act.smooth),
                               rtol=1e-4, atol=1e-4)


@needs_onednn
def test_a_column_share_keeps_its_split_channels():
    """Tensor parallelism's column share (``take(1, ...)``): divisors, loud channels and their copy counts follow
    the columns it keeps, renumbered."""
    mod, _ = smoothed_module(32, 64)
    assert mod.act.outliers.tolist() == [0, 1, 2] and mod.act.splits.tolist() != [1, 1, 1]
    index = torch.arange(1, 40)
    part = mod.take(1, index)
    assert part.act.outliers.tolist() == [0, 1]  # channels 1 and 2
    assert part.act.splits.tolist() == mod.act.splits[1:].tolist()
    torch.testing.assert_close(part.act.smooth, mod.act.smooth[index])
    rows = mod.take(0, torch.arange(8))
    assert torch.equal(rows.act.outliers, mod.act.outliers) and torch.equal(rows.act.splits, mod.act.splits)


@needs_onednn
def test_compiled_vnni_product_matches_the_float_rounding():
    import torch._inductor.config as ic

    from torch._dynamo.utils import counters

    mod, _ = smoothed_module(64, 96)
    x = torch.randn(1, 96) * 2
    with torch.inference_mode():
        expect = mod(x)  # eager: the same rounding of x, multiplied in float
        torch._dynamo.reset()
        counters.clear()
        with ic.patch(freezing=True):
            fn = torch.compile(mod, options={k: v for k, v in int8_act.INDUCTOR_OPTIONS.items() if k != "freezing"})
            got = fn(x)
    close = (got - expect).abs().max() / expect.abs().max()
    assert close < 1e-4, close.item()
    # the weight reaches inductor as a plain tensor, so its FX graph cache can keep the step (a weight prepacked
    # for oneDNN is a tensor it cannot pickle: it bypassed the cache, and every process compiled again)
    assert not counters["inductor"]["fxgraph_cache_bypass"]
    assert counters["inductor"]["fxgraph_cache_miss"] + counters["inductor"]["fxgraph_cache_hit"] == 1
    assert counters["inductor"]["cpp_templated_kernel_counter"] >= 1  # the VNNI product is the GEMM template's


def test_activation_options_are_checked(tiny_llama_dir):
    def build(opts):
        return Pipeline.from_dict(tiny_pipeline_dict(tiny_llama_dir, plugins=[{"int8": opts}]), progress=False)

    for opts, msg in [({"activations": "int4"}, "option 'activations' of plugin 'int8' must be 'float' | 'int8', got 'int4'"),
                      ({"activations": "int8", "smooth_alpha": 2}, r"smooth_alpha must be in \[0, 1\], got 2"),
                      ({"activations": "int8", "outlier_channels": -1}, "outlier_channels must be >= 0, got -1"),
                      ({"activations": "int8", "gptq": True}, "does not combine with gptq")]:
        with pytest.raises(PipelineError, match=msg):
            build(opts)


@needs_onednn
def test_calibrated_pipeline_compiles_to_the_eager_tokens(tiny_llama_dir):
    """The build calibrates every decoder layer (the tied head stays weight-only); the compiled step runs the
    VNNI product under freezing and gives the eager pipeline's tokens."""
    opts = {"activations": "int8", "compute_dtype": "float32"}
    eager = Pipeline.from_dict(tiny_pipeline_dict(tiny_llama_dir, plugins=[{"int8": opts}]), progress=False)
    model = eager.loaded.model
    assert model.model.layers[0].self_attn.q_proj.act is not None
    assert model.lm_head.act is None
    prompts = ["Compile me", "A second, longer prompt for the batch"]
    params = SamplingParams(max_tokens=8, ignore_eos=True)
    expect = [r.token_ids for r in eager.generate(prompts, params)]
    pipe = Pipeline.from_dict(tiny_pipeline_dict(tiny_llama_dir, plugins=[{"int8": opts}],
                                                 compile={"enabled": True, "buckets": [1, 2]}), progress=False)
    assert [r.token_ids for r in pipe.generate(prompts, params)] == expect
