"""``fused_paged``: decodes read the paged KV pool in place, in one compiled kernel per layer.

A decode (one query row per sequence) is written as products and sums over the pool rows its block table names:
the scores are ``q . K[slot]`` summed over the head dimension, the output ``p . V[slot]`` summed over the keys.
Inductor turns the indexing into loads inside the reduction loops, so no K/V row is copied, and fuses the scale,
the soft-cap, the mask and the softmax with them; the query heads that share a KV head (GQA) reuse each loaded
row. The kernel is compiled once per (window, soft-cap, scale, dtype) with the number of sequences and the
number of keys dynamic, so one graph serves every batch and context length (plus one for a single sequence,
which dynamo specializes). Everything else (prefill chunks, verification, draft trees) takes ``sdpa_gather``'s
path, where the copy is paid once for many query rows, and so do decode groups reading fewer than
``FUSED_MIN_KEYS`` keys in all, where the compiled call's fixed cost is as large as the copy it saves.
"""
from __future__ import annotations

import shutil
import types
from functools import partial

import torch

from tokenmill.model.archs.base import LayerAttention
from tokenmill.model.attention.base import AttentionBackend, AttentionLayout
from tokenmill.model.attention.sdpa_gather import SdpaGather, group_rows, key_slots, place_rows, query_groups
from tokenmill.model.batch import ForwardBatch
from tokenmill.model.resolve import persist_compiled_kernels

# decode groups reading fewer keys than this (all sequences together) take the gather path. Whole decode steps of
# the default model on the dev box (AMD EPYC, 2 threads, block 8), gather vs fused: 1 x 500 keys 29.8 vs 31.7 ms,
# 8 x 200 58.3 vs 60.2, 16 x 150 76.2 vs 73.9, 64 x 170 240 vs 192
FUSED_MIN_KEYS = 2048


def paged_decode(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, slots: torch.Tensor,
                 length: torch.Tensor, qpos: torch.Tensor, *, window: int | None, softcap: float | None,
                 scale: float) -> torch.Tensor:
    """One query row per sequence against the pool rows ``slots``.

    :param q: ``[B, heads, head_dim]`` (rotary applied).
    :param k_cache: the layer's pool ``[slots, kv_heads, head_dim]``; ``v_cache`` likewise.
    :param slots: ``[B, L]`` the pool row of each logical key position (any valid row past ``length``).
    :param length: ``[B]`` keys each row sees (its own position + 1).
    :param qpos: ``[B]`` the query's position (the sliding window's reference).
    :returns: ``[B, heads * head_dim]`` in ``q``'s dtype; scores, softmax and sums in float32.
    """
    b, l = slots.shape
    hq, d = q.shape[1], q.shape[2]
    hk = k_cache.shape[1]
    g = hq // hk
    k = k_cache[slots]                                                    # [B, L, Hk, D], fused into the sum
    s = (q.view(b, 1, hk, g, d).float() * k[:, :, :, None, :].float()).sum(-1) * scale   # [B, L, Hk, G]
    if softcap is not None:
        s = torch.tanh(s / softcap) * softcap
    key = torch.arange(l, device=slots.device)[None, :]
    ok = key < length[:, None]
    if window is not None:
        ok = ok & (key > qpos[:, None] - window)
    s = s.masked_fill(~ok[:, :, None, None], float("-inf"))
    p = torch.softmax(s, dim=1)
    v = v_cache[slots]                                                    # [B, L, Hk, D]
    o = (p[..., None] * v[:, :, :, None, :].float()).sum(1)              # [B, Hk, G, D]
    return o.reshape(b, hq * d).to(q.dtype)


