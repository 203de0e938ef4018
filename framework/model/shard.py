"""Tensor parallelism as a weight split plus an all-reduce (the gpt-fast recipe), on ``torch.distributed``.

Each rank keeps a contiguous share of the KV heads (and the query heads that read them), of the MLP's
intermediate columns and of the vocabulary:

* column-parallel: q/k/v (by heads), gate/up (by intermediate columns), the LM head (by vocabulary rows);
* row-parallel: o_proj and down_proj (the matching input columns; their bias only on rank 0), each followed by
  an all-reduce of the partial sums;
* vocab-parallel embedding: each rank looks up the ids in its range, zeros elsewhere, all-reduce.

Shares need not be equal: SmolLM2's 3 KV heads split 2 + 1 over two ranks. :func:`shard_model` slices an HF
model in place (after quantization: an int8 layer is split with its scales, so every rank computes exactly
the unsharded layer's share) and sets the config's head and
intermediate counts to the rank's own, which is what the architecture and the KV pool are then built from.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist


def split_sizes(n: int, world: int) -> list[int]:
    """``n`` items over ``world`` ranks in contiguous runs, the first ranks taking one more when it does not
    divide."""
    return [n // world + (r < n % world) for r in range(world)]


@dataclass(slots=True, frozen=True)
class Shard:
    """This process's place in a tensor-parallel group, and the vocabulary rows it holds."""

    rank: int
    world: int
    vocab: tuple[int, ...]  # rows of the vocabulary per rank (split_sizes of vocab_size)

    @property
    def vocab_range(self) -> tuple[int, int]:
        lo = sum(self.vocab[:self.rank])
        return lo, lo + self.vocab[self.rank]

    def all_reduce(self, x: torch.Tensor) -> torch.Tensor:
        dist.all_reduce(x)
        return x

    def embed(self, lookup, input_ids: torch.Tensor) -> torch.Tensor:
        """Vocab-parallel embedding: ``lookup`` holds this rank's rows only."""
        lo, hi = self.vocab_range
        outside = (input_ids < lo) | (input_ids >= hi)
        h = lookup((input_ids - lo).masked_fill(outside, 0))
        return self.all_reduce(h.masked_fill(outside[:, None], 0.0))

    def gather_vocab(self, local: torch.Tensor) -> torch.Tensor:
        """The rank's logits columns gathered on rank 0 into the full ``[R, vocab]``; other ranks get their own
        columns back (their logits are never read)."""
        width = max(self.vocab)
        if local.shape[1] < width:
            local = torch.nn.functional.pad(local, (0, width - local.shape[1]))
        local = local.contiguous()
        parts = [torch.empty_like(local) for _ in range(self.world)] if self.rank == 0 else None
        dist.gather(local, parts, dst=0)
        if self.rank != 0:
            return local
        return torch.cat([p[:, :n] for p, n in zip(parts, self.vocab)], dim=1)


def _take(parent, attr: str, dim: int, index: torch.Tensor, keep_bias: bool = True) -> None:
    """Keep output features (``dim`` 0, column-parallel) or input features (``dim`` 1, row-parallel) ``index``
    of the projection ``parent.<attr>``: a plain ``nn.Linear`` is sliced, a quantized one must offer
    ``take(dim, index, keep_bias)`` (int8 does: its per-row scales go with the rows, and a row-parallel share
    keeps the full rows' scales, so the sums equal the unsharded layer's). ``keep_bias`` False drops a
    row-parallel bias (it is added once, on rank 0)."""
    mod = getattr(parent, attr)
    if type(mod) is torch.nn.Linear:
        w = mod.weight.data.index_select(dim, index).clone()
        mod.weight = torch.nn.Parameter(w, requires_grad=False)
        if mod.bias is not None:
            mod.bias = (torch.nn.Parameter(mod.bias.data[index].clone(), requires_grad=False) if dim == 0 else
                        mod.bias if keep_bias else None)
        mod.out_features, mod.in_features = w.shape
    elif hasattr(mod, "take"):
        setattr(parent, attr, mod.take(dim, index, keep_bias))
    else:
        raise ValueError(f"tensor parallelism cannot split {attr} ({type(mod).__name__}): it splits plain and int8 "
                         "layers; use int8 or no quantization with parallel.tensor_parallel_size > 1")


