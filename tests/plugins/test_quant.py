"""Quantization plugins: formats, fast paths against their references, layer selection, tied embeddings,
save/load, and quantized pipelines with continuous batching, paged KV and torch.compile (tiny models).

Tolerances: bfloat16 compute (the default; the CPU kernels are vectorized for bf16 activations) rounds
activations and outputs to bf16, so fast and reference outputs agree to within 1 % of the output's largest
magnitude; float32 compute agrees to 1e-4 relative; NF4's compiled GEMV runs in float32 (1e-4).
"""
from __future__ import annotations

import json

import pytest
import torch

from tests.conftest import make_tiny_model, tiny_pipeline_dict
from tokenmill import Pipeline, PipelineError, SamplingParams
from tokenmill.plugins.quant import Int4Linear, Int8Linear, NF4Linear, QuantizedEmbedding
from tokenmill.plugins.quant.int4 import (CpuInt4Layout, dequantize_int4, pack_int4, quantize_int4,
                                          unpack_int4)
from tokenmill.plugins.quant.int8 import dequantize_int8, quantize_int8
from tokenmill.plugins.quant.nf4 import (CODE, NF4_QLORA, double_dequantize, double_quantize, nf4_codebook,
                                         pack_nf4, quantize_nf4, unpack_nf4)

SHAPES = [(64, 64), (100, 70), (33, 200), (48, 17), (576, 576)]  # odd, not divisible by 16 or by the group


def close(fast, ref, rel):
    err = (fast.float() - ref.float()).abs().max().item()
    scale = ref.float().abs().max().item()
    assert err <= rel * scale, f"max |fast - ref| = {err:.3g} > {rel} * {scale:.3g}"


# ------------------------------------------------------------------------------------------- formats
def test_nf4_codebook_matches_qlora():
    code = nf4_codebook()
    assert code.shape == (16,) and torch.all(code[1:] > code[:-1])
    assert code[0] == -1.0 and code[-1] == 1.0 and (code == 0).sum() == 1
    assert (code - torch.tensor(NF4_QLORA)).abs().max() < 1e-4


def test_int4_portable_pack_round_trips():
    q = torch.randint(0, 16, (37, 96), dtype=torch.uint8)
    p = pack_int4(q)
    assert p.shape == (37, 48) and p.dtype == torch.uint8
    assert torch.equal(unpack_int4(p), q)
    assert torch.equal(p[:, 0] & 15, q[:, 0]) and torch.equal(p[:, 0] >> 4, q[:, 1])


