"""The decoder every architecture is made of: a layer is a handful of named parts, and :class:`Arch` maps a
Hugging Face model's modules onto them.

The parts are the HF modules themselves (projections, norms, MLPs, rotary tables, MoE blocks), so weights,
numerics and the quantization plugins' module swaps carry over unchanged. An architecture module only says
*where* each part sits (which norm comes before or after which sublayer, how q/k/v are projected, how the
embedding and the logits are scaled); :class:`~tokenmill.model.runner.ModelRunner` drives the layer loop
and the attention backend reads and writes the KV pool.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, ClassVar

import torch
import torch.nn.functional as F

from tokenmill.model.kernels.cpu_gemm import CpuLinear, compiled_gemv
from tokenmill.model.shard import Shard


@dataclass(slots=True, frozen=True)
class LayerAttention:
    """What an attention backend needs to know about one layer."""

    scale: float                 # multiplies q.k before the softmax
    window: int | None = None    # sliding window: a query at position p sees keys in (p - window, p]
    softcap: float | None = None  # scores become softcap * tanh(scores / softcap) (Gemma 2)


@dataclass(slots=True, eq=False)
class Layer:
    """One decoder layer as parts; a norm that is None is absent."""

    attn: LayerAttention
    qkv: Callable[[torch.Tensor], tuple[torch.Tensor, torch.Tensor, torch.Tensor]]  # x -> flat q, k, v
    o_proj: Callable[[torch.Tensor], torch.Tensor]
    mlp: Callable[[torch.Tensor], torch.Tensor]
    attn_in: torch.nn.Module | None = None     # before attention (Llama's input_layernorm)
    attn_out: torch.nn.Module | None = None    # on the attention output, before the residual (Gemma 2, OLMo 2)
    mlp_in: torch.nn.Module | None = None      # before the MLP (Llama's post_attention_layernorm)
    mlp_out: torch.nn.Module | None = None     # on the MLP output, before the residual
    q_norm: torch.nn.Module | None = None
    k_norm: torch.nn.Module | None = None
    qk_norm_per_head: bool = True              # Qwen 3 / Gemma 3 norm each head; OLMo 2 the whole projection
    rope: str = "default"                      # which rotary table (Gemma 3: local and global layers differ)
    residual_scale: float = 1.0                # Granite's residual_multiplier


def attention_shape(model) -> tuple[int, int, int]:
    """``(num_heads, num_kv_heads, head_dim)`` of an HF decoder."""
    cfg = model.config
    head_dim = getattr(model.model.layers[0].self_attn, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
    return cfg.num_attention_heads, getattr(cfg, "num_key_value_heads", None) or cfg.num_attention_heads, head_dim


class Linear:
    """Applies projection modules: plain fp32 ``nn.Linear`` on CPU through the row-count GEMM dispatch
    (:mod:`tokenmill.model.kernels.cpu_gemm`; one row of a compiled step on CPU, any float dtype, as
    :func:`~tokenmill.model.kernels.cpu_gemm.compiled_gemv`), anything else (a quantized replacement) called as it
    is."""

    def __init__(self, cpu_fp32: bool, *, fuse_quantized: bool = True) -> None:
        self.cpu = CpuLinear() if cpu_fp32 else None
        self.fuse_quantized = fuse_quantized  # offer quantized siblings to their class's fuse()
        self.weights: list[torch.Tensor] = []  # the weight of each projection applied through __call__
        self.packed: dict[int, torch.Tensor] = {}  # id(weight) -> its copy in oneDNN's layout (weights holds it)
        # bf16 weights read as int32 pairs in a compiled one-row step: measured to pay at one thread only
        # (cpu_gemm module docstring); the thread count at build is the one the pipeline runs with
        self.bf16_pairs = torch.get_num_threads() == 1

    @property
    def plain(self) -> int:
        """Projections applied through __call__ (plain nn.Linear; a fused group counts once)."""
        return len(self.weights)

    def pack(self) -> int:
        """Keep every plain projection's weight also in oneDNN's layout (``cpu_gemm: packed``); returns the bytes
        added (0 where there is no CPU float32 path). The copies are taken now: the weights must not change
        afterwards (a pipeline's do not)."""
        if self.cpu is None or self.cpu.onednn is None:
            return 0
        for w in self.weights:  # ``weights`` holds each ``w``, so no other tensor takes its id
            self.packed[id(w)] = self.cpu.pack(w.detach())
        return sum(p.numel() * p.element_size() for p in self.packed.values())

    def __call__(self, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        out = compiled_gemv(x, weight, bf16_pairs=self.bf16_pairs)
        if out is not None:
            out = out.to(x.dtype)
            return out if bias is None else out + bias
        if self.cpu is None:
            return F.linear(x, weight, bias)
        return self.cpu(x, weight, bias, self.packed.get(id(weight)))

    def module(self, mod) -> Callable[[torch.Tensor], torch.Tensor]:
        if type(mod) is torch.nn.Linear:
            self.weights.append(mod.weight)
            return lambda x: self(x, mod.weight, mod.bias)
        return mod

    def fused(self, mods: list) -> Callable[[torch.Tensor], tuple[torch.Tensor, ...]]:
        """One GEMM for several projections of the same input when all are plain ``nn.Linear`` (the modules'
        parameters become views into the fused storage: no copy kept, the HF module tree stays valid), or when
        their (quantized) class fuses them itself (a ``fuse(mods)`` classmethod returning one module, or None)
        and ``fuse_quantized`` is on (the model runner turns it off for dynamic-shape graphs); else one call each."""
        has_bias = [m.bias is not None for m in mods]
        if not all(type(m) is torch.nn.Linear for m in mods) or (any(has_bias) and not all(has_bias)):
            fuse = getattr(type(mods[0]), "fuse", None) if self.fuse_quantized else None  # QuantLinear.fuse
            one = fuse(mods) if fuse is not None and all(type(m) is type(mods[0]) for m in mods) else None
            if one is not None:
                sizes = [m.out_features for m in mods]
                return lambda x: one(x).split(sizes, dim=-1)
            calls = [self.module(m) for m in mods]
            return lambda x: tuple(c(x) for c in calls)
        w = torch.cat([m.weight.data for m in mods], 0)
        b = torch.cat([m.bias.data for m in mods], 0) if all(has_bias) else None
        sizes, start = [], 0
        for m in mods:
            n = m.weight.shape[0]
            m.weight.data = w[start:start + n]
            if b is not None:
                m.bias.data = b[start:start + n]
            sizes.append(n)
            start += n
        self.weights.append(w)
        # held by a module, so a compiled step traced with install_free_tensors keeps it as an attribute of the
        # graph (a plain tensor in the closure would be gathered as an input before every call)
        held = torch.nn.Module()
        held.register_buffer("weight", w, persistent=False)
        held.register_buffer("bias", b, persistent=False)
        return lambda x: self(x, held.weight, held.bias).split(sizes, dim=-1)

    def split(self, mod, sizes: list[int]) -> Callable[[torch.Tensor], tuple[torch.Tensor, ...]]:
        """A projection already fused in the checkpoint (Phi-3's ``qkv_proj``), split into ``sizes``."""
        call = self.module(mod)
        return lambda x: call(x).split(sizes, dim=-1)


class Arch:
    """Llama's layout, which most families share; subclasses override the parts that differ.

    ``model_types`` are the HF ``config.model_type`` values the class serves (see :mod:`.registry`).
    """

    model_types: ClassVar[tuple[str, ...]] = ()

    def __init__(self, model, shard: Shard | None = None, *, fuse_quantized: bool = True) -> None:
        """``fuse_quantized``: let quantized q/k/v and gate/up fuse (see :meth:`Linear.fused`)."""
        self.model = model
        self.shard = shard  # tensor parallelism: the model was sliced by shard_model; partial sums all-reduced
        self.config = cfg = model.config
        base = model.model
        self.base = base
        self.num_heads, self.num_kv_heads, self.head_dim = attention_shape(model)
        param = next(model.parameters())
        self.linear = Linear(param.device.type == "cpu" and param.dtype == torch.float32, fuse_quantized=fuse_quantized)
        self.layers = [self.layer(i, hf) for i, hf in enumerate(base.layers)]
        self.lm_head = self.linear.module(model.lm_head)
        if shard is not None:  # the row-parallel outputs are partial sums
            for layer in self.layers:
                layer.o_proj, layer.mlp = _reduced(layer.o_proj, shard), _reduced(layer.mlp, shard)

    # ------------------------------------------------------------------ per layer
    def layer(self, index: int, hf) -> Layer:
        attn = hf.self_attn
        return Layer(attn=self.attention(index, attn), qkv=self.qkv(attn), o_proj=self.linear.module(attn.o_proj),
                     mlp=self.mlp(hf.mlp), q_norm=getattr(attn, "q_norm", None), k_norm=getattr(attn, "k_norm", None),
                     **self.norms(hf))

    def norms(self, hf) -> dict:
        return {"attn_in": hf.input_layernorm, "mlp_in": hf.post_attention_layernorm}

    def attention(self, index: int, attn) -> LayerAttention:
        return LayerAttention(scale=float(getattr(attn, "scaling", self.head_dim ** -0.5)),
                              window=self.window(index, attn),
                              softcap=getattr(attn, "attn_logit_softcapping", None))

    def window(self, index: int, attn) -> int | None:
        """The layer's sliding window: HF attention modules carry it where it varies by layer."""
        return getattr(attn, "sliding_window", None)

    def qkv(self, attn):
        return self.linear.fused([attn.q_proj, attn.k_proj, attn.v_proj])

    def mlp(self, mlp):
        """A gated MLP (gate/up/down + act_fn) runs as one fused gate-up GEMM; any other module (an MoE block)
        is called as it is, on the step's tokens as one ``[1, tokens, hidden]`` sequence."""
        if not all(hasattr(mlp, a) for a in ("gate_proj", "up_proj", "down_proj", "act_fn")):
            return lambda x: mlp(x[None])[0]
        gate_up, down, act = self.linear.fused([mlp.gate_proj, mlp.up_proj]), self.linear.module(mlp.down_proj), \
            mlp.act_fn

        def gated(x: torch.Tensor) -> torch.Tensor:
            g, u = gate_up(x)
            return down(act(g) * u)
        return gated

    # ------------------------------------------------------------------ whole model
    def embed_scale(self) -> float | None:
        """A factor on the input embeddings (Gemma: sqrt(hidden), Granite: embedding_multiplier), or None."""
        return None

    def embed(self, input_ids: torch.Tensor) -> torch.Tensor:
        mod = self.base.embed_tokens
        h = mod(input_ids) if self.shard is None else self.shard.embed(mod, input_ids)
        scale = self.embed_scale()
        # HF's scaled embeddings multiply inside; a swapped-in (quantized) embedding does not, so we do
        if scale is not None and not hasattr(mod, "embed_scale"):
            h = h * scale
        return h

    def rope(self, x: torch.Tensor, positions: torch.Tensor) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
        """Rotary tables ``cos, sin`` of shape ``[N, 1, rotary_dim]`` for every table a layer names."""
        cos, sin = self.base.rotary_emb(x[None], positions[None])
        return {"default": (cos[0][:, None, :], sin[0][:, None, :])}

    def final_norm(self, h: torch.Tensor) -> torch.Tensor:
        return self.base.norm(h)

    def head(self, h: torch.Tensor) -> torch.Tensor:
        """The LM head on final-normed hidden states: ``[R, vocab]`` (a tensor-parallel rank's columns gathered)."""
        out = self.lm_head(h)
        return out if self.shard is None else self.shard.gather_vocab(out)

    def logits(self, h: torch.Tensor) -> torch.Tensor:
        """``[R, vocab]`` float32 logits from final-normed hidden states."""
        return self.head(h).float()


def _reduced(call: Callable[[torch.Tensor], torch.Tensor], shard: Shard) -> Callable[[torch.Tensor], torch.Tensor]:
    return lambda x: shard.all_reduce(call(x))
