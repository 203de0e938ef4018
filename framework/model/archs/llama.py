"""The Llama layout and the families that keep it with small changes: Mistral, Qwen 2/3, Granite, OLMo 2, Phi-3.

Qwen 3's per-head q/k norms and Qwen 2's per-layer sliding windows come from the HF modules' own attributes
(``q_norm``, ``sliding_window``), so those families need no code of their own.
"""
from __future__ import annotations

import torch

from tokenmill.model.archs.base import Arch, Layer


class Llama(Arch):
    model_types = ("llama", "qwen2", "qwen3")


class Mistral(Arch):
    """One sliding window for every layer, from the config (the HF attention module does not carry it)."""

    model_types = ("mistral",)

    def window(self, index, attn):
        return getattr(self.config, "sliding_window", None)


class Granite(Arch):
    """Llama with four multipliers: embeddings, residual branches, attention scale (``attn.scaling`` already
    holds ``attention_multiplier``) and a divisor on the logits."""

    model_types = ("granite",)

    def layer(self, index, hf) -> Layer:
        layer = super().layer(index, hf)
        layer.residual_scale = float(self.config.residual_multiplier)
        return layer

    def embed_scale(self):
        return float(self.config.embedding_multiplier)

    def logits(self, h: torch.Tensor) -> torch.Tensor:
        return (self.head(h) / self.config.logits_scaling).float()


class Olmo2(Arch):
    """Norms after each sublayer instead of before, and q/k norms over the whole projection."""

    model_types = ("olmo2",)

    def norms(self, hf) -> dict:
        return {"attn_out": hf.post_attention_layernorm, "mlp_out": hf.post_feedforward_layernorm}

    def layer(self, index, hf) -> Layer:
        layer = super().layer(index, hf)
        layer.qk_norm_per_head = False
        return layer


class Phi3(Arch):
    """q/k/v and gate/up fused in the checkpoint (``qkv_proj``, ``gate_up_proj``); partial rotary handled by
    the runner (the rotary table is narrower than a head)."""

    model_types = ("phi3",)

    def qkv(self, attn):
        q, kv = self.num_heads * self.head_dim, self.num_kv_heads * self.head_dim
        return self.linear.split(attn.qkv_proj, [q, kv, kv])

    def window(self, index, attn):
        return getattr(self.config, "sliding_window", None)

    def mlp(self, mlp):
        gate_up = self.linear.split(mlp.gate_up_proj, [self.config.intermediate_size] * 2)
        down, act = self.linear.module(mlp.down_proj), mlp.activation_fn

        def gated(x: torch.Tensor) -> torch.Tensor:
            g, u = gate_up(x)
            return down(u * act(g))
        return gated