@pytest.mark.parametrize("n,k", [(16, 32), (48, 64), (64, 96), (112, 128), (208, 576)])
def test_int4_cpu_kernel_layout_round_trips(n, k):
    q = torch.randint(0, 16, (n, k), dtype=torch.uint8)
    packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(q.to(torch.int32), 2)
    layout = CpuInt4Layout(n, k)
    assert torch.equal(layout.unpack(packed), q)
    ids = torch.tensor([0, n - 1, n // 2, 17 % n, n - 1])
    assert torch.equal(layout.gather_rows(packed, ids), q[ids])


def test_nf4_pack_round_trips():
    q = torch.randint(0, 16, (5, 128), dtype=torch.uint8)
    assert torch.equal(unpack_nf4(pack_nf4(q, 64), 64), q)


def test_quantization_errors_are_small():
    torch.manual_seed(0)
    w = torch.randn(96, 192)
    q8, s8 = quantize_int8(w)
    assert ((dequantize_int8(q8, s8) - w).abs() <= s8[:, None] / 2 + 1e-6).all()
    q4, s4, z4 = quantize_int4(w, 32, torch.float32)
    err4 = dequantize_int4(q4, s4, z4, 32) - w
    assert (err4.abs() <= s4.repeat_interleave(32, 1) / 2 + 1e-5).all()
    qn, absmax = quantize_nf4(w, 64)
    wn = (CODE[qn.long()].view(96, 3, 64) * absmax[..., None]).view(96, 192)
    assert ((wn - w).norm() / w.norm()) < 0.12  # NF4 on Gaussian weights: ~0.09


def test_double_quant_error_bound():
    torch.manual_seed(0)
    absmax = torch.rand(1000) * 3 + 0.1
    codes, scale, mean = double_quantize(absmax)
    assert codes.dtype == torch.int8 and codes.numel() == 1024 and scale.numel() == 4
    back = double_dequantize(codes, scale, mean, 1000)
    bound = scale.repeat_interleave(256)[:1000] / 2
    assert ((back - absmax).abs() <= bound + 1e-6).all()
    assert ((back - absmax).abs() / absmax).mean() < 0.01


# ------------------------------------------------------------------------------ fast path vs reference
@pytest.mark.parametrize("n,k", SHAPES)
def test_int8_fast_matches_reference(n, k):
    torch.manual_seed(n * k)
    w, b = torch.randn(n, k), torch.randn(n)
    for cd, rel in ((torch.bfloat16, 1e-2), (torch.float32, 1e-4)):
        mod = Int8Linear.from_float(w, b, compute_dtype=cd, kernel_max_rows=8)
        for m in (1, 3, 20):  # kernel, kernel, dense path
            x = torch.randn(m, k)
            close(mod(x), mod.reference_forward(x), rel)
        ids = torch.tensor([[0, n - 1], [n // 2, 1]])
        assert torch.equal(mod.rows(ids, torch.float32), mod.dequantize()[ids])


@pytest.mark.parametrize("n,k", SHAPES)
@pytest.mark.parametrize("group", [32, 64, 128])
def test_int4_fast_matches_reference(n, k, group):
    torch.manual_seed(n * k + group)
    w = torch.randn(n, k)
    mod = Int4Linear.from_float(w, None, group_size=group, compute_dtype=torch.bfloat16, kernel_max_rows=4,
                                compile_kernels=False)
    assert mod.layout is not None  # the packed kernel layout is the only copy
    for m in (1, 4, 9):  # kernel, kernel, dense (eager unpack + dequantize)
        x = torch.randn(m, k)
        y = mod(x)
        assert y.shape == (m, n)
        close(y, mod.reference_forward(x), 1e-2)
    ids = torch.tensor([0, n - 1, n // 3])
    assert torch.equal(mod.rows(ids, torch.float32), mod.dequantize()[ids])
    ref32 = Int4Linear.from_float(w, None, group_size=group, compute_dtype=torch.float32, compile_kernels=False)
    x = torch.randn(2, k)
    close(ref32(x), ref32.reference_forward(x), 1e-4)


def test_int4_parts_fuse_into_one_kernel_call_over_shared_storage():
    """q/k/v-like parts become one module whose output is the parts' outputs side by side, the parts' packed
    codes views of its storage (they still compute alone, and save, as before); parts that differ stay apart."""
    torch.manual_seed(7)
    parts = [Int4Linear.from_float(torch.randn(n, 128), None, group_size=32, compute_dtype=torch.bfloat16,
                                   compile_kernels=False) for n in (192, 64, 64)]
    xs = [torch.randn(m, 128) for m in (1, 2, 9)]
    alone = [[p(x) for p in parts] for x in xs]
    saved = [p.portable_state()[1]["qweight"].clone() for p in parts]
    fused = Int4Linear.fuse(parts)
    assert fused is not None and fused.out_features == 320
    for x, outs in zip(xs, alone):
        torch.testing.assert_close(fused(x), torch.cat(outs, dim=-1), rtol=0, atol=0)
        for p, out in zip(parts, outs):
            assert torch.equal(p(x), out)
    for p, q in zip(parts, saved):
        assert p.packed.untyped_storage().data_ptr() == fused.packed.untyped_storage().data_ptr()
        assert torch.equal(p.portable_state()[1]["qweight"], q)
    other = Int4Linear.from_float(torch.randn(64, 128), None, group_size=64, compute_dtype=torch.bfloat16,
                                  compile_kernels=False)
    assert Int4Linear.fuse([parts[1], other]) is None and Int4Linear.fuse(parts[:1]) is None


def test_dynamic_shape_runners_keep_quantized_parts_apart(tiny_llama_dir, monkeypatch):
    """A runner compiled with dynamic shapes (the speculative plugin's draft) does not fuse quantized q/k/v or
    gate/up: traced with symbolic sizes, the fused modules took the self-draft's first compile to 570 s instead
    of 85. Any other runner fuses them."""
    from tokenmill.model import ModelRunner
    from tokenmill.spec import CompileSpec

    pipe = quant_pipe(tiny_llama_dir, "int4", {"group_size": 32, "compile_kernels": False})
    calls = []
    fuse = Int4Linear.fuse.__func__
    monkeypatch.setattr(Int4Linear, "fuse",
                        classmethod(lambda cls, mods: calls.append(len(mods)) or fuse(cls, mods)))
    model, pool = pipe.loaded.model, pipe.runner.pool
    ModelRunner(model, pool, compile_spec=CompileSpec(enabled=True, dynamic=True, buckets=[1, 2]))
    assert calls == []
    ModelRunner(model, pool, compile_spec=CompileSpec(enabled=True, dynamic=False, buckets=[1]))
    layers = model.config.num_hidden_layers
    assert sorted(calls) == [2] * layers + [3] * layers  # gate/up and q/k/v of every layer


@pytest.mark.parametrize("n,k,block,dq", [(64, 64, 64, True), (100, 70, 64, False), (48, 200, 32, True)])
def test_nf4_eager_matches_reference(n, k, block, dq):
    torch.manual_seed(n + k)
    w = torch.randn(n, k)
    mod = NF4Linear.from_float(w, torch.randn(n), block_size=block, double_quant=dq, compute_dtype=torch.float32,
                               compile_kernels=False)
    for m in (1, 7):
        x = torch.randn(m, k)
        close(mod(x), mod.reference_forward(x), 1e-4)
    ids = torch.tensor([1, n - 1])
    assert torch.equal(mod.rows(ids, torch.float32), mod.dequantize()[ids])


def test_compiled_kernels_match_reference():
    torch.manual_seed(3)
    n, k = 40, 100  # K padded to 128
    mod = NF4Linear.from_float(torch.randn(n, k), None, block_size=64, double_quant=True,
                               compute_dtype=torch.float32, kernel_max_rows=1)
    x1 = torch.randn(1, k)
    close(mod(x1), mod.reference_forward(x1), 1e-4)  # compiled fused GEMV
    x5 = torch.randn(5, k)
    close(mod(x5), mod.reference_forward(x5), 1e-4)  # compiled dequant + dense GEMM
    int4 = Int4Linear.from_float(torch.randn(n, k), None, group_size=32, compute_dtype=torch.bfloat16,
                                 kernel_max_rows=1)
    assert torch.equal(int4._dequant_padded(torch.float32)[:n, :k], int4.dequantize())  # compiled unpack
    close(int4(x5), int4.reference_forward(x5), 1e-2)


# ------------------------------------------------------------------------------------- in pipelines
@pytest.fixture(scope="module")
def tiny_qwen_dir(tmp_path_factory, tokenizer):
    """Tied embedding / LM head, biases on q/k/v."""
    return make_tiny_model("qwen2", tmp_path_factory.mktemp("tiny-qwen2-quant"), tokenizer)


@pytest.fixture(autouse=True)
def private_gptq_cache(tmp_path, monkeypatch):
    """GPTQ results are cached in a per-test directory, never in the user's cache."""
    from tokenmill.plugins.quant import gptq_cache

    monkeypatch.setattr(gptq_cache, "cache_path", lambda plugin, key: tmp_path / "gptq" / f"{plugin.name}-{key}")
    return tmp_path / "gptq"


def quant_pipe(model_dir, plugin: str, opts: dict | None = None, **extra) -> Pipeline:
    return Pipeline.from_dict(tiny_pipeline_dict(model_dir, plugins=[{plugin: opts or {}}], **extra), progress=False)


# hidden size 64 makes per-row / per-group constants relatively larger than in real models (the default
# model's ratios are measured by benchmarks/quant.py: int8 0.25x, int4 g32 0.16x, nf4 0.14x)
@pytest.mark.parametrize("plugin,opts,max_ratio", [
    ("int8", {}, 0.28), ("int4", {"group_size": 32, "compile_kernels": False}, 0.18),
    ("nf4", {"compile_kernels": False}, 0.17),
    ("int4", {"group_size": 32, "lm_head_int8_rows": 20000, "compile_kernels": False}, 0.21)])
def test_tied_embedding_shares_one_quantized_copy(tiny_qwen_dir, plugin, opts, max_ratio):
    base = Pipeline.from_dict(tiny_pipeline_dict(tiny_qwen_dir), progress=False)
    pipe = quant_pipe(tiny_qwen_dir, plugin, opts)
    model = pipe.loaded.model
    emb = model.model.embed_tokens
    assert isinstance(emb, QuantizedEmbedding) and emb.table is model.lm_head
    assert "model.embed_tokens" in pipe.quantized_layers and "lm_head" in pipe.quantized_layers
    ratio = pipe.info()["weight_bytes"] / base.info()["weight_bytes"]
    assert ratio <= max_ratio, ratio
    ids = torch.tensor([[1, 5, 200, 19999, 20000, 40000]])
    assert torch.equal(emb(ids), model.lm_head.dequantize()[ids])
    if opts.get("lm_head_int8_rows"):  # first rows int8, the rest int4, one module serving both ends
        assert [p.kind for p in model.lm_head.parts] == ["int8", plugin]
        x = torch.randn(3, model.config.hidden_size)
        close(model.lm_head(x), model.lm_head.reference_forward(x), 1e-2)
    assert model.model.layers[0].self_attn.q_proj.bias is not None  # qwen2 biases carried over
    out = pipe.generate(["Hello there"], SamplingParams(max_tokens=6, ignore_eos=True))[0]
    assert len(out.token_ids) == 6


def test_layer_selection_options(tiny_llama_dir):
    pipe = quant_pipe(tiny_llama_dir, "int8", {"skip": ["*.mlp.down_proj"], "lm_head": False,
                                               "embed_tokens": False})
    names = pipe.quantized_layers
    assert names and not any(n.endswith("down_proj") for n in names)
    assert "lm_head" not in names and "model.embed_tokens" not in names
    assert type(pipe.loaded.model.lm_head) is torch.nn.Linear
    only = quant_pipe(tiny_llama_dir, "int4", {"include": ["model.layers.1.*"], "group_size": 32})
    assert only.quantized_layers and all(n.startswith("model.layers.1.") for n in only.quantized_layers)


def test_bad_options_fail_at_load(tiny_llama_dir):
    with pytest.raises(PipelineError, match="group_size must be one of 32, 64, 128, 256"):
        quant_pipe(tiny_llama_dir, "int4", {"group_size": 48})
    with pytest.raises(PipelineError, match="unknown option 'groupsize'"):
        quant_pipe(tiny_llama_dir, "int4", {"groupsize": 32})


def test_quantized_continuous_paged_pipeline_generates(tiny_llama_dir):
    plugins = [{"continuous_batching": {"chunked_prefill": True}},
               {"paged_kv": {"block_size": 8, "num_blocks": 64}},
               {"int8": {"compute_dtype": "float32"}}]
    pipe = Pipeline.from_dict(tiny_pipeline_dict(tiny_llama_dir, plugins=plugins,
                                                 limits={"max_model_len": 256, "max_num_seqs": 8,
                                                         "max_num_batched_tokens": 24}), progress=False)
    single = Pipeline.from_dict(tiny_pipeline_dict(tiny_llama_dir, plugins=[{"int8": {"compute_dtype": "float32"}}]),
                                progress=False)
    prompts = ["The quick brown fox", "A much longer prompt that needs chunked prefill over several steps " * 2,
               "Hi", "Numbers: 1 2 3 4"]
    params = SamplingParams(max_tokens=12, ignore_eos=True)
    batched = pipe.generate(prompts, params)
    assert all(len(r.token_ids) == 12 for r in batched)
    assert [r.token_ids for r in batched] == [single.generate([p], params)[0].token_ids for p in prompts]
    assert pipe.stats()["kv"]["used_blocks"] == 0 or pipe.stats()["kv"]["usage"] < 1


def test_compiled_quantized_matches_eager(tiny_llama_dir):
    opts = {"group_size": 32}
    prompts = ["Compile me", "A second, longer prompt for the batch"]
    params = SamplingParams(max_tokens=8, ignore_eos=True)
    eager = quant_pipe(tiny_llama_dir, "int4", opts).generate(prompts, params)
    pipe = quant_pipe(tiny_llama_dir, "int4", opts, compile={"enabled": True, "buckets": [1, 2]})
    compiled = pipe.generate(prompts, params)
    assert [r.token_ids for r in compiled] == [r.token_ids for r in eager]
    assert pipe.info()["compiled"]


# ------------------------------------------------------------------------------------ save and load
@pytest.mark.parametrize("plugin,opts", [("int4", {"group_size": 64, "lm_head_int8_rows": 30000}),
                                         ("nf4", {"compile_kernels": False}), ("int8", {})])
def test_saved_checkpoint_reloads_identically(tiny_qwen_dir, tmp_path, plugin, opts):
    from tokenmill.plugins.quant.checkpoint import save_quantized

    fresh = quant_pipe(tiny_qwen_dir, plugin, opts)
    manifest, yaml_path = save_quantized(fresh, tmp_path / "q")
    data = json.loads(manifest.read_text())
    assert data["method"] == plugin and data["layers"]["lm_head"]["group"] == data["layers"]["model.embed_tokens"]["group"]
    loaded = quant_pipe(tiny_qwen_dir, plugin, dict(opts, load=str(tmp_path / "q")))
    assert loaded.quantized_layers == fresh.quantized_layers
    assert loaded.loaded.model.model.embed_tokens.table is loaded.loaded.model.lm_head
    ids = torch.tensor([fresh.encode("Saving and loading quantized weights")])
    with torch.inference_mode():
        a = fresh.loaded.model(ids).logits
        b = loaded.loaded.model(ids).logits
    assert torch.equal(a, b)
    assert loaded.info()["weight_bytes"] == fresh.info()["weight_bytes"]
    assert "load:" in yaml_path.read_text()


def test_loading_with_mismatching_config_fails_clearly(tiny_qwen_dir, tiny_llama_dir, tmp_path):
    from tokenmill.plugins.quant.checkpoint import save_quantized

    save_quantized(quant_pipe(tiny_qwen_dir, "int4", {"group_size": 64}), tmp_path / "q")
    d = str(tmp_path / "q")
    with pytest.raises(PipelineError, match="group_size: checkpoint 64 vs pipeline 32"):
        quant_pipe(tiny_qwen_dir, "int4", {"group_size": 32, "load": d})
    with pytest.raises(PipelineError, match="quantized with 'int4', but the pipeline loads it through 'int8'"):
        quant_pipe(tiny_qwen_dir, "int8", {"load": d})
    with pytest.raises(PipelineError, match="quantized from another model.*model_type='qwen2'"):
        quant_pipe(tiny_llama_dir, "int4", {"group_size": 64, "load": d})
    with pytest.raises(PipelineError, match="no manifest.json"):
        quant_pipe(tiny_qwen_dir, "int4", {"group_size": 64, "load": str(tmp_path)})


def test_cli_quantize_and_perplexity(tiny_qwen_dir, tmp_path, capsys):
    import yaml

    from tokenmill.cli import main

    spec = tiny_pipeline_dict(tiny_qwen_dir, plugins=[{"int8": {}}])
    path = tmp_path / "p.yaml"
    path.write_text(yaml.safe_dump(spec))
    assert main(["quantize", str(path), "--out", str(tmp_path / "out"), "--quiet"]) == 0
    saved = tmp_path / "out" / "pipeline.yaml"
    assert saved.is_file()
    out_json = tmp_path / "ppl.json"
    assert main(["eval", "perplexity", str(saved), "--tokens", "300", "--window", "128", "--stride", "64",
                 "--json", str(out_json), "--quiet"]) == 0
    res = json.loads(out_json.read_text())
    assert res["tokens"] == 300 and res["windows"] >= 4 and res["perplexity"] > 1
    assert "over 300 tokens" in capsys.readouterr().out


# ------------------------------------------------------------------------------------------------ gptq
def correlated_inputs(n: int, k: int, seed: int = 0) -> torch.Tensor:
    """Activations with correlated channels and uneven scales (what makes GPTQ beat rounding to nearest)."""
    g = torch.Generator().manual_seed(seed)
    mix = torch.randn(k, k, generator=g) / k ** 0.5 + torch.eye(k)
    scale = torch.rand(k, generator=g) * 2 + 0.2
    return (torch.randn(n, k, generator=g) @ mix) * scale


@pytest.mark.parametrize("fmt", ["nf4", "int4", "int8"])
@pytest.mark.parametrize("act_order", [False, True])
def test_gptq_reduces_layer_output_error(fmt, act_order):
    from tokenmill.plugins.quant.gptq import gptq_quantize, relative_output_error, rtn_quantize
    from tokenmill.plugins.quant.int4 import Int4Grid
    from tokenmill.plugins.quant.int8 import Int8Grid
    from tokenmill.plugins.quant.nf4 import NF4Grid

    n, k = 48, 160  # K not a multiple of 64: a padded last NF4 block
    grid = {"nf4": NF4Grid(64), "int4": Int4Grid(32, torch.float32), "int8": Int8Grid()}[fmt]
    torch.manual_seed(5)
    w = torch.randn(n, k)
    x = correlated_inputs(1024, k)
    h = 2 * x.t() @ x / x.shape[0]
    codes, params, deq = gptq_quantize(w, h, grid, damp=0.01, act_order=act_order)
    rtn_codes, rtn_deq = rtn_quantize(w, grid)
    x_test = correlated_inputs(1536, k, seed=0)[1024:]  # same distribution, rows GPTQ did not see
    err, rtn_err = relative_output_error(w, deq, x_test), relative_output_error(w, rtn_deq, x_test)
    assert err < 0.85 * rtn_err, (err, rtn_err)
    lo, hi = (-127, 127) if fmt == "int8" else (0, 15)
    assert codes.dtype == grid.code_dtype and int(codes.min()) >= lo and int(codes.max()) <= hi
    assert codes.shape == rtn_codes.shape
    gs = grid.group_size or k
    assert all(p.shape == (n, codes.shape[1] // gs) for p in params)


@pytest.mark.parametrize("fmt", ["nf4", "int8"])
def test_gptq_refit_scales_lowers_output_error(fmt):
    """``refit_scales``: least-squares scales for GPTQ's codes lower the layer's output error under the
    calibration Hessian (codes unchanged); a grid with zero points cannot refit."""
    from tokenmill.plugins.quant.gptq import gptq_quantize, relative_output_error
    from tokenmill.plugins.quant.int4 import Int4Grid
    from tokenmill.plugins.quant.int8 import Int8Grid
    from tokenmill.plugins.quant.nf4 import NF4Grid

    grid = {"nf4": NF4Grid(64), "int8": Int8Grid()}[fmt]
    torch.manual_seed(3)
    w = torch.randn(48, 160)
    x = correlated_inputs(1024, 160)
    h = 2 * x.t() @ x / x.shape[0]
    codes, params, deq = gptq_quantize(w, h, grid, act_order=True)
    codes2, params2, deq2 = gptq_quantize(w, h, grid, act_order=True, refit=True)
    assert torch.equal(codes, codes2) and not torch.equal(params[0], params2[0])
    assert relative_output_error(w, deq2, x) < relative_output_error(w, deq, x)
    gs = grid.group_size or 160
    values = grid.levels(codes2).view(48, -1, gs) * params2[0][..., None]
    assert torch.allclose(values.view(48, -1)[:, :160], deq2)
    with pytest.raises(ValueError, match="refit_scales needs a scale-only grid"):
        gptq_quantize(w, h, Int4Grid(32, torch.float32), refit=True)
    from tokenmill.plugins.quant.int4 import Int4

    with pytest.raises(ValueError, match="refit_scales is for scale-only grids"):
        Int4.Options(gptq={"refit_scales": True})


@pytest.mark.parametrize("plugin,opts", [("nf4", {"double_quant": False, "compile_kernels": False}),
                                         ("int4", {"group_size": 32, "compute_dtype": "float32"}), ("int8", {})])
def test_gptq_modules_hold_what_gptq_chose(plugin, opts):
    """The module built from GPTQ's codes dequantizes to exactly the weight GPTQ computed."""
    from tokenmill.host import discover_plugins
    from tokenmill.options import build_options
    from tokenmill.plugins.quant.gptq import gptq_quantize

    cls = discover_plugins()[plugin].load()
    p = cls(build_options(cls.Options, dict(opts, gptq=True), plugin))
    w, b = torch.randn(40, 96), torch.randn(40)
    x = correlated_inputs(256, 96)
    h = 2 * x.t() @ x / 256
    codes, params, deq = gptq_quantize(w, h, p.gptq_grid(w))
    mod = p.from_codes(codes, params, w, b)
    assert torch.equal(mod.dequantize(), deq)
    assert torch.equal(mod.bias, b)


def test_gptq_option_errors(tiny_llama_dir):
    from tokenmill.plugins.quant.gptq import GPTQOptions, gptq_settings

    assert gptq_settings(None) is None and gptq_settings(False) is None
    assert gptq_settings(True) == {f: getattr(GPTQOptions(), f) for f in GPTQOptions.__dataclass_fields__}
    assert gptq_settings({"samples": 4})["samples"] == 4
    cases = [({"samples": 0}, "gptq: samples must be >= 1, got 0"),
             ({"seq_len": 4}, "gptq: seq_len must be between 8 and 8192"),
             ({"damp": 0}, r"gptq: damp must be in \(0, 1\]"),
             ({"sample": 4}, "unknown option 'sample' for gptq \\(did you mean 'samples'\\?\\)"),
             ({"act_order": "yes"}, "option 'act_order' of gptq must be bool"),
             ("fast", "option 'gptq' of plugin 'nf4' must be")]
    for value, msg in cases:
        with pytest.raises(PipelineError, match=msg):
            quant_pipe(tiny_llama_dir, "nf4", {"gptq": value, "compile_kernels": False})


def test_gptq_without_calibration_fails_clearly(tiny_llama_dir):
    from tokenmill.plugins.quant import NF4

    plugin = NF4(NF4.Options(gptq={"samples": 2, "seq_len": 32}))
    lin = torch.nn.Linear(64, 64)
    with pytest.raises(PipelineError, match="needs its calibration pass"):
        plugin.quantize_layer(name="model.layers.0.mlp.up_proj", module=lin, model_config=None)
    assert plugin.quantize_layer(name="lm_head", module=torch.nn.Linear(64, 100), model_config=None) is not None


def test_gptq_pass_leaves_the_model_as_found(tiny_qwen_dir, tokenizer):
    from transformers import AutoModelForCausalLM

    from tokenmill.plugins.quant import Int4
    from tokenmill.plugins.quant.calibration import gptq_model

    model = AutoModelForCausalLM.from_pretrained(tiny_qwen_dir, dtype=torch.float32).eval()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    plugin = Int4(Int4.Options(group_size=32, gptq={"samples": 3, "seq_len": 48, "batch_size": 2}))
    prepared, summary = gptq_model(plugin, model, tokenizer, plugin.options.gptq)
    assert sorted(prepared) == sorted(n for n, m in model.named_modules()
                                      if isinstance(m, torch.nn.Linear) and ".layers." in n)
    assert summary["tokens"] == 3 * 48 and summary["layers"] == 14
    after = model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)


@pytest.mark.parametrize("plugin,opts", [
    ("nf4", {"compile_kernels": False, "lm_head_int8_rows": 50000}),
    ("nf4", {"compile_kernels": False, "int8_layers": ["*.v_proj"], "gptq_refit": True}),
    ("int4", {"group_size": 32, "gptq_act_order": True})])
def test_gptq_pipeline_saves_and_reloads_identically(tiny_qwen_dir, tmp_path, plugin, opts):
    """GPTQ results (with refitted scales, with int8_layers in int8 and left out of calibration) are saved and
    reloaded to identical logits."""
    from tokenmill.plugins.quant.checkpoint import save_quantized

    opts = dict(opts)
    act_order = opts.pop("gptq_act_order", False)
    gptq = {"samples": 4, "seq_len": 64, "act_order": act_order, "refit_scales": opts.pop("gptq_refit", False)}
    fresh = quant_pipe(tiny_qwen_dir, plugin, dict(opts, gptq=gptq))
    rtn = quant_pipe(tiny_qwen_dir, plugin, opts)
    assert fresh.quantized_layers == rtn.quantized_layers
    name = "model.layers.1.mlp.down_proj"
    a_mod, b_mod = fresh.loaded.model.get_submodule(name), rtn.loaded.model.get_submodule(name)
    assert type(a_mod) is type(b_mod) and not torch.equal(a_mod.dequantize(), b_mod.dequantize())
    int8 = [n for n, m in fresh.loaded.model.named_modules() if type(m) is Int8Linear and "layers" in n]
    assert int8 == [n for n in fresh.quantized_layers if n.endswith(".v_proj") and opts.get("int8_layers")]
    assert fresh.plugins[plugin].calibration["layers"] == 14 - len(int8)
    manifest, _ = save_quantized(fresh, tmp_path / "q")
    data = json.loads(manifest.read_text())
    assert data["settings"]["gptq"]["samples"] == 4 and data["calibration"]["method"] == "gptq"
    loaded = quant_pipe(tiny_qwen_dir, plugin, dict(opts, gptq=gptq, load=str(tmp_path / "q")))
    assert loaded.plugins[plugin].calibration is None  # loading does not calibrate again
    ids = torch.tensor([fresh.encode("GPTQ codes are saved like any others")])
    with torch.inference_mode():
        assert torch.equal(fresh.loaded.model(ids).logits, loaded.loaded.model(ids).logits)
    with pytest.raises(PipelineError, match="gptq: checkpoint"):
        quant_pipe(tiny_qwen_dir, plugin, dict(opts, load=str(tmp_path / "q")))


def test_gptq_true_sequential_follows_the_blocks_call_order(tiny_qwen_dir, tokenizer):
    """Layers are calibrated group by group in call order (q/k/v, o, gate/up, down), each on the quantized
    outputs of the groups before it, so the codes differ from one float pass per block."""
    from transformers import AutoModelForCausalLM

    from tokenmill.plugins.quant import Int4
    from tokenmill.plugins.quant.calibration import _block_inputs, _call_groups, decoder_blocks, gptq_model

    model = AutoModelForCausalLM.from_pretrained(tiny_qwen_dir, dtype=torch.float32).eval()
    prefix, blocks = decoder_blocks(model)
    linears = {f"{prefix}.0.{n}": m for n, m in blocks[0].named_modules() if isinstance(m, torch.nn.Linear)}
    x, extra = _block_inputs(model, blocks[0], torch.tensor([tokenizer.encode("one two three four")]))
    short = [[name.rsplit(".", 1)[1] for name in g] for g in _call_groups(blocks[0], linears, x, extra)]
    assert short == [["q_proj", "k_proj", "v_proj"], ["o_proj"], ["gate_proj", "up_proj"], ["down_proj"]]
    out = {}
    for ts in (True, False):
        plugin = Int4(Int4.Options(group_size=32, gptq={"samples": 3, "seq_len": 48, "true_sequential": ts}))
        out[ts], _ = gptq_model(plugin, model, tokenizer, plugin.options.gptq)
    first = f"{prefix}.0.self_attn.q_proj"
    assert torch.equal(out[True][first].dequantize(), out[False][first].dequantize())  # nothing before q/k/v
    down = f"{prefix}.0.mlp.down_proj"
    assert not torch.equal(out[True][down].dequantize(), out[False][down].dequantize())


def test_cli_perplexity_default_slice_is_short_and_shows_progress(tiny_qwen_dir, tmp_path, capsys):
    import yaml

    from tokenmill.cli import build_parser, main
    from tokenmill.evaluate import DEFAULT_TOKENS, HELDOUT_TOKENS

    path = tmp_path / "p.yaml"
    path.write_text(yaml.safe_dump(tiny_pipeline_dict(tiny_qwen_dir)))
    out_json = tmp_path / "ppl.json"
    assert main(["eval", "perplexity", str(path), "--window", "256", "--stride", "128", "--json", str(out_json)]) == 0
    res = json.loads(out_json.read_text())
    assert res["tokens"] == DEFAULT_TOKENS == 4096 and res["windows"] == 32
    err = capsys.readouterr().err
    assert f"scoring 4096 tokens in 32 windows of 256 (--full: all {HELDOUT_TOKENS})" in err
    assert "255/4096 tokens (6%)" in err and "s left" in err and "4096/4096 tokens (100%)" in err
    assert build_parser().parse_args(["eval", "perplexity", "p.yaml", "--full"]).full
    with pytest.raises(SystemExit):  # a slice size and --full together
        build_parser().parse_args(["eval", "perplexity", "p.yaml", "--full", "--tokens", "10"])


def test_perplexity_windows_score_every_token_once_with_context():
    from tokenmill.evaluate import strided_windows

    for total, window, stride in ((4097, 256, 256), (4097, 256, 128), (300, 128, 1), (10, 64, 64), (2, 2, 2)):
        spans = strided_windows(total, window, stride)
        assert sum(new for _, _, new in spans) == total - 1, (total, window, stride)
        for b, e, new in spans:
            assert e - b <= window and 1 <= new <= e - b - 1  # every target has a token of context in the window
        assert [e for _, e, _ in spans][-1] == total


def test_gptq_results_are_cached_between_builds(tiny_qwen_dir, private_gptq_cache, monkeypatch, capsys):
    """The second build with the same weights and settings loads GPTQ's results instead of calibrating;
    other settings calibrate again; ``gptq_cache: false`` writes nothing."""
    from tokenmill.plugins.quant import calibration

    gptq = {"samples": 3, "seq_len": 48}
    first = Pipeline.from_dict(tiny_pipeline_dict(tiny_qwen_dir, plugins=[{"nf4": {"compile_kernels": False,
                                                                                   "gptq": gptq}}]))
    assert "nf4: GPTQ calibration" in capsys.readouterr().err  # says what it prepares, and that it is cached
    assert "cached" not in first.plugins["nf4"].calibration
    assert len(list(private_gptq_cache.iterdir())) == 1
    real = calibration.gptq_model
    monkeypatch.setattr(calibration, "gptq_model", lambda *a, **k: pytest.fail("calibrated again"))
    second = quant_pipe(tiny_qwen_dir, "nf4", {"compile_kernels": False, "gptq": gptq})
    assert second.plugins["nf4"].calibration["cached"].startswith(str(private_gptq_cache))
    assert second.plugins["nf4"].calibration["layers"] == first.plugins["nf4"].calibration["layers"] == 14
    ids = torch.tensor([first.encode("cached codes are the same codes")])
    with torch.inference_mode():
        assert torch.equal(first.loaded.model(ids).logits, second.loaded.model(ids).logits)
    entry = next(private_gptq_cache.iterdir())
    (entry / "layers.safetensors").write_bytes(b"truncated")   # a broken entry is dropped and written again
    monkeypatch.setattr(calibration, "gptq_model", real)
    again = quant_pipe(tiny_qwen_dir, "nf4", {"compile_kernels": False, "gptq": gptq})
    assert "cached" not in again.plugins["nf4"].calibration and (entry / "meta.json").is_file()
    quant_pipe(tiny_qwen_dir, "nf4", {"compile_kernels": False, "gptq": dict(gptq, seed=1)})  # other settings
    quant_pipe(tiny_qwen_dir, "nf4", {"compile_kernels": False, "gptq": dict(gptq, seed=2), "gptq_cache": False})
    assert len(list(private_gptq_cache.iterdir())) == 2


def test_saved_pipeline_keeps_relative_paths_valid(tiny_qwen_dir, tmp_path, monkeypatch):
    """`tokenmill quantize` writes a pipeline.yaml elsewhere: paths relative to the source file are written
    out resolved, so the saved pipeline finds the same model and files."""
    import shutil

    import yaml

    from tokenmill.plugins.quant.checkpoint import save_quantized

    src = tmp_path / "src"
    shutil.copytree(tiny_qwen_dir, src / "model")
    path = src / "p.yaml"
    path.write_text(yaml.safe_dump(tiny_pipeline_dict("model", plugins=[{"int8": {}}])))
    monkeypatch.chdir(tmp_path)  # not the file's directory
    _, saved = save_quantized(Pipeline.from_yaml(path, progress=False), tmp_path / "out", source_yaml=str(path))
    data = yaml.safe_load(saved.read_text())
    assert data["model"] == str(src / "model")
    assert Pipeline.from_yaml(saved, progress=False).quantized_layers
