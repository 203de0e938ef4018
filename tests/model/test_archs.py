"""Every supported family: greedy output token-identical to HF generate() in float32, alone and inside a mixed
continuous batch (tiny random configs from tests/conftest.py FAMILY_CONFIGS)."""
from __future__ import annotations

import json

import pytest
import torch
from transformers import AutoModelForCausalLM

from tests.conftest import FAMILY_CONFIGS, make_tiny_model, tiny_pipeline_dict
from tests.engine.test_hf_equality import hf_greedy
from tokenmill import Pipeline, SamplingParams
from tokenmill.errors import ModelLoadError
from tokenmill.model import supported_model_types

PROMPTS = ["The quick brown fox", "In 1492, a sailor named", "def fibonacci(n):\n    "]
TOKENS = 32


def test_every_family_has_a_tiny_config():
    assert sorted(FAMILY_CONFIGS) == supported_model_types()


@pytest.mark.parametrize("family", sorted(FAMILY_CONFIGS))
def test_family_matches_hf(family, tmp_path, tokenizer):
    path = make_tiny_model(family, tmp_path / family, tokenizer)
    hf = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    pipe = Pipeline.from_dict(tiny_pipeline_dict(path, plugins=[{"continuous_batching": {"chunked_prefill": True}},
                                                                {"paged_kv": {"block_size": 4}}],
                                                 limits={"max_model_len": 256, "max_num_seqs": 8,
                                                         "max_num_batched_tokens": 24}), progress=False)
    params = SamplingParams(max_tokens=TOKENS, ignore_eos=True)
    refs = [hf_greedy(hf, pipe.encode(p), TOKENS) for p in PROMPTS]
    alone = [pipe.generate([p], params)[0].token_ids for p in PROMPTS]
    assert alone == refs
    # mixed: the prompts arrive while others decode, prefill chunks of 24 tokens share steps with decodes
    ids = [pipe.submit(p, params) for p in PROMPTS + ["A much longer prompt that is prefilled in chunks while the "
                                                      "other requests of the batch decode beside it."]]
    while pipe.engine.has_unfinished():
        pipe.step()
    assert [pipe.collect(r).token_ids for r in ids[:3]] == refs


def test_unsupported_model_type_lists_supported(tmp_path, tokenizer):
    path = make_tiny_model("llama", tmp_path / "m", tokenizer)
    config = json.loads((path / "config.json").read_text())
    (path / "config.json").write_text(json.dumps(dict(config, model_type="gpt2")))
    with pytest.raises(ModelLoadError, match="model type 'gpt2' is not supported; supported: .*gemma2.*qwen3_moe"):
        Pipeline.from_dict(tiny_pipeline_dict(path), progress=False)


@pytest.mark.parametrize("family", ["gemma2", "phi3", "qwen3_moe"])
def test_quantized_families_run(family, tmp_path, tokenizer):
    """The int8 module swap keeps every family running (Gemma's scaled embedding survives a swapped-in
    quantized embedding): outputs stay close to fp32 (most tokens agree)."""
    path = make_tiny_model(family, tmp_path / family, tokenizer)
    params = SamplingParams(max_tokens=16, ignore_eos=True)
    fp_pipe = Pipeline.from_dict(tiny_pipeline_dict(path), progress=False)
    fp = fp_pipe.generate(PROMPTS, params)
    q = Pipeline.from_dict(tiny_pipeline_dict(path, plugins=[{"int8": {"embed_tokens": True}}]), progress=False)
    assert "model.embed_tokens" in q.quantized_layers
    ids = torch.tensor(q.encode(PROMPTS[0]))
    ref = fp_pipe.runner.arch.embed(ids)  # HF's own (scaled, for Gemma) embedding
    assert (q.runner.arch.embed(ids) - ref).norm() < 0.05 * ref.norm()  # the scale survives the swap
    out = q.generate(PROMPTS, params)
    agree = sum(a == b for r, s in zip(fp, out) for a, b in zip(r.token_ids, s.token_ids))
    assert agree >= 0.5 * 16 * len(PROMPTS)


@pytest.mark.parametrize("max_window_layers", [0, 1], ids=["every-layer", "per-layer"])
def test_qwen2_sliding_windows_match_hf(max_window_layers, tmp_path, tokenizer):
    """Qwen 2 sliding windows on every layer and on some layers only (refused before the model layer had
    per-layer windows): greedy equal to HF past the window."""
    path = make_tiny_model("qwen2", tmp_path / "q", tokenizer, use_sliding_window=True, sliding_window=6,
                           max_window_layers=max_window_layers)
    hf = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    pipe = Pipeline.from_dict(tiny_pipeline_dict(path), progress=False)
    windows = [layer.attn.window for layer in pipe.runner.layers]
    assert windows == [6, 6] if max_window_layers == 0 else windows == [None, 6]
    params = SamplingParams(max_tokens=TOKENS, ignore_eos=True)
    for prompt, res in zip(PROMPTS, pipe.generate(PROMPTS, params)):
        assert res.token_ids == hf_greedy(hf, pipe.encode(prompt), TOKENS), prompt
