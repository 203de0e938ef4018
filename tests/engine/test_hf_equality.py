"""The correctness oracle: greedy output is token-identical to HF generate(do_sample=False)."""
from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForCausalLM

from tests.conftest import tiny_pipeline_dict
from tokenmill import Pipeline, SamplingParams

PROMPTS = [
    "The quick brown fox",
    "In 1492, a sailor named",
    "def fibonacci(n):\n    ",
    "A",
    "Tokenmill batches prompts of different lengths together, so this one is much longer than the others.",
]


def hf_greedy(model, ids: list[int], n: int) -> list[int]:
    """HF greedy continuation of exactly ``n`` tokens, EOS not special (like ``ignore_eos``)."""
    model.generation_config.eos_token_id = None
    out = model.generate(torch.tensor([ids]), max_new_tokens=n, do_sample=False, pad_token_id=0)
    assert out.shape[1] == len(ids) + n
    return out[0, len(ids):].tolist()


def test_tiny_models_match_hf_batched(tiny_model_dir):
    pipe = Pipeline.from_dict(tiny_pipeline_dict(tiny_model_dir), progress=False)
    hf = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32).eval()
    params = SamplingParams(max_tokens=12, ignore_eos=True)
    results = pipe.generate(PROMPTS, params)
    assert pipe.engine.stats.steps < 12 * len(PROMPTS)  # really batched, not one request at a time
    for prompt, res in zip(PROMPTS, results):
        ids = pipe.encode(prompt)
        assert res.prompt_token_ids == ids
        assert res.token_ids == hf_greedy(hf, ids, 12), prompt
        assert res.finish_reason == "length"


def test_tiny_mistral_sliding_window_matches_hf(tmp_path, tokenizer):
    from tests.conftest import make_tiny_model

    path = make_tiny_model("mistral", tmp_path / "m", tokenizer, sliding_window=6)
    pipe = Pipeline.from_dict(tiny_pipeline_dict(path), progress=False)
    hf = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    params = SamplingParams(max_tokens=10, ignore_eos=True)
    for prompt, res in zip(PROMPTS[:3], pipe.generate(PROMPTS[:3], params)):
        assert res.token_ids == hf_greedy(hf, pipe.encode(prompt), 10)


@pytest.mark.slow
def test_default_model_matches_hf(default_model_dir):
    pipe = Pipeline.from_yaml("pipelines/default.yaml", progress=False)
    hf = AutoModelForCausalLM.from_pretrained(default_model_dir, dtype=torch.float32).eval()
    prompts = ["The capital of France is", "Here is a short story about a robot:",
               "List three uses of a paperclip:\n1."]
    results = pipe.generate(prompts, SamplingParams(max_tokens=32, ignore_eos=True))
    for prompt, res in zip(prompts, results):
        assert res.token_ids == hf_greedy(hf, pipe.encode(prompt), 32), prompt
