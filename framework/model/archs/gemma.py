"""Gemma 1, 2 and 3 (text): scaled embeddings, then (2 and 3) a norm on both sides of each sublayer, attention
logit soft-capping and a final logit cap (2), per-head q/k norms and separate rotary tables for the local
(sliding) and global layers (3). Alternating sliding/global windows come from the HF modules'
``sliding_window``; the ``(1 + weight)`` RMSNorm is HF's own module."""
from __future__ import annotations

import torch

from tokenmill.model.archs.base import Arch, Layer


class Gemma(Arch):
    model_types = ("gemma",)

    def embed_scale(self):
        return float(self.config.hidden_size) ** 0.5


class Gemma2(Gemma):
    model_types = ("gemma2",)

    def norms(self, hf) -> dict:
        return {"attn_in": hf.input_layernorm, "attn_out": hf.post_attention_layernorm,
                "mlp_in": hf.pre_feedforward_layernorm, "mlp_out": hf.post_feedforward_layernorm}

    def logits(self, h: torch.Tensor) -> torch.Tensor:
        logits = self.head(h)
        cap = getattr(self.config, "final_logit_softcapping", None)
        if cap is not None:
            logits = torch.tanh(logits / cap) * cap
        return logits.float()


class Gemma3(Gemma2):
    """``Gemma3ForCausalLM`` (model_type ``gemma3_text``): the text decoder of Gemma 3."""

    model_types = ("gemma3_text",)

    def layer(self, index, hf) -> Layer:
        layer = super().layer(index, hf)
        layer.rope = self.config.layer_types[index]
        return layer

    def rope(self, x, positions):
        out = {}
        for kind in sorted(set(self.config.layer_types)):
            cos, sin = self.base.rotary_emb(x[None], positions[None], kind)
            out[kind] = (cos[0][:, None, :], sin[0][:, None, :])
        return out
