"""Mixture-of-experts families: Mixtral and Qwen 3 MoE. The router and experts are HF's own sparse block,
called on the flattened ``[tokens, hidden]`` batch (dense layers of Qwen 3 MoE take the fused gated path)."""
from __future__ import annotations

from tokenmill.model.archs.base import Arch


class Mixtral(Arch):
    model_types = ("mixtral",)

    def window(self, index, attn):
        return getattr(self.config, "sliding_window", None)


class Qwen3Moe(Arch):
    model_types = ("qwen3_moe",)
