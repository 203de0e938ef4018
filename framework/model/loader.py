"""Load a resolved model into memory: weights (via accelerate's empty-weight init), tokenizer, config."""
from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from tokenmill.errors import ModelLoadError
from tokenmill.model.archs import supported_model_types
from tokenmill.model.resolve import resolve_model, source_gguf

DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


@dataclass(slots=True)
class LoadedModel:
    model: Any           # a transformers *ForCausalLM
    tokenizer: Any
    name: str
    path: str
    device: torch.device
    dtype: torch.dtype
    gguf: str | None = None  # the GGUF file the float weights were dequantized from, when they came from one

    @property
    def config(self):
        return self.model.config


def weight_bytes(model) -> int:
    """Bytes of a model's parameters (a tied matrix counted once) and buffers, as they sit in memory."""
    return (sum(p.numel() * p.element_size() for p in model.parameters())
            + sum(b.numel() * b.element_size() for b in model.buffers()))


def pick_device(device: str) -> torch.device:
    """``auto`` -> the best accelerator present (CUDA, then MPS), else CPU."""
    if device == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    dev = torch.device(device)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ModelLoadError(f"device '{device}' requested but CUDA is not available; use device: cpu or auto")
    return dev


def pick_dtype(dtype: str, device: torch.device) -> torch.dtype:
    if dtype == "auto":
        return torch.bfloat16 if device.type == "cuda" and torch.cuda.is_bf16_supported() else torch.float32
    return DTYPES[dtype]


@contextmanager
def _progress_bars(enabled: bool):
    """transformers' progress bars on or off inside the block, as they were after it."""
    from transformers.utils import logging as hf_logging

    was_enabled = hf_logging.is_progress_bar_enabled()
    if not enabled:
        hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        if was_enabled and not enabled:
            hf_logging.enable_progress_bar()


def load_model(model: str, *, dtype: str = "float32", device: str = "cpu", progress: bool = True) -> LoadedModel:
    """Resolve, convert if needed, and load ``model`` with its tokenizer.

    :raises ModelLoadError: unknown model, missing package (with the install command), offline hub id,
        or an unsupported architecture (with the supported ones).
    """
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    src, name = resolve_model(model, progress=progress)
    dev = pick_device(device)
    dt = pick_dtype(dtype, dev)
    try:
        config = AutoConfig.from_pretrained(src)
    except OSError as exc:
        if isinstance(src, str) and not Path(src).exists():
            raise ModelLoadError(
                f"cannot load hub model '{src}': it is not in the local Hugging Face cache and the hub could "
                f"not be reached (offline?). Download it where you have network, or point `model:` at a local "
                f"directory. ({exc.__class__.__name__}: {str(exc).splitlines()[0]})") from None
        raise ModelLoadError(f"cannot read model config from {src}: {exc}") from None
    if config.model_type not in supported_model_types():
        raise ModelLoadError(f"model type '{config.model_type}' is not supported; supported: "
                             + ", ".join(supported_model_types()))
    # from_pretrained builds the module tree under accelerate's init_empty_weights (no throwaway random
    # init), then assigns the checkpoint tensors directly onto the target device.
    # (our runner does its own attention; HF's implementation serves calibration passes: sdpa where the family
    # has it, else eager)
    with _progress_bars(progress):  # transformers' own "Loading weights" bar follows `progress` too
        try:
            hf = AutoModelForCausalLM.from_pretrained(src, dtype=dt, device_map={"": str(dev)},
                                                      attn_implementation="sdpa")
        except ValueError:
            hf = AutoModelForCausalLM.from_pretrained(src, dtype=dt, device_map={"": str(dev)},
                                                      attn_implementation="eager")
    hf.eval().requires_grad_(False)
    tok = AutoTokenizer.from_pretrained(src)
    gguf = source_gguf(model)
    return LoadedModel(hf, tok, name, str(src), dev, dt, None if gguf is None else str(gguf))
