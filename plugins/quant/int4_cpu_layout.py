"""The layout of ``aten._convert_weight_to_int4pack_for_cpu``, learned by probing, and its inverse.

The CPU int4 kernel's packed layout depends on the CPU's vector width (blocks of 64 output rows on AVX512,
32 on AVX2, nibbles of different rows interleaved within a block). :class:`CpuInt4Layout` learns it once per
weight shape by converting probe weights whose nibbles encode their own row and column, and unpacks with
the inverse, so :class:`~tokenmill.plugins.quant.int4.Int4Linear` keeps the packed tensor as its only copy.
"""
from __future__ import annotations

import functools

import torch


def _nibbles(p: torch.Tensor) -> torch.Tensor:
    """All nibbles of a uint8 tensor in memory order: nibble ``2*i`` = low half of byte ``i``."""
    flat = p.reshape(-1)
    return torch.stack([flat & 15, flat >> 4], dim=-1).reshape(-1).long()


def _probe(n: int, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Convert probes of shape ``[n, k]``; returns per packed nibble its source (row, column)."""
    rows = torch.arange(n, dtype=torch.int32)[:, None].expand(n, k)
    cols = torch.arange(k, dtype=torch.int32)[None, :].expand(n, k)
    conv = torch.ops.aten._convert_weight_to_int4pack_for_cpu
    row_id = torch.zeros(n * k, dtype=torch.long)
    for shift in range(0, max(n - 1, 1).bit_length(), 4):
        row_id += _nibbles(conv(((rows >> shift) & 15).contiguous(), 2)) << shift
    col_id = _nibbles(conv(cols.contiguous(), 2))  # k <= 16 in our probes
    return row_id, col_id


def _slot_rule(row_id: torch.Tensor, col_id: torch.Tensor, n: int, k: int, bn: int) -> torch.Tensor | None:
    """If the probe fits "blocks of ``bn`` rows, each ``[k, bn/2]`` bytes, the same slot->row map in every
    k-row and block", return that map (``perm[slot] = row within block``), else None."""
    if n % bn:
        return None
    view_r = row_id.view(n // bn, k, bn)
    view_c = col_id.view(n // bn, k, bn)
    perm = view_r[0, 0]
    if not torch.equal(torch.sort(perm).values, torch.arange(bn)):
        return None
    base = (torch.arange(n // bn) * bn)[:, None, None]
    if not torch.equal(view_r, (base + perm).expand_as(view_r)) or not torch.equal(view_c, torch.arange(k)[None, :, None].expand_as(view_c)):
        return None
    return perm


@functools.lru_cache(maxsize=None)
def _full_block_rule() -> tuple[int, torch.Tensor]:
    n, k = 256, 4
    row_id, col_id = _probe(n, k)
    for bn in (16, 32, 64, 128, 256):
        perm = _slot_rule(row_id, col_id, n, k, bn)
        if perm is not None:
            return bn, perm
    raise NotImplementedError("unrecognized layout of _convert_weight_to_int4pack_for_cpu")


@functools.lru_cache(maxsize=None)
def _tail_block_rule(nb: int) -> torch.Tensor:
    row_id, col_id = _probe(nb, 4)
    perm = _slot_rule(row_id, col_id, nb, 4, nb)
    if perm is None:
        raise NotImplementedError(f"unrecognized layout of _convert_weight_to_int4pack_for_cpu for {nb} rows")
    return perm


def _mode(perm: torch.Tensor) -> str:
    """How a block's nibble slots map to its rows: ``pairs`` (byte j = rows 2j, 2j+1; the identity),
    ``halves`` (byte j = rows j and j + rows/2: the AVX2 / AVX512 full blocks) or a general ``perm``."""
    rows = perm.numel()
    if torch.equal(perm, torch.arange(rows)):
        return "pairs"
    halves = torch.stack([torch.arange(rows // 2), torch.arange(rows // 2) + rows // 2], -1).reshape(-1)
    return "halves" if torch.equal(perm, halves) else "perm"


def _unpack_blocks(flat: torch.Tensor, nblocks: int, rows: int, k: int, mode: str,
                   inv: torch.Tensor | None) -> torch.Tensor:
    """Bytes of ``nblocks`` blocks of ``rows`` rows (each ``[k, rows/2]``) -> ``q [nblocks * rows, k]``."""
    b = flat.view(nblocks, k, rows // 2)
    if mode == "halves":
        nib = torch.cat([b & 15, b >> 4], dim=2)
    else:
        nib = torch.stack([b & 15, b >> 4], dim=-1).view(nblocks, k, rows)
        if mode == "perm":
            nib = nib.index_select(2, inv.to(flat.device))
    return nib.transpose(1, 2).reshape(nblocks * rows, k)


class CpuInt4Layout:
    """Inverse of ``_convert_weight_to_int4pack_for_cpu`` for an ``[n, k]`` weight (n % 16 == 0, k even).

    Learned from probes: the packed bytes are blocks of ``bn`` output rows (the last block may be shorter),
    each block ``[k, rows/2]`` bytes, and within a k-row nibble slot ``s`` (``2*byte + high``) holds the
    block's row ``perm[s]`` (see :func:`_mode` for the two layouts torch 2.13 uses).
    """

    def __init__(self, n: int, k: int) -> None:
        self.n, self.k = n, k
        self.bn, perm = _full_block_rule()
        self.nfull = n // self.bn
        self.tail = n - self.nfull * self.bn
        self.inv_full = torch.argsort(perm)
        self.full_mode = _mode(perm)
        tail_perm = _tail_block_rule(self.tail) if self.tail else None
        self.inv_tail = torch.argsort(tail_perm) if self.tail else None
        self.tail_mode = _mode(tail_perm) if self.tail else ""

    @property
    def key(self) -> tuple:
        return (self.n, self.k, self.bn, self.full_mode, self.tail, self.tail_mode)

    def unpack(self, packed: torch.Tensor) -> torch.Tensor:
        """Packed kernel layout -> ``q [n, k]`` uint8."""
        flat = packed.reshape(-1)
        split = self.nfull * self.bn * self.k // 2
        parts = []
        if self.nfull:
            parts.append(_unpack_blocks(flat[:split], self.nfull, self.bn, self.k, self.full_mode, self.inv_full))
        if self.tail:
            parts.append(_unpack_blocks(flat[split:], 1, self.tail, self.k, self.tail_mode, self.inv_tail))
        return parts[0] if len(parts) == 1 else torch.cat(parts, 0)

    def gather_rows(self, packed: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
        """``q`` of rows ``ids`` (1-D) -> ``[len(ids), k]`` uint8, reading only those rows' bytes."""
        dev = packed.device
        ids = ids.long()
        blk = torch.div(ids, self.bn, rounding_mode="floor")
        r = ids - blk * self.bn
        in_tail = blk >= self.nfull
        slot = self.inv_full.to(dev)[r.clamp(max=self.bn - 1)]
        stride = torch.full_like(ids, self.bn // 2)
        if self.tail:
            slot = torch.where(in_tail, self.inv_tail.to(dev)[r.clamp(max=self.tail - 1)], slot)
            stride = torch.where(in_tail, torch.full_like(ids, self.tail // 2), stride)
        base = blk * (self.bn * self.k // 2) + torch.div(slot, 2, rounding_mode="floor")
        idx = base[:, None] + torch.arange(self.k, device=dev)[None, :] * stride[:, None]
        byte = packed.reshape(-1)[idx]
        return (byte >> (4 * (slot % 2)).to(torch.uint8)[:, None]) & 15


@functools.lru_cache(maxsize=None)
def cpu_layout(n: int, k: int) -> CpuInt4Layout:
    """One layout object per weight shape (compiled kernels guard on it: shared objects, shared graphs)."""
    return CpuInt4Layout(n, k)


def int4_dequant_cpu(packed: torch.Tensor, scales_and_zeros: torch.Tensor, layout: CpuInt4Layout, group_size: int,
                     dtype: torch.dtype) -> torch.Tensor:
    """The padded weight ``[Np, Kp]`` in ``dtype`` from the CPU kernel layout (one fused pass when compiled)."""
    q = layout.unpack(packed)
    n, kp = q.shape
    s = scales_and_zeros[..., 0].t().float()[..., None]
    z = scales_and_zeros[..., 1].t().float()[..., None]
    return ((q.view(n, kp // group_size, group_size).float() - 8) * s + z).to(dtype).view(n, kp)
