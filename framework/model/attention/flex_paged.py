"""``flex_paged``: attention that reads the paged KV pool in place, through FlexAttention's block mask.

The whole pool of a layer is the key/value tensor (``[1, kv_heads, slots, head_dim]``, broadcast over the
batch); for each sequence (a batch row) and each block of its query rows, the block mask lists the physical
KV blocks of the sequence that the rows need: *full* blocks (every key visible to every row: context before
this step's tokens, inside the window) skip the mask function, *partial* ones (this step's own tokens, the
window's edge) apply it. Nothing is copied: the kernel (inductor's C++ template on CPU, Triton on CUDA) loads
the listed blocks where they are. The mask function maps a physical slot back to its position through a
per-row physical-to-logical block table, and among this step's tokens reads a ``[T, T]`` mask (causal, or a
draft tree's ancestors). Sliding windows cut blocks out of the lists; soft-capping is a score modifier. The
query heads that share a KV head (GQA) are laid out as query rows of that KV head, so each loaded block serves
all of them in one small GEMM (measured on the dev box, 64 decodes at 200 tokens of context, block 8: 7.4 vs
11.2 ms per layer with FlexAttention's own GQA).

Shapes are static per compiled variant: sequences are grouped by query length like ``sdpa_gather`` (decodes
together, chunks by power of two), a group's batch is padded to a power of four (padding rows list no blocks
and cost next to nothing), the block lists are as wide as the longest sequence can be.
The pipeline compiles the decode variants at build (:meth:`tokenmill.model.ModelRunner.warm_up`). Groups of more than ``FLEX_MAX_QUERY`` query
rows per sequence (prefill chunks), and groups reading fewer than ``FLEX_MIN_KEYS`` keys in all (where one
call's fixed cost outweighs the copy), go through ``sdpa_gather``'s path: there the copy is paid once for many
queries and is small next to the attention itself, while every new chunk length would be another compiled
variant.
"""
from __future__ import annotations

import os
import shutil
from functools import partial

import torch

from tokenmill.model.archs.base import LayerAttention
from tokenmill.model.attention.base import AttentionBackend, AttentionLayout
from tokenmill.model.attention.sdpa_gather import SdpaGather, group_rows, place_rows, query_groups
from tokenmill.model.batch import ForwardBatch
from tokenmill.model.resolve import persist_compiled_kernels

Q_BLOCK = 128  # query rows per block-mask row for chunks longer than this
FLEX_MAX_QUERY = 1  # longer query groups take the gather path (see FlexPaged.max_query)
# groups reading fewer keys than this (all sequences together) take the gather path, which costs less per call:
# measured on the dev box per layer, block 8: 1 x 100 keys 0.47 (flex) vs 0.31 ms (gather), 4 x 1000 1.65 vs 1.55,
# 16 x 300 3.71 vs 4.26, 64 x 200 5.2 vs 7.3, 64 x 1024 21 vs 93
FLEX_MIN_KEYS = 4096
RECOMPILE_LIMIT = 256  # compiled variants (batch bucket x query bucket x window x scale) per process


def _pow2(n: int) -> int:
    return 1 << max(n - 1, 0).bit_length()


def _pow4(n: int) -> int:
    p = 1
    while p < n:
        p *= 4
    return p


