"""The flattened batch of one forward pass over the KV pool.

All scheduled tokens of all sequences are laid end to end (``N`` tokens) for the dense layers; per sequence the
batch keeps where its tokens start in the flat layout and in the sequence, and its block table. Attention
backends build their own per-step metadata from that (:mod:`tokenmill.model.attention`). Everything here is
plain tensors and ints: what a tensor-parallel worker would receive.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch

from tokenmill.speculation.tree import tree_mask


@dataclass(slots=True)
class ForwardBatch:
    input_ids: torch.Tensor        # [N]
    positions: torch.Tensor        # [N] position of each token (a tree draft sits at root + depth)
    slot_mapping: torch.Tensor     # [N] pool row each new token's K/V is written to
    logits_idx: torch.Tensor       # [R] flat tokens whose next-token logits are needed
    starts: list[int]              # per sequence: position of its first new token
    counts: list[int]              # per sequence: how many new tokens it runs
    offsets: list[int]             # per sequence: flat index of its first new token
    block_tables: torch.Tensor     # [B, max_blocks] (on the host; pad entries are 0)
    block_size: int
    trees: dict[int, torch.Tensor] = field(default_factory=dict)  # seq -> [n+1, n+1] allowed (tree_mask)
    decode_padded: bool = False    # a bucketed all-same-width batch (the compiled path's input)

    @property
    def num_tokens(self) -> int:
        return int(self.input_ids.shape[0])

    @property
    def num_seqs(self) -> int:
        return len(self.counts)


def next_bucket(n: int, buckets: list[int]) -> int:
    return next((b for b in buckets if b >= n), n)


def build_batch(items: list[tuple[list[int], int, list[int], int]], block_size: int, *,
                decode_buckets: list[int] | None = None, max_padded_tokens: int = 1,
                trees: dict[int, list[int]] | None = None) -> ForwardBatch:
    """Lay out one step.

    :param items: per sequence ``(new_token_ids, start_position, block_table, num_logits)``: the tokens to
        run, the position of the first, the sequence's block table, and how many trailing positions need
        logits (0 for a middle prefill chunk).
    :param block_size: tokens per KV block.
    :param decode_buckets: when every item runs the same number of tokens (at most ``max_padded_tokens``)
        and there are at most as many items as the largest bucket, pad the batch to the next of these sizes
        with copies of the first item (same tokens, positions and slots, so the duplicate K/V writes are
        identical) and never ask their logits: a few fixed shapes for compiled graphs.
    :param max_padded_tokens: items of up to this many tokens each, all the same count, take the bucketed
        layout (a draft model catching up on two tokens stays on its compiled path).
    :param trees: ``{item index: parents}`` for items whose last tokens are a draft tree (see
        :class:`tokenmill.speculation.Draft`) after its root, the last accepted token: each draft sits at
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
    # laid out in Python lists, one tensor per field: a decode step's batch is a handful of rows, where each torch
    # op on tiny tensors costs more than the loop (a one-sequence step: ~85 -> ~33 us here)
    ids = [tok for x in items for tok in x[0]]
    pos = [p for x in items for p in range(x[1], x[1] + len(x[0]))]
    slots = [x[2][p // block_size] * block_size + p % block_size for x in items
             for p in range(x[1], x[1] + len(x[0]))]
    max_blocks = max(len(x[2]) for x in items)
    bt = torch.tensor([x[2] + [0] * (max_blocks - len(x[2])) for x in items], dtype=torch.long)
    allowed: dict[int, torch.Tensor] = {}
    for i, parents in (trees or {}).items():
        m = tree_mask(parents)
        first = offsets[i] + counts[i] - len(parents)
        depth = m[1:].sum(1).tolist()  # each draft's ancestors, itself and the root included: root + depth
        for j, a in enumerate(depth):
            pos[first + j] += a - 2 - j
        allowed[i] = m
    logits_idx = [offsets[i] + counts[i] - k for i, x in enumerate(items) for k in range(x[3], 0, -1)]
    return ForwardBatch(torch.tensor(ids, dtype=torch.long), torch.tensor(pos, dtype=torch.long),
                        torch.tensor(slots, dtype=torch.long), torch.tensor(logits_idx, dtype=torch.long), starts,
                        counts, offsets, bt, block_size, allowed, padded)
