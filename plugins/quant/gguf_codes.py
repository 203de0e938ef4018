"""Reading a GGUF file's quantized tensors as codes and per-block constants (no dequantize-requantize).

GGUF stores a quantized ``[N, K]`` weight row-major as blocks of 32 consecutive inputs of one row
(``ggml``'s block layouts, read here with the ``gguf`` package's reader):

- ``Q4_0``: ``d`` (float16), 16 bytes of nibbles; ``w = d * (q - 8)``.
- ``Q4_1``: ``d``, ``m`` (float16), 16 bytes of nibbles; ``w = d * q + m``.
- ``Q8_0``: ``d`` (float16), 32 int8 values; ``w = d * q``.

In the 4-bit blocks the low nibbles of the 16 bytes are inputs 0..15 and the high nibbles inputs 16..31.
:func:`dequantize` computes exactly what the ``gguf`` package (and so transformers' GGUF loader) computes in
float32, which lets the plugin check each tensor against the float weight the model was loaded with.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

BLOCK = 32
BYTES_PER_BLOCK = {"Q4_0": 18, "Q4_1": 20, "Q8_0": 34}
SUPPORTED = tuple(BYTES_PER_BLOCK)


@dataclass(slots=True)
class GgufTensor:
    """One quantized GGUF weight as codes: ``q [N, K]`` (uint8 0..15 for 4-bit, int8 for Q8_0) and per-block
    float16 ``d`` (and ``m`` for Q4_1), ``[N, K / 32]`` each."""

    name: str
    type: str
    q: torch.Tensor
    d: torch.Tensor
    m: torch.Tensor | None = None

    @property
    def shape(self) -> tuple[int, int]:
        return tuple(self.q.shape)

    def dequantize(self) -> torch.Tensor:
        """The float32 weight, computed as the ``gguf`` package computes it (same operations, same rounding)."""
        n, k = self.q.shape
        d = self.d.float()[..., None]
        qg = self.q.view(n, k // BLOCK, BLOCK).float()
        if self.type == "Q4_1":
            w = d * qg + self.m.float()[..., None]
        elif self.type == "Q4_0":
            w = d * (qg - 8.0)
        else:
            w = qg * d
        return w.view(n, k)

    def permute_rows(self, perm: torch.Tensor) -> "GgufTensor":
        """The same tensor with its output rows in the order ``perm`` (blocks run along inputs, so they move whole)."""
        return GgufTensor(self.name, self.type, self.q[perm], self.d[perm], None if self.m is None else self.m[perm])


def _decode(name: str, kind: str, raw: np.ndarray, n: int, k: int) -> GgufTensor:
    blocks = torch.from_numpy(np.array(raw, copy=True)).view(n, k // BLOCK, BYTES_PER_BLOCK[kind])
    d = blocks[..., 0:2].contiguous().view(torch.float16)[..., 0]
    if kind == "Q8_0":
        return GgufTensor(name, kind, blocks[..., 2:].contiguous().view(torch.int8).reshape(n, k), d)
    m = blocks[..., 2:4].contiguous().view(torch.float16)[..., 0] if kind == "Q4_1" else None
    qs = blocks[..., 4:] if kind == "Q4_1" else blocks[..., 2:]
    q = torch.cat([qs & 15, qs >> 4], dim=-1)  # low nibbles: inputs 0..15, high: 16..31
    return GgufTensor(name, kind, q.reshape(n, k).contiguous(), d, m)


@dataclass(slots=True)
class GgufFile:
    """What the plugin needs from a GGUF file: its architecture name and its quantized 2-D tensors by name
    (``blk.3.attn_q.weight``); ``other`` names the tensors of other types (left to the float model)."""

    path: Path
    architecture: str
    tensors: dict[str, GgufTensor]
    other: dict[str, str]


def read_gguf(path: str | Path) -> GgufFile:
    """Read ``path``; the quantized tensors of :data:`SUPPORTED` types come back as codes.

    :raises ValueError: the file is not a GGUF file the ``gguf`` package can read.
    """
    import gguf

    try:
        reader = gguf.GGUFReader(str(path))
    except (ValueError, OSError) as exc:
        raise ValueError(f"cannot read GGUF file {path}: {exc}") from None
    field = reader.fields.get("general.architecture")
    arch = bytes(field.parts[field.data[0]]).decode() if field is not None else ""
    tensors, other = {}, {}
    for t in reader.tensors:
        kind = t.tensor_type.name
        if kind in BYTES_PER_BLOCK and len(t.shape) == 2:
            k, n = (int(v) for v in t.shape)  # GGUF lists dimensions innermost first
            tensors[t.name] = _decode(t.name, kind, t.data, n, k)
        else:
            other[t.name] = kind
    return GgufFile(Path(path), arch, tensors, other)
