"""Architectures: one small module per layout, all built on :mod:`tokenmill.model.archs.base`."""
from tokenmill.model.archs.base import Arch, Layer, LayerAttention
from tokenmill.model.archs.registry import ARCHS, arch_for, build_arch, supported_model_types

__all__ = ["ARCHS", "Arch", "Layer", "LayerAttention", "arch_for", "build_arch", "supported_model_types"]
