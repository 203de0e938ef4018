"""Flattened batch layout for one forward pass over the KV pool.

All scheduled tokens of all sequences are laid end to end (``N`` tokens) for the dense layers. Attention
runs per *group* of sequences that share a query length class: decodes (1 query token each) in one call,
prefill chunks (padded to the longest chunk) in another. K/V are read through each sequence's block table.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(slots=True)
class AttnGroup:
    tok_idx: torch.Tensor          # [B, T] flat index of each query token (pads repeat a valid index)
    kv_idx: torch.Tensor           # [B, L] pool row of each key position
    mask: torch.Tensor | None      # [B, 1, T, L] bool (True = attend); None with is_causal or no masking
    is_causal: bool
    out_idx: torch.Tensor | None   # [M] flat tokens produced by the group; None when the group is the batch
    out_sel: torch.Tensor | None   # [M] index into the group's flattened [B*T] outputs

    def as_tuple(self) -> tuple:
        return (self.tok_idx, self.kv_idx, self.mask, self.is_causal, self.out_idx, self.out_sel)


@dataclass(slots=True)
class ForwardBatch:
    input_ids: torch.Tensor        # [N]
    positions: torch.Tensor        # [N]
    slot_mapping: torch.Tensor     # [N] pool row each new token's K/V is written to
    groups: list[AttnGroup]
    logits_idx: torch.Tensor       # [R] flat tokens whose next-token logits are needed
    decode_padded: bool = False    # a bucketed all-decode batch (the compiled path's input)

    @property
    def num_tokens(self) -> int:
        return int(self.input_ids.shape[0])


def _group(seq_ids: list[int], starts: list[int], counts: list[int], offsets: list[int], bt: torch.Tensor,
           block_size: int, window: int | None, whole_batch: bool, kv_multiple: int = 0,
           trees: dict[int, torch.Tensor] | None = None) -> AttnGroup:
    b = len(seq_ids)
    t_max = max(counts)
    l_max = max(s + n for s, n in zip(starts, counts))
    if kv_multiple:  # static-ish shapes for compiled decode: pad keys, always an explicit mask
        l_max = -(-l_max // kv_multiple) * kv_multiple
    start = torch.tensor(starts)
    count = torch.tensor(counts)
    t = torch.arange(t_max)
    tok = torch.tensor(offsets)[:, None] + torch.minimum(t[None, :], count[:, None] - 1)
    k = torch.arange(l_max)
    rows = bt[seq_ids]
    kv_idx = rows[:, (k // block_size).clamp(max=rows.shape[1] - 1)] * block_size + (k % block_size)
    single = b == 1 and window is None and not kv_multiple and not trees
    if single and counts[0] == 1:                                # one decode: attend to every key
        mask, causal = None, False
    elif single and starts[0] == 0:                              # one whole prompt: plain causal
        mask, causal = None, True
    else:
        qpos = start[:, None] + t[None, :]                       # [B, T]
        mask = k[None, None, :] <= qpos[:, :, None]
        if window is not None:
            mask &= k[None, None, :] > qpos[:, :, None] - window
        pad = t[None, :] >= count[:, None]                       # padded query rows attend key 0 only
        mask |= pad[:, :, None] & (k == 0)[None, None, :]
        for j, allowed in (trees or {}).items():  # a draft tree (after its root): ancestors only
            n = allowed.shape[0]
            r = counts[j] - n
            mask[j, r:r + n, starts[j] + r:starts[j] + r + n] &= allowed
        mask = mask[:, None]
        causal = False
    if whole_batch and t_max == min(counts):
        out_idx = out_sel = None
    else:
        valid = (t[None, :] < count[:, None]).reshape(-1)
        out_sel = valid.nonzero().squeeze(1)
        out_idx = tok.reshape(-1)[out_sel]
    return AttnGroup(tok, kv_idx, mask, causal, out_idx, out_sel)


def tree_mask(parents: list[int]) -> torch.Tensor:
    """``[n+1, n+1]`` bool: token ``a`` (0 = the root, ``i + 1`` = draft ``i``) may attend to token ``b``, its
    ancestor or itself (so row ``i + 1`` holds ``depth(i) + 1`` trues)."""
    n = len(parents)
    m = torch.eye(n + 1, dtype=torch.bool)
    m[:, 0] = True
    for i, p in enumerate(parents):
        m[i + 1] |= m[p + 1]
    return m


def next_bucket(n: int, buckets: list[int]) -> int:
    return next((b for b in buckets if b >= n), n)


def build_batch(items: list[tuple[list[int], int, list[int], int]], block_size: int, *,
                window: int | None = None, device: torch.device | str = "cpu",
                decode_buckets: list[int] | None = None, kv_multiple: int = 0,
                max_padded_tokens: int = 1,
                trees: dict[int, list[int]] | None = None) -> ForwardBatch:
    """Lay out one step.

    :param items: per sequence ``(new_token_ids, start_position, block_table, num_logits)``: the tokens to
        run, the position of the first, the sequence's block table, and how many trailing positions need
        logits (0 for a middle prefill chunk).
    :param block_size: tokens per KV block.
    :param window: sliding-window size of the model, if any.
    :param decode_buckets: when every item is a single-token decode and there are at most as many items as
        the largest bucket, pad the batch to the next of these sizes with copies of the first item (same token, position and slot, so the duplicate K/V write is
        identical) and never ask their logits: a few fixed shapes for compiled graphs.
    :param kv_multiple: with ``decode_buckets``, pad the key length to a multiple of this.
    :param max_padded_tokens: items of up to this many tokens each, all the same count, also take the
        bucketed (compiled) layout: a draft model catching up on two tokens stays on its compiled path.
    :param trees: ``{item index: parents}`` for items whose last tokens are a draft tree (see
        :class:`tokenmill.hooktypes.Draft`) after its root, the last accepted token: each draft sits at
        position ``root + depth`` while its K/V goes to the next slot in order, and sees only its ancestors.
    """
    width = len(items[0][0])
    padded = (bool(decode_buckets) and len(items) <= decode_buckets[-1] and width <= max_padded_tokens
              and all(len(x[0]) == width for x in items) and not trees)
    if padded:
        pad = next_bucket(len(items), decode_buckets) - len(items)
        items = list(items) + [(items[0][0], items[0][1], items[0][2], 0)] * pad
    counts = [len(x[0]) for x in items]
    starts = [x[1] for x in items]
    offsets, acc = [], 0
    for n in counts:
        offsets.append(acc)
        acc += n
    ids = torch.tensor([tok for x in items for tok in x[0]], dtype=torch.long)
    max_blocks = max(len(x[2]) for x in items)
    bt = torch.tensor([x[2] + [0] * (max_blocks - len(x[2])) for x in items], dtype=torch.long)
    seq_of_tok = torch.repeat_interleave(torch.arange(len(items)), torch.tensor(counts))
    pos = torch.tensor(starts)[seq_of_tok] + (torch.arange(acc) - torch.tensor(offsets)[seq_of_tok])
    slots = bt[seq_of_tok, pos // block_size] * block_size + pos % block_size
    allowed: dict[int, torch.Tensor] = {}
    for i, parents in (trees or {}).items():
        m = tree_mask(parents)
        first = offsets[i] + counts[i] - len(parents)
        pos[first:first + len(parents)] += m[1:].sum(1) - 1 - torch.arange(1, len(parents) + 1)
        allowed[i] = m
    # attention groups: decodes together; prefill chunks bucketed by length (power of two) so a short
    # chunk is not padded to the longest one in the step
    buckets: dict[int, list[int]] = {}
    for i, n in enumerate(counts):
        buckets.setdefault(0 if n == 1 else max(n - 1, 1).bit_length(), []).append(i)
    groups = []
    for _, members in sorted(buckets.items()):
        if members:
            groups.append(_group(members, [starts[i] for i in members], [counts[i] for i in members],
                                 [offsets[i] for i in members], bt, block_size, window,
                                 whole_batch=len(members) == len(items),
                                 kv_multiple=kv_multiple if padded else 0,
                                 trees={j: allowed[i] for j, i in enumerate(members) if i in allowed}))
    logits_idx = [offsets[i] + counts[i] - k for i, x in enumerate(items) for k in range(x[3], 0, -1)]
    batch = ForwardBatch(ids, pos, slots, groups, torch.tensor(logits_idx, dtype=torch.long), padded)
    if torch.device(device).type != "cpu":
        batch = to_device(batch, device)
    return batch


def to_device(batch: ForwardBatch, device) -> ForwardBatch:
    mv = lambda t: None if t is None else t.to(device, non_blocking=True)  # noqa: E731
    groups = [AttnGroup(mv(g.tok_idx), mv(g.kv_idx), mv(g.mask), g.is_causal, mv(g.out_idx), mv(g.out_sel))
              for g in batch.groups]
    return ForwardBatch(mv(batch.input_ids), mv(batch.positions), mv(batch.slot_mapping), groups,
                        mv(batch.logits_idx), batch.decode_padded)
