"""Tensor parallelism as a weight split plus an all-reduce (the gpt-fast recipe), on ``torch.distributed``.

Each rank keeps a contiguous share of the KV heads (and the query heads that read them), of the MLP's
intermediate columns and of the vocabulary:

* column-parallel: q/k/v (by heads), gate/up (by intermediate columns), the LM head (by vocabulary rows);
* row-parallel: o_proj and down_proj (the matching input columns; their bias only on rank 0), each followed by
  an all-reduce of the partial sums;
* vocab-parallel embedding: each rank looks up the ids in its range, zeros elsewhere, all-reduce.

Shares need not be equal: SmolLM2's 3 KV heads split 2 + 1 over two ranks. :func:`shard_model` slices an HF
model in place (before quantization, so quantized modules get per-shard scales) and sets the config's head and
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


def _rows(linear: torch.nn.Linear, start: int, stop: int) -> None:
    """Keep output features ``[start, stop)`` (column-parallel)."""
    linear.weight = torch.nn.Parameter(linear.weight.data[start:stop].clone(), requires_grad=False)
    if linear.bias is not None:
        linear.bias = torch.nn.Parameter(linear.bias.data[start:stop].clone(), requires_grad=False)
    linear.out_features = stop - start


def _cols(linear: torch.nn.Linear, start: int, stop: int, rank: int) -> None:
    """Keep input features ``[start, stop)`` (row-parallel); the bias is added once, on rank 0."""
    linear.weight = torch.nn.Parameter(linear.weight.data[:, start:stop].clone(), requires_grad=False)
    if linear.bias is not None and rank != 0:
        linear.bias = torch.nn.Parameter(torch.zeros_like(linear.bias.data), requires_grad=False)
    linear.in_features = stop - start


def _range(sizes: list[int], rank: int, unit: int = 1) -> tuple[int, int]:
    lo = sum(sizes[:rank]) * unit
    return lo, lo + sizes[rank] * unit


UNSHARDABLE = {"olmo2": "its q/k norms span all heads", "mixtral": "mixture-of-experts blocks are not split",
               "qwen3_moe": "mixture-of-experts blocks are not split"}


def shard_model(model, rank: int, world: int) -> Shard:
    """Slice ``model`` (an HF causal LM, not yet quantized) in place to rank ``rank``'s share of ``world``;
    ValueError naming what does not split."""
    cfg = model.config
    if cfg.model_type in UNSHARDABLE:
        raise ValueError(f"tensor_parallel_size {world}: model type '{cfg.model_type}' cannot be sharded "
                         f"({UNSHARDABLE[cfg.model_type]})")
    hq = cfg.num_attention_heads
    hk = getattr(cfg, "num_key_value_heads", None) or hq
    if hk < world:
        raise ValueError(f"tensor_parallel_size {world} is more than the model's {hk} KV heads; allowed: 1 to {hk}")
    layers = model.model.layers
    head_dim = getattr(layers[0].self_attn, "head_dim", None) or cfg.hidden_size // hq
    group = hq // hk
    kv = split_sizes(hk, world)
    inter = split_sizes(cfg.intermediate_size, world)
    for layer in layers:
        attn, mlp = layer.self_attn, layer.mlp
        attn.head_dim = head_dim
        q_lo, q_hi = _range(kv, rank, group * head_dim)
        k_lo, k_hi = _range(kv, rank, head_dim)
        if hasattr(attn, "qkv_proj"):  # Phi-3: q, k and v fused in one projection
            w = attn.qkv_proj
            q_w, k_w, v_w = w.weight.data.split([hq * head_dim, hk * head_dim, hk * head_dim])
            w.weight = torch.nn.Parameter(torch.cat([q_w[q_lo:q_hi], k_w[k_lo:k_hi], v_w[k_lo:k_hi]]).clone(),
                                          requires_grad=False)
            w.out_features = w.weight.shape[0]
        else:
            _rows(attn.q_proj, q_lo, q_hi)
            _rows(attn.k_proj, k_lo, k_hi)
            _rows(attn.v_proj, k_lo, k_hi)
        _cols(attn.o_proj, q_lo, q_hi, rank)
        i_lo, i_hi = _range(inter, rank)
        if hasattr(mlp, "gate_up_proj"):  # Phi-3: gate and up fused
            g, u = mlp.gate_up_proj.weight.data.chunk(2)
            mlp.gate_up_proj.weight = torch.nn.Parameter(torch.cat([g[i_lo:i_hi], u[i_lo:i_hi]]).clone(),
                                                         requires_grad=False)
            mlp.gate_up_proj.out_features = 2 * (i_hi - i_lo)
        else:
            _rows(mlp.gate_proj, i_lo, i_hi)
            _rows(mlp.up_proj, i_lo, i_hi)
        _cols(mlp.down_proj, i_lo, i_hi, rank)
    vocab = split_sizes(cfg.vocab_size, world)
    v_lo, v_hi = _range(vocab, rank)
    embed, head = model.model.embed_tokens, model.lm_head
    tied = head.weight is embed.weight
    embed.weight = torch.nn.Parameter(embed.weight.data[v_lo:v_hi].clone(), requires_grad=False)
    embed.num_embeddings, embed.padding_idx = v_hi - v_lo, None  # padding_idx only shapes gradients
    if tied:
        head.weight = embed.weight
        head.out_features = v_hi - v_lo
    else:
        _rows(head, v_lo, v_hi)
    cfg.num_attention_heads, cfg.num_key_value_heads = kv[rank] * group, kv[rank]
    cfg.intermediate_size = i_hi - i_lo
    return Shard(rank, world, tuple(vocab))
