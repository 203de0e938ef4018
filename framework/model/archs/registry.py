"""``config.model_type`` -> the :class:`~tokenmill.model.archs.base.Arch` that runs it."""
from __future__ import annotations

from tokenmill.errors import ModelLoadError
from tokenmill.model.archs.base import Arch
from tokenmill.model.archs.gemma import Gemma, Gemma2, Gemma3
from tokenmill.model.archs.llama import Granite, Llama, Mistral, Olmo2, Phi3
from tokenmill.model.archs.moe import Mixtral, Qwen3Moe

ARCHS: dict[str, type[Arch]] = {t: cls for cls in (Llama, Mistral, Granite, Olmo2, Phi3, Gemma, Gemma2, Gemma3,
                                                   Mixtral, Qwen3Moe) for t in cls.model_types}


def supported_model_types() -> list[str]:
    return sorted(ARCHS)


def arch_for(model_type: str) -> type[Arch]:
    """The architecture class of ``model_type``; an unknown one raises :class:`ModelLoadError` listing the
    supported types."""
    try:
        return ARCHS[model_type]
    except KeyError:
        raise ModelLoadError(f"model type '{model_type}' is not supported; supported: "
                             + ", ".join(supported_model_types())) from None


def build_arch(model, shard=None, *, fuse_quantized: bool = True) -> Arch:
    return arch_for(model.config.model_type)(model, shard, fuse_quantized=fuse_quantized)
