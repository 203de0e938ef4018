"""Shared fixtures: tiny random-weight models (Llama, Qwen2, Mistral) and the default model.

Tiny models reuse the default model's tokenizer (converted once into the cache), so text round-trips are
real; their weights are random and seeded.
"""
from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

torch.set_num_threads(int(os.environ.get("TOKENMILL_TEST_THREADS", "2")))

TINY = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, max_position_embeddings=512)


@pytest.fixture(scope="session")
def default_model_dir() -> Path:
    """The default model converted to safetensors (converts on first use, then reuses the cache)."""
    from tokenmill.model.resolve import DEFAULT_MODEL, resolve_model

    path, _ = resolve_model(DEFAULT_MODEL, progress=False)
    return Path(path)


@pytest.fixture(scope="session")
def tokenizer(default_model_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(default_model_dir)


# per family: config overrides that make a tiny model exercise the family's special features
FAMILY_CONFIGS: dict[str, dict] = {
    "llama": {},
    "mistral": {"sliding_window": None},
    "qwen2": {"tie_word_embeddings": True},
    "qwen3": {"head_dim": 16},
    "gemma": {"head_dim": 16},
    "gemma2": {"head_dim": 16, "sliding_window": 6, "attn_logit_softcapping": 5.0, "final_logit_softcapping": 3.0,
               "query_pre_attn_scalar": 16},
    "gemma3_text": {"head_dim": 16, "sliding_window": 6, "num_hidden_layers": 4,
                    "layer_types": ["sliding_attention", "sliding_attention", "sliding_attention", "full_attention"],
                    "query_pre_attn_scalar": 16},
    "phi3": {"pad_token_id": None},
    "granite": {"embedding_multiplier": 2.0, "residual_multiplier": 0.5, "attention_multiplier": 0.2,
                "logits_scaling": 0.5},
    "olmo2": {},
    "mixtral": {"num_local_experts": 4, "num_experts_per_tok": 2},
    "qwen3_moe": {"num_experts": 4, "num_experts_per_tok": 2, "moe_intermediate_size": 32, "head_dim": 16,
                  "decoder_sparse_step": 2, "mlp_only_layers": []},
}


def make_tiny_model(family: str, out: Path, tokenizer, **overrides) -> Path:
    """Build and save a seeded random tiny model of ``family`` with the shared tokenizer."""
    from transformers import AutoConfig, AutoModelForCausalLM

    kwargs = dict(TINY, vocab_size=len(tokenizer), eos_token_id=tokenizer.eos_token_id,
                  bos_token_id=tokenizer.bos_token_id, pad_token_id=tokenizer.eos_token_id,
                  tie_word_embeddings=False)
    kwargs.update(FAMILY_CONFIGS[family])
    kwargs.update(overrides)
    torch.manual_seed(1234)
    model = AutoModelForCausalLM.from_config(AutoConfig.for_model(family, **kwargs)).eval()
    with torch.no_grad():  # larger logits spread so greedy choices are well separated
        model.lm_head.weight.mul_(8.0)
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    return out


@pytest.fixture(scope="session", params=["llama", "qwen2", "mistral"])
def tiny_model_dir(request, tmp_path_factory, tokenizer) -> Path:
    return make_tiny_model(request.param, tmp_path_factory.mktemp(f"tiny-{request.param}"), tokenizer)


@pytest.fixture(scope="session")
def tiny_llama_dir(tmp_path_factory, tokenizer) -> Path:
    return make_tiny_model("llama", tmp_path_factory.mktemp("tiny-llama"), tokenizer)


def tiny_pipeline_dict(model_dir: Path, **extra) -> dict:
    data = {"name": "tiny", "model": str(model_dir), "dtype": "float32", "device": "cpu", "attention": "sdpa_gather",
            "limits": {"max_model_len": 256, "max_num_seqs": 8, "max_num_batched_tokens": 512}}
    data.update(extra)
    return data


@pytest.fixture(scope="session")
def tiny_pipeline(tiny_llama_dir):
    from tokenmill import Pipeline

    return Pipeline.from_dict(tiny_pipeline_dict(tiny_llama_dir), progress=False)
