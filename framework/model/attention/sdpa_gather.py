"""``sdpa_gather``: copy each sequence's K/V rows out of the pool into a padded batch, then SDPA.

Sequences are grouped by query-length class (decodes together, prefill chunks by power-of-two length) so a
short chunk is not padded to the longest one. The copy costs about as much as the attention itself at long
contexts (see ``flex_paged`` for the backend that reads blocks in place); it needs no compiler and is exact
for every mask. Soft-capped layers (Gemma 2) run the same math by hand, as SDPA has no soft-cap.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from tokenmill.model.archs.base import LayerAttention
from tokenmill.model.attention.base import AttentionBackend
from tokenmill.model.batch import ForwardBatch


def query_groups(batch: ForwardBatch) -> list[list[int]]:
    """Sequence indices grouped by query length: decodes (1 token) first, then chunks by power of two, a length
    class's whole prompts (chunks from position 0, no draft tree) apart from its later chunks."""
    buckets: dict[tuple[int, bool], list[int]] = {}
    for i, n in enumerate(batch.counts):
        whole = n > 1 and batch.starts[i] == 0 and i not in batch.trees
        buckets.setdefault((0 if n == 1 else max(n - 1, 1).bit_length(), whole), []).append(i)
    return [members for _, members in sorted(buckets.items())]


def group_rows(batch: ForwardBatch, members: list[int], t_max: int) -> tuple[torch.Tensor, torch.Tensor | None,
                                                                              torch.Tensor | None]:
    """``tok [B, T]`` flat token of each query row (pads repeat a valid token), and the valid rows' flat
    tokens / indices into the group's ``[B*T]`` outputs (None, None when the group is the whole batch)."""
    count = torch.tensor([batch.counts[i] for i in members])
    t = torch.arange(t_max)
    tok = torch.tensor([batch.offsets[i] for i in members])[:, None] + torch.minimum(t[None, :], count[:, None] - 1)
    if len(members) == batch.num_seqs and t_max == int(count.min()):
        return tok, None, None
    out_sel = (t[None, :] < count[:, None]).reshape(-1).nonzero().squeeze(1)
    return tok, tok.reshape(-1)[out_sel], out_sel