class FusedPaged(AttentionBackend):
    name = "fused_paged"
    min_keys: int = FUSED_MIN_KEYS

    def __init__(self, layout: AttentionLayout) -> None:
        super().__init__(layout)
        self.gather = SdpaGather(layout)
        self._fns: dict[tuple, object] = {}
        persist_compiled_kernels()

    @classmethod
    def available(cls, device: torch.device) -> str | None:
        if device.type == "cpu" and not any(shutil.which(c) for c in ("g++", "c++", "clang++")):
            return "inductor needs a C++ compiler on CPU (g++ or clang++) and none is on PATH"
        return None

    def _fn(self, layer: LayerAttention):
        key = (layer.window, layer.softcap, layer.scale)
        fn = self._fns.get(key)
        if fn is None:
            # over a copy of the code: dynamo keeps graphs per code object, so every variant of every runner in
            # the process (each pool its own shape) keeps one cache of its own, far from the recompile limit
            code = paged_decode.__code__.replace()
            own = types.FunctionType(code, paged_decode.__globals__, paged_decode.__name__)
            fn = torch.compile(partial(own, window=layer.window, softcap=layer.softcap, scale=layer.scale),
                               dynamic=False, fullgraph=True)
            self._fns[key] = fn
        return fn

    def warm_up_positions(self, batch_size: int) -> tuple[int, ...]:
        """0 (the gather path) and the shortest context at which this many decodes take the fused kernel, which
        then serves every longer one (the key count is dynamic)."""
        at = min(-(-self.min_keys // batch_size), self.layout.max_model_len - 2)
        if at + 1 == batch_size:  # equal sizes at tracing would tie the batch and key dimensions to one symbol
            at += 1
        return (0, at) if 0 < at < self.layout.max_model_len - 1 else (0,)

    # ------------------------------------------------------------------ metadata
    def prepare(self, batch: ForwardBatch, window: int | None) -> tuple:
        return tuple(("fused", self._group(batch, members)) if self._fits(batch, members)
                     else ("gather", (self.gather._group(batch, members, window),))
                     for members in query_groups(batch))

    def _fits(self, batch: ForwardBatch, members: list[int]) -> bool:
        return (all(batch.counts[i] == 1 for i in members)
                and sum(batch.starts[i] + 1 for i in members) >= self.min_keys)

    def _group(self, batch: ForwardBatch, members: list[int]) -> tuple:
        tok, out_idx, out_sel = group_rows(batch, members, 1)
        real = len(members)
        if real == 1 and not batch.decode_padded:  # two rows (the second a copy): one graph for every batch size,
            members = members * 2                  # where dynamo would compile a second one for a single row
            tok = tok.expand(2, 1)
        length = torch.tensor([batch.starts[i] + 1 for i in members])
        # compiled steps: keys padded to a few lengths
        slots = key_slots(batch, members, int(length.max()), self.layout.kv_multiple if batch.decode_padded else 0)
        key = torch.arange(slots.shape[1])
        slots = torch.where(key[None] < length[:, None], slots, slots[:, :1])
        qpos = batch.positions[tok[:, 0]]
        dev = self.layout.device
        mv = lambda x: None if x is None else x.to(dev, non_blocking=True)  # noqa: E731
        slots, length, qpos = mv(slots), mv(length), mv(qpos)
        for t in (slots, length, qpos):  # the batch and key count: symbols of the one graph, not constants
            torch._dynamo.maybe_mark_dynamic(t, 0)
        torch._dynamo.maybe_mark_dynamic(slots, 1)
        return real, mv(tok.reshape(-1)), mv(out_idx), mv(out_sel), slots, length, qpos

    # ------------------------------------------------------------------ attention
    def forward(self, q, k_cache, v_cache, meta, layer: LayerAttention) -> torch.Tensor:
        n = q.shape[0]
        out = None
        for kind, group in meta:
            if kind == "gather":
                out = self.gather.forward(q, k_cache, v_cache, group, layer, out=out)
                continue
            real, tok, out_idx, out_sel, slots, length, qpos = group
            qg = q if out_idx is None and tok.shape[0] == n else q.index_select(0, tok)
            if torch.compiler.is_compiling():  # the compiled decode step: traced into its graph
                o = paged_decode(qg, k_cache, v_cache, slots, length, qpos, window=layer.window,
                                 softcap=layer.softcap, scale=layer.scale)
            else:
                torch._dynamo.maybe_mark_dynamic(qg, 0)
                o = self._fn(layer)(qg, k_cache, v_cache, slots, length, qpos)[:real]
            if out_idx is None:
                return o
            out = place_rows(out, o, out_idx, out_sel, n)
        return out