def _span(sizes: list[int], rank: int, unit: int = 1, offset: int = 0) -> torch.Tensor:
    lo = sum(sizes[:rank]) * unit
    return torch.arange(offset + lo, offset + lo + sizes[rank] * unit)


UNSHARDABLE = {"olmo2": "its q/k norms span all heads", "mixtral": "mixture-of-experts blocks are not split",
               "qwen3_moe": "mixture-of-experts blocks are not split"}


def check_shardable(cfg, world: int) -> None:
    """ValueError unless a model of config ``cfg`` splits over ``world`` ranks (checked before any rank starts)."""
    if cfg.model_type in UNSHARDABLE:
        raise ValueError(f"tensor_parallel_size {world}: model type '{cfg.model_type}' cannot be sharded "
                         f"({UNSHARDABLE[cfg.model_type]})")
    hk = getattr(cfg, "num_key_value_heads", None) or cfg.num_attention_heads
    if hk < world:
        raise ValueError(f"tensor_parallel_size {world} is more than the model's {hk} KV heads; allowed: 1 to {hk}")


def shard_model(model, rank: int, world: int) -> Shard:
    """Slice ``model`` (an HF causal LM, not yet quantized) in place to rank ``rank``'s share of ``world``;
    ValueError naming what does not split."""
    cfg = model.config
    check_shardable(cfg, world)
    hq = cfg.num_attention_heads
    hk = getattr(cfg, "num_key_value_heads", None) or hq
    layers = model.model.layers
    head_dim = getattr(layers[0].self_attn, "head_dim", None) or cfg.hidden_size // hq
    group = hq // hk
    kv = split_sizes(hk, world)
    inter = split_sizes(cfg.intermediate_size, world)
    q_idx, k_idx = _span(kv, rank, group * head_dim), _span(kv, rank, head_dim)
    i_idx = _span(inter, rank)
    for layer in layers:
        attn, mlp = layer.self_attn, layer.mlp
        attn.head_dim = head_dim
        if hasattr(attn, "qkv_proj"):  # Phi-3: q, k and v fused in one projection
            _take(attn, "qkv_proj", 0, torch.cat([q_idx, k_idx + hq * head_dim, k_idx + (hq + hk) * head_dim]))
        else:
            for name, idx in (("q_proj", q_idx), ("k_proj", k_idx), ("v_proj", k_idx)):
                _take(attn, name, 0, idx)
        _take(attn, "o_proj", 1, q_idx, rank == 0)
        if hasattr(mlp, "gate_up_proj"):  # Phi-3: gate and up fused
            _take(mlp, "gate_up_proj", 0, torch.cat([i_idx, i_idx + cfg.intermediate_size]))
        else:
            _take(mlp, "gate_proj", 0, i_idx)
            _take(mlp, "up_proj", 0, i_idx)
        _take(mlp, "down_proj", 1, i_idx, rank == 0)
    vocab = split_sizes(cfg.vocab_size, world)
    _shard_vocab(model, _span(vocab, rank))
    cfg.num_attention_heads, cfg.num_key_value_heads = kv[rank] * group, kv[rank]
    cfg.intermediate_size = len(i_idx)
    return Shard(rank, world, tuple(vocab))


def _shard_vocab(model, index: torch.Tensor) -> None:
    """The embedding's and the LM head's rows ``index``; a tied pair stays one matrix (plain or quantized)."""
    base, n = model.model, len(index)
    embed = base.embed_tokens
    table = getattr(embed, "table", None)  # a quantized embedding dequantizes rows of this QuantLinear
    tied = (table is not None and table is model.lm_head) or getattr(embed, "weight", None) is getattr(
        model.lm_head, "weight", 0)
    _take(model, "lm_head", 0, index)
    if table is not None:
        embed.table = model.lm_head if tied else table.take(0, index, True)
    elif tied:
        embed.weight = model.lm_head.weight
    else:
        embed.weight = torch.nn.Parameter(embed.weight.data[index].clone(), requires_grad=False)
    embed.num_embeddings, embed.padding_idx = n, None  # padding_idx only shapes gradients