def key_slots(batch: ForwardBatch, members: list[int], l_max: int, kv_multiple: int) -> torch.Tensor:
    """``[B, L]`` the pool row of each key position of each member's sequence, for ``L = l_max`` rounded up to a
    multiple of ``kv_multiple`` (0: not rounded); positions past a block table's end read its last block."""
    if kv_multiple:
        l_max = -(-l_max // kv_multiple) * kv_multiple
    bs, nb = batch.block_size, -(-l_max // batch.block_size)
    rows = batch.block_tables if len(members) == batch.num_seqs else batch.block_tables[members]
    if rows.shape[1] < nb:
        rows = torch.cat([rows, rows[:, -1:].expand(-1, nb - rows.shape[1])], dim=1)
    keys = (rows[:, :nb, None] * bs + torch.arange(bs)).view(rows.shape[0], nb * bs)
    return keys if nb * bs == l_max else keys[:, :l_max].contiguous()


def place_rows(out: torch.Tensor | None, o: torch.Tensor, out_idx: torch.Tensor, out_sel: torch.Tensor,
               n: int) -> torch.Tensor:
    """Copy a group's valid output rows (``out_sel`` of ``o``) to their flat tokens ``out_idx`` of the step's
    ``[n, heads * head_dim]`` result, allocated on first use."""
    if out is None:
        out = o.new_zeros(n, o.shape[1])
    out.index_copy_(0, out_idx, o.index_select(0, out_sel))
    return out


class SdpaGather(AttentionBackend):
    name = "sdpa_gather"
    needs_warm_up = False  # nothing to compile

    def prepare(self, batch: ForwardBatch, window: int | None) -> tuple:
        return tuple(self._group(batch, members, window) for members in query_groups(batch))

    def _group(self, batch: ForwardBatch, members: list[int], window: int | None) -> tuple:
        starts = [batch.starts[i] for i in members]
        counts = [batch.counts[i] for i in members]
        b, t_max = len(members), max(counts)
        # static-ish shapes for compiled decode: keys padded to kv_multiple, always an explicit mask
        kv_multiple = self.layout.kv_multiple if batch.decode_padded else 0
        kv_idx = key_slots(batch, members, max(s + n for s, n in zip(starts, counts)), kv_multiple)
        if t_max == 1:  # decodes: one query row each (no padded rows, no tree), the fewest small ops
            return self._decodes(batch, members, starts, window, kv_idx, kv_multiple)
        start, count = torch.tensor(starts), torch.tensor(counts)
        t, k = torch.arange(t_max), torch.arange(kv_idx.shape[1])
        tok, out_idx, out_sel = group_rows(batch, members, t_max)
        trees = {j: batch.trees[i] for j, i in enumerate(members) if i in batch.trees}
        unmasked = window is None and not kv_multiple and not trees
        if unmasked and b == 1 and counts[0] == 1:                   # one decode: attend to every key
            mask, causal = None, False
        elif unmasked and not any(starts):
            mask, causal = None, True  # whole prompts: SDPA's causal kernel (it skips the blocks above the
            # diagonal); a shorter prompt's padded query rows read keys past its end, but no valid row does
        else:
            qpos = start[:, None] + t[None, :]                       # [B, T] slot of each query row
            mask = k[None, None, :] <= qpos[:, :, None]
            for j, allowed in trees.items():  # a draft tree (after its root): ancestors only
                n = allowed.shape[0]
                r = counts[j] - n
                mask[j, r:r + n, starts[j] + r:starts[j] + r + n] &= allowed
            if window is not None:
                pos = batch.positions[tok]                           # a tree draft sits at root + depth
                mask &= k[None, None, :] > pos[:, :, None] - window
            pad = t[None, :] >= count[:, None]                       # padded query rows attend key 0 only
            mask |= pad[:, :, None] & (k == 0)[None, None, :]
            mask = mask[:, None]
            causal = False
        return self._moved(tok, kv_idx, mask, causal, out_idx, out_sel, kv_multiple)

    def _decodes(self, batch: ForwardBatch, members: list[int], starts: list[int], window: int | None,
                 kv_idx: torch.Tensor, kv_multiple: int) -> tuple:
        """:meth:`_group` for one query row per sequence: the query at position ``start`` sees keys ``<= start``
        (and ``> start - window``)."""
        tok = torch.tensor([[batch.offsets[i]] for i in members])
        out_idx = out_sel = None
        if len(members) != batch.num_seqs:
            out_idx, out_sel = tok.reshape(-1), torch.arange(len(members))
        mask = None  # every key when all sequences are as long and nothing pads or slides
        if window is not None or kv_multiple or min(starts) != max(starts):
            k, qpos = torch.arange(kv_idx.shape[1]), torch.tensor(starts)[:, None]
            mask = k <= qpos
            if window is not None:
                mask &= k > qpos - window
            mask = mask[:, None, None]
        return self._moved(tok, kv_idx, mask, False, out_idx, out_sel, kv_multiple)

    def _moved(self, tok, kv_idx, mask, causal, out_idx, out_sel, kv_multiple) -> tuple:
        """A group's metadata on the pool's device; a compiled decode step's key length marked dynamic, so the first
        trace is the graph for every length (else dynamo compiles a graph for the first length, then a dynamic one
        at the next)."""
        dev = self.layout.device
        mv = lambda x: None if x is None else x.to(dev, non_blocking=True)  # noqa: E731
        kv_idx, mask = mv(kv_idx), mv(mask)
        if kv_multiple:
            torch._dynamo.maybe_mark_dynamic(kv_idx, 1)
            if mask is not None:
                torch._dynamo.maybe_mark_dynamic(mask, 3)
        return mv(tok), kv_idx, mask, causal, mv(out_idx), mv(out_sel)

    def forward(self, q, k_cache, v_cache, meta, layer: LayerAttention, out: torch.Tensor | None = None) -> torch.Tensor:
        """(``out``: the ``[N, heads * head_dim]`` result other groups of the step fill too.)"""
        lay = self.layout
        n, hq, d = q.shape
        for tok_idx, kv_idx, mask, causal, out_idx, out_sel in meta:
            b, t = tok_idx.shape
            l = kv_idx.shape[1]
            # index_select on flat rows is several times faster than advanced indexing on CPU
            qg = q.index_select(0, tok_idx.reshape(-1)).view(b, t, hq, d).transpose(1, 2)
            flat = kv_idx.reshape(-1)
            kg = k_cache.index_select(0, flat).view(b, l, lay.num_kv_heads, d).transpose(1, 2)
            vg = v_cache.index_select(0, flat).view(b, l, lay.num_kv_heads, d).transpose(1, 2)
            if b == t == 1 and layer.softcap is None and torch.compiler.is_compiling():  # batch-1 decode
                o = decode_attention(qg, kg, vg, mask, layer.scale)
            elif layer.softcap is None:
                o = F.scaled_dot_product_attention(qg, kg, vg, attn_mask=mask, is_causal=causal, scale=layer.scale,
                                                   enable_gqa=bool(hq != lay.num_kv_heads))
            else:
                o = softcapped_attention(qg, kg, vg, mask, causal, layer)
            o = o.transpose(1, 2).reshape(b * t, hq * d)
            if out_idx is None:
                return o
            out = place_rows(out, o, out_idx, out_sel, n)
        return out


def decode_attention(q, k, v, mask, scale: float) -> torch.Tensor:
    """Attention of one query row per sequence (``q [B, Hq, 1, D]``, ``k``/``v`` ``[B, Hk, L, D]``, ``mask
    [B, 1, 1, L]`` or None), as the backend runs compiled batch-1 decodes: the scores as a product and a sum that
    inductor fuses with the gather of the keys, the scale, the mask and the softmax; then one batched matmul with
    the values. SDPA's CPU kernel costs ~0.1 ms a call at one query, and a reduction over the values (strided
    along the keys) runs unvectorized. In one process on the default model (bf16, batch 1, 2 threads) the
    compiled step took 18.0 ms this way against 20.0 with SDPA (medians of six rounds).

    The product with the values runs in float32 whatever the model's dtype (the float32 probabilities, the values
    widened in the gather that feeds it): a bf16 batched matmul of these shapes costs ~20 us a call on CPU against
    ~8 for float32, and 30 such calls sat in every bf16 decode step (40 us each there, cold). Default model bf16,
    batch 1, one process, bare compiled steps: 13.2 -> 11.9 ms at 2 threads, 20.3 -> 18.0 ms at 1."""
    b, hq, _, d = q.shape
    hk = k.shape[1]
    scores = (q.reshape(b, hk, hq // hk, 1, d) * k[:, :, None]).sum(-1) * scale   # [B, Hk, G, L]
    if mask is not None:
        scores = scores.masked_fill(~mask, float("-inf"))
    probs = torch.softmax(scores, dim=-1, dtype=torch.float32)
    return torch.matmul(probs, v.float()).to(q.dtype).reshape(b, hq, 1, d)


def softcapped_attention(q, k, v, mask, causal: bool, layer: LayerAttention) -> torch.Tensor:
    """Attention with Gemma 2's score cap, as HF's eager path computes it (scores in the input dtype, softmax in
    float32)."""
    groups = q.shape[1] // k.shape[1]
    if groups > 1:
        k, v = k.repeat_interleave(groups, dim=1), v.repeat_interleave(groups, dim=1)
    scores = torch.matmul(q, k.transpose(2, 3)) * layer.scale
    scores = torch.tanh(scores / layer.softcap) * layer.softcap
    if causal:
        t, l = scores.shape[-2:]
        mask = torch.ones(t, l, dtype=torch.bool, device=q.device).tril(l - t)
    if mask is not None:
        scores = scores.masked_fill(~mask, torch.finfo(scores.dtype).min)
    probs = torch.softmax(scores, dim=-1, dtype=torch.float32).to(q.dtype)
    return torch.matmul(probs, v)
