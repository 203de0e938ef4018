"""The model runner: one batched forward over the KV pool, reusing the HF model's own modules.

We keep transformers' modules (projections, norms, MLP, rotary tables, LM head) so weights, numerics and
quantized module swaps carry over unchanged, and drive them with our own layer loop whose attention reads
and writes the engine's KV pool (see docs/architecture.md for why).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from tokenmill.engine.batch import ForwardBatch
from tokenmill.engine.cpu_gemm import CpuLinear
from tokenmill.hooktypes import KVCacheSpec, KVPool


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


class ModelRunner:
    """Runs a Llama-family decoder (Llama, Mistral, Qwen2, Qwen3) on flattened batches."""

    def __init__(self, model, pool: KVPool, *, compile_spec=None) -> None:
        self.model = model
        base = model.model
        cfg = model.config
        self.config = cfg
        self.embed = base.embed_tokens
        self.layers = list(base.layers)
        self.norm = base.norm
        self.rotary = base.rotary_emb
        self.lm_head = model.lm_head
        attn0 = self.layers[0].self_attn
        self.head_dim = getattr(attn0, "head_dim", cfg.hidden_size // cfg.num_attention_heads)
        self.num_heads = cfg.num_attention_heads
        self.num_kv_heads = getattr(cfg, "num_key_value_heads", None) or cfg.num_attention_heads
        self.scaling = getattr(attn0, "scaling", self.head_dim ** -0.5)
        self.gqa = bool(self.num_heads != self.num_kv_heads)  # a plain bool: SDPA rejects a SymBool
        self.window = self._sliding_window(cfg)
        self.pool = pool
        self.last_hidden: torch.Tensor | None = None
        self.device = next(model.parameters()).device
        cpu = self.device.type == "cpu"
        self.fused = [self._fuse(layer) for layer in self.layers]
        # fp32 GEMMs on CPU through a row-count dispatch (engine/cpu_gemm.py); other dtypes and devices F.linear
        self.cpu_linear = CpuLinear() if cpu and next(model.parameters()).dtype == torch.float32 else None
        # Compiled path: all-decode steps, padded to batch-size buckets with key length a multiple of
        # kv_multiple, so a handful of graphs serve every step (CUDA graphs under reduce-overhead).
        # Prefill and mixed steps vary in shape every time and stay eager.
        self._compiled = None
        self.decode_buckets: list[int] | None = None
        self.kv_multiple = 0
        if compile_spec is not None and compile_spec.enabled:
            self._compiled = torch.compile(self._forward_impl, mode=compile_spec.mode,
                                           fullgraph=compile_spec.fullgraph, dynamic=compile_spec.dynamic,
                                           backend=compile_spec.backend)
            self.decode_buckets = list(compile_spec.buckets)
            self.kv_multiple = compile_spec.kv_multiple

    @staticmethod
    def _fuse(layer) -> tuple:
        """Concatenate q/k/v and gate/up weights into one matrix each, when they are plain ``nn.Linear``.

        One GEMM instead of three (two) per layer cuts per-call overhead at small batch. The original
        modules' parameters become views into the fused storage, so no memory is duplicated and the HF
        module tree stays valid. Quantized (swapped) modules are left alone and called one by one.
        """
        attn, mlp = layer.self_attn, layer.mlp

        def fuse(mods):
            if not all(type(m) is torch.nn.Linear for m in mods):
                return None
            has_bias = [m.bias is not None for m in mods]
            if any(has_bias) and not all(has_bias):
                return None
            w = torch.cat([m.weight.data for m in mods], 0)
            b = torch.cat([m.bias.data for m in mods], 0) if all(has_bias) else None
            start = 0
            for m in mods:
                n = m.weight.shape[0]
                m.weight.data = w[start:start + n]
                if b is not None:
                    m.bias.data = b[start:start + n]
                start += n
            return w, b, [m.weight.shape[0] for m in mods]

        qkv = fuse([attn.q_proj, attn.k_proj, attn.v_proj])
        gate_up = fuse([mlp.gate_proj, mlp.up_proj]) if hasattr(mlp, "gate_proj") else None
        return qkv, gate_up

    def _linear(self, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        """``F.linear(x, weight, bias)``; fp32 on CPU through :class:`~tokenmill.engine.cpu_gemm.CpuLinear`
        (``W @ x^T`` for a few rows, oneDNN above: several times MKL's ``F.linear`` speed on the dev box)."""
        if self.cpu_linear is None:
            return F.linear(x, weight, bias)
        return self.cpu_linear(x, weight, bias)

    def _proj(self, mod, x: torch.Tensor) -> torch.Tensor:
        """A projection module applied to ``x``: plain ``nn.Linear`` through :meth:`_linear`, others (quantized
        replacements) called as they are."""
        if type(mod) is torch.nn.Linear:
            return self._linear(x, mod.weight, mod.bias)
        return mod(x)

    @property
    def compiled(self) -> bool:
        return self._compiled is not None

    @staticmethod
    def _sliding_window(cfg) -> int | None:
        window = getattr(cfg, "sliding_window", None)
        if cfg.model_type == "mistral":
            return window
        if cfg.model_type in ("qwen2", "qwen3") and getattr(cfg, "use_sliding_window", False):
            if getattr(cfg, "max_window_layers", 0) < cfg.num_hidden_layers:
                raise ValueError("per-layer sliding windows (Qwen max_window_layers) are not supported yet")
            return None
        return None

    @staticmethod
    def kv_spec(model, *, dtype, device, max_model_len: int, max_num_seqs: int) -> KVCacheSpec:
        cfg = model.config
        attn0 = model.model.layers[0].self_attn
        head_dim = getattr(attn0, "head_dim", cfg.hidden_size // cfg.num_attention_heads)
        return KVCacheSpec(cfg.num_hidden_layers, getattr(cfg, "num_key_value_heads", None)
                           or cfg.num_attention_heads, head_dim, dtype, device, max_model_len, max_num_seqs)

    @torch.inference_mode()
    def forward(self, batch: ForwardBatch) -> torch.Tensor:
        """Write the new tokens' K/V into the pool and return logits ``[R, vocab]`` for ``logits_idx``.

        The matching final hidden states (after the last norm) are left in ``last_hidden``.
        """
        groups = tuple(g.as_tuple() for g in batch.groups)
        impl = self._compiled if (self._compiled is not None and batch.decode_padded) else self._forward_impl
        logits, hidden = impl(batch.input_ids, batch.positions, batch.slot_mapping, groups, batch.logits_idx,
                              self.pool.k, self.pool.v)
        self.last_hidden = hidden  # final (normed) hidden states of the logits rows, for Medusa-style heads
        return logits

    @torch.inference_mode()
    def move_kv(self, block_table: list[int], src: list[int], dst: list[int]) -> None:
        """Copy the K/V at positions ``src`` of a sequence to positions ``dst`` (in order, every layer): the
        accepted path of a draft tree moves to consecutive positions."""
        bs = self.pool.block_size

        def slots(positions):
            return torch.tensor([block_table[p // bs] * bs + p % bs for p in positions], device=self.device)

        s, d = slots(src), slots(dst)
        for cache in (*self.pool.k, *self.pool.v):
            cache.index_copy_(0, d, cache.index_select(0, s))

    def _forward_impl(self, input_ids, positions, slot_mapping, groups, logits_idx, k_pool, v_pool):
        n = input_ids.shape[0]
        h = self.embed(input_ids)
        cos, sin = self.rotary(h[None], positions[None])
        cos, sin = cos[0][:, None, :], sin[0][:, None, :]
        for i, layer in enumerate(self.layers):
            attn = layer.self_attn
            qkv, gate_up = self.fused[i]
            x = layer.input_layernorm(h)
            if qkv is not None:
                q, k, v = self._linear(x, qkv[0], qkv[1]).split(qkv[2], dim=-1)
            else:
                q, k, v = attn.q_proj(x), attn.k_proj(x), attn.v_proj(x)
            q = q.view(n, self.num_heads, self.head_dim)
            k = k.view(n, self.num_kv_heads, self.head_dim)
            v = v.view(n, self.num_kv_heads, self.head_dim)
            if hasattr(attn, "q_norm"):
                q, k = attn.q_norm(q), attn.k_norm(k)
            q = q * cos + _rotate_half(q) * sin
            k = k * cos + _rotate_half(k) * sin
            k_pool[i].index_copy_(0, slot_mapping, k)
            v_pool[i].index_copy_(0, slot_mapping, v)
            o = self._attention(q, k_pool[i], v_pool[i], groups, n)
            h = h + self._proj(attn.o_proj, o)
            x = layer.post_attention_layernorm(h)
            if gate_up is not None:
                g, u = self._linear(x, gate_up[0], gate_up[1]).split(gate_up[2], dim=-1)
                h = h + self._proj(layer.mlp.down_proj, layer.mlp.act_fn(g) * u)
            else:
                h = h + layer.mlp(x)
        h = self.norm(h.index_select(0, logits_idx))
        return self._proj(self.lm_head, h).float(), h

    def _attention(self, q, k_pool, v_pool, groups, n):
        out = None
        for tok_idx, kv_idx, mask, causal, out_idx, out_sel in groups:
            b, t = tok_idx.shape
            l = kv_idx.shape[1]
            # index_select on flat rows is several times faster than advanced indexing on CPU
            qg = q.index_select(0, tok_idx.reshape(-1)).view(b, t, self.num_heads, self.head_dim).transpose(1, 2)
            flat = kv_idx.reshape(-1)
            kg = k_pool.index_select(0, flat).view(b, l, self.num_kv_heads, self.head_dim).transpose(1, 2)
            vg = v_pool.index_select(0, flat).view(b, l, self.num_kv_heads, self.head_dim).transpose(1, 2)
            o = F.scaled_dot_product_attention(qg, kg, vg, attn_mask=mask, is_causal=causal, scale=self.scaling,
                                               enable_gqa=self.gqa)
            o = o.transpose(1, 2).reshape(b * t, self.num_heads * self.head_dim)
            if out_idx is None:
                return o
            if out is None:
                out = q.new_zeros(n, self.num_heads * self.head_dim)
            out.index_copy_(0, out_idx, o.index_select(0, out_sel))
        return out