def _attend(q, k_cache, v_cache, kv_num, kv_idx, full_num, full_idx, p2l, start, qmask, qpos, *, block_size: int,
            q_block: int, group: int, window: int | None, softcap: float | None, scale: float):
    """``q`` ``[b, kv_heads, t * group, head_dim]``: the ``group`` query heads of each KV head are query rows
    (row ``r`` is query ``r // group``), so each loaded K/V block serves all of them in one small GEMM."""
    from torch.nn.attention.flex_attention import BlockMask, flex_attention

    b, _, rows, _ = q.shape
    t = rows // group
    slots, kv_heads, head_dim = k_cache.shape
    bs = block_size

    def mask_mod(bi, h, qi, kv):
        lb = p2l[bi, kv // bs]
        logical = lb * bs + kv % bs
        rel = logical - start[bi]
        ti = qi // group
        new = (rel >= 0) & (rel < t) & qmask[bi, ti, rel.clamp(0, t - 1)]
        ok = (lb >= 0) & ((rel < 0) | new)
        if window is not None:
            ok = ok & (logical > qpos[bi, ti] - window)
        return ok

    score_mod = None
    if softcap is not None:
        def score_mod(score, bi, h, qi, kv):
            return torch.tanh(score / softcap) * softcap

    mask = BlockMask.from_kv_blocks(kv_num, kv_idx, full_num, full_idx, BLOCK_SIZE=(q_block * group, bs),
                                    mask_mod=mask_mod, seq_lengths=(rows, slots))
    k = k_cache.view(1, slots, kv_heads, head_dim).transpose(1, 2).expand(b, -1, -1, -1)
    v = v_cache.view(1, slots, kv_heads, head_dim).transpose(1, 2).expand(b, -1, -1, -1)
    return flex_attention(q, k, v, score_mod=score_mod, block_mask=mask, scale=scale)


def _block_selection(start, count, qpos, qb: int, width: int, bs: int, window: int | None):
    """``[b, q blocks, logical blocks]`` bools: the full blocks (every key visible to every query row of the
    block) and the partial ones (the mask function decides) each query block of each row needs."""
    t = qpos.shape[1]
    r0 = torch.arange(t // qb) * qb                                      # first row of each query block
    r1 = torch.minimum(r0[None] + qb, count[:, None]) - 1                # [b, nq] its last row
    live = r0[None] < count[:, None]
    row = torch.arange(t)
    in_blk = (row[None, None] >= r0[None, :, None]) & (row[None, None] <= r1[:, :, None])   # [b, nq, t]
    big = torch.iinfo(torch.long).max
    pmin = torch.where(in_blk, qpos[:, None], big).amin(-1)             # smallest / largest position
    pmax = torch.where(in_blk, qpos[:, None], -big).amax(-1)
    last = (start[:, None] + r1) // bs                                   # [b, nq] block of the last slot
    k = torch.arange(width)[None, None]
    needed = live[..., None] & (k <= last[..., None])
    full = needed & ((k + 1) * bs <= start[:, None, None])
    if window is not None:
        needed &= (k + 1) * bs - 1 > pmin[..., None] - window
        full &= k * bs > pmax[..., None] - window
    return full, needed & ~full


def _physical_to_logical(bt: torch.Tensor, lengths: torch.Tensor, bs: int, num_blocks: int) -> torch.Tensor:
    """``[b, num_blocks]`` int32: the logical index of each physical block in each row's table, -1 elsewhere."""
    width = bt.shape[1]
    held = torch.arange(width)[None] < ((lengths + bs - 1) // bs)[:, None]
    lb = torch.where(held, torch.arange(width)[None], -1)
    p2l = torch.full((bt.shape[0], num_blocks + 1), -1, dtype=torch.int32)
    p2l.scatter_(1, torch.where(held, bt, num_blocks), lb.to(torch.int32))
    return p2l[:, :num_blocks]


def _block_lists(sel: torch.Tensor, bt: torch.Tensor, num_blocks: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The selected logical blocks as a block mask's ``(num_blocks [b, 1, nq], indices [b, 1, nq, pool])``
    of physical blocks, in logical order."""
    b, nq, width = sel.shape
    order = torch.argsort((~sel).to(torch.int8), dim=-1, stable=True)
    phys = torch.zeros(b, nq, num_blocks, dtype=torch.int32)
    phys[..., :width] = bt[:, None, :].expand(b, nq, width).gather(-1, order)
    return sel.sum(-1, dtype=torch.int32)[:, None], phys[:, None]


@torch.compiler.disable
def _call(fn, *args):
    """Run a compiled FlexAttention variant as its own graph. Inside the compiled model forward this is a graph
    break: inductor's CPU template needs the query as a buffer of its own (not a view of the graph's own
    computation), and the pool the layer has just written must not be a subgraph argument of that graph."""
    return fn(*args)


class FlexPaged(AttentionBackend):
    name = "flex_paged"
    # query rows per sequence up to which a group runs here: decodes by default. Longer groups (verification,
    # trees, prefill chunks) are exact here too (tests/model/test_attention.py raises this), but each new
    # query length is another compiled variant (10-20 s on the dev box) for a copy that they amortize anyway
    max_query: int = FLEX_MAX_QUERY
    min_keys: int = FLEX_MIN_KEYS

    def __init__(self, layout: AttentionLayout) -> None:
        super().__init__(layout)
        # blocks a sequence can hold (and a spare); the block lists themselves span the whole pool (the kernel
        # asks the mask to cover every KV block)
        self.width = min(-(-layout.max_model_len // layout.block_size) + 1, layout.num_blocks)
        self._fns: dict[tuple, object] = {}
        self.gather = SdpaGather(layout)
        # compiled kernels persist under the tokenmill cache, so a second build reuses them (seconds, not minutes)
        persist_compiled_kernels()
        limit = getattr(torch._dynamo.config, "recompile_limit", None)
        if limit is not None and limit < RECOMPILE_LIMIT:
            torch._dynamo.config.recompile_limit = RECOMPILE_LIMIT

    @classmethod
    def available(cls, device: torch.device) -> str | None:
        try:
            from torch.nn.attention.flex_attention import flex_attention  # noqa: F401
        except ImportError:
            return "this PyTorch has no torch.nn.attention.flex_attention (needs 2.5 or later)"
        if device.type == "cpu" and not any(shutil.which(c) for c in ("g++", "c++", "clang++")):
            return "inductor needs a C++ compiler on CPU (g++ or clang++) and none is on PATH"
        if device.type not in ("cpu", "cuda"):
            return f"FlexAttention compiles for cpu and cuda only, not {device.type}"
        return None

    def _fn(self, layer: LayerAttention, q_block: int):
        key = (layer.window, layer.softcap, layer.scale, q_block)
        fn = self._fns.get(key)
        if fn is None:
            fn = torch.compile(partial(_attend, block_size=self.layout.block_size, q_block=q_block,
                                       group=self.layout.num_heads // self.layout.num_kv_heads,
                                       window=layer.window, softcap=layer.softcap, scale=layer.scale),
                               dynamic=False, fullgraph=True)
            self._fns[key] = fn
        return fn

    # ------------------------------------------------------------------ metadata
    def prepare(self, batch: ForwardBatch, window: int | None) -> tuple:
        return tuple(("flex", self._group(batch, members, window)) if self._fits(batch, members)
                     else ("gather", (self.gather._group(batch, members, window),))
                     for members in query_groups(batch))

    def _fits(self, batch: ForwardBatch, members: list[int]) -> bool:
        return (max(batch.counts[i] for i in members) <= self.max_query
                and sum(batch.starts[i] + batch.counts[i] for i in members) >= self.min_keys)

    def warm_up_positions(self, batch_size: int) -> tuple[int, ...]:
        at = -(-self.min_keys // batch_size)  # the shortest context at which this many decodes take FlexAttention
        return (0, at) if at + 1 < self.layout.max_model_len else (0,)

    def _group(self, batch: ForwardBatch, members: list[int], window: int | None) -> tuple:
        lay, bs = self.layout, batch.block_size
        n_real = len(members)
        b, t = _pow4(n_real), _pow2(max(batch.counts[i] for i in members))
        qb = min(t, Q_BLOCK)
        tok, out_idx, out_sel = group_rows(batch, members, t)
        if b > n_real:  # padding rows repeat the first sequence's tokens and see no blocks (zero output)
            tok = torch.cat([tok, tok[:1].expand(b - n_real, -1)])
            if out_sel is None:
                out_sel = torch.arange(n_real * t)
                out_idx = tok[:n_real].reshape(-1)
        start = torch.zeros(b, dtype=torch.long)
        count = torch.zeros(b, dtype=torch.long)
        start[:n_real] = torch.tensor([batch.starts[i] for i in members])
        count[:n_real] = torch.tensor([batch.counts[i] for i in members])
        qpos = batch.positions[tok]                                           # [b, t]
        width = max(self.width, batch.block_tables.shape[1])
        bt = torch.zeros(b, width, dtype=torch.long)
        bt[:n_real, :batch.block_tables.shape[1]] = batch.block_tables[members]
        full, part = _block_selection(start, count, qpos, qb, width, bs, window)
        p2l = _physical_to_logical(bt, start + count, bs, lay.num_blocks)
        qmask = torch.ones(t, t, dtype=torch.bool).tril().expand(b, t, t).clone()
        for j, i in enumerate(members):
            allowed = batch.trees.get(i)
            if allowed is not None:
                n = allowed.shape[0]
                r = batch.counts[i] - n
                qmask[j, r:r + n, r:r + n] &= allowed
        kv_num, kv_idx = _block_lists(part, bt, lay.num_blocks)
        full_num, full_idx = _block_lists(full, bt, lay.num_blocks)
        dev = lay.device
        mv = lambda x: None if x is None else x.to(dev, non_blocking=True)  # noqa: E731
        return (mv(tok), mv(out_idx), mv(out_sel), qb, mv(kv_num), mv(kv_idx), mv(full_num), mv(full_idx), mv(p2l),
                mv(start), mv(qmask), mv(qpos))

    # ------------------------------------------------------------------ attention
    def forward(self, q, k_cache, v_cache, meta, layer: LayerAttention) -> torch.Tensor:
        n, hq, d = q.shape
        out = None
        for kind, group in meta:
            if kind == "gather":
                out = self.gather.forward(q, k_cache, v_cache, group, layer, out=out)
                continue
            tok, out_idx, out_sel, qb, *blocks = group
            b, t = tok.shape
            hk = self.layout.num_kv_heads
            qg = q.index_select(0, tok.reshape(-1)).view(b, t, hk, hq // hk, d).permute(0, 2, 1, 3, 4)
            qg = qg.reshape(b, hk, t * (hq // hk), d).contiguous()
            o = _call(self._fn(layer, qb), qg, k_cache, v_cache, *blocks)
            o = o.view(b, hk, t, hq // hk, d).permute(0, 2, 1, 3, 4).reshape(b * t, hq * d)
            if out_idx is None:
                return o
            out = place_rows(out, o, out_idx, out_sel, n)
        return out
