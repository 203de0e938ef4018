"""The attention-backend seam: a backend turns a step's block tables into its own metadata once per step, then
runs attention for one layer at a time over the paged KV pool.

Backends are found through the entry-point group ``tokenmill.attention`` (the built-ins are declared there
the way a third-party package declares its own) and chosen per pipeline with ``attention: auto | <name>``.
"""
from __future__ import annotations

import importlib.metadata as md
from dataclasses import dataclass
from typing import Any, ClassVar

import torch

from tokenmill.errors import PipelineError
from tokenmill.model.archs.base import LayerAttention
from tokenmill.model.batch import ForwardBatch

ENTRY_POINT_GROUP = "tokenmill.attention"


@dataclass(slots=True, frozen=True)
class AttentionLayout:
    """The shape of the KV pool and of the model's attention, fixed for a runner's life."""

    num_heads: int
    num_kv_heads: int
    head_dim: int
    block_size: int
    num_blocks: int
    max_model_len: int
    device: torch.device
    dtype: torch.dtype
    windows: tuple[int | None, ...]   # the distinct sliding windows of the layers (None: global)
    kv_multiple: int = 0              # bucketed (compiled) steps: pad key lengths to a multiple of this


class AttentionBackend:
    """Base class of attention backends.

    A step calls :meth:`prepare` once per distinct window (outside any compiled region; the result may be any
    tree of tensors and Python scalars) and then :meth:`forward` once per layer with that metadata.
    """

    name: ClassVar[str] = ""
    # whether the build runs warm-up decode steps through the backend (it compiles, or prepares per shape)
    needs_warm_up: ClassVar[bool] = True

    def __init__(self, layout: AttentionLayout) -> None:
        self.layout = layout

    @classmethod
    def available(cls, device: torch.device) -> str | None:
        """None when the backend can run on ``device``; else why not (shown when it is asked for)."""
        return None

    def prepare(self, batch: ForwardBatch, window: int | None) -> Any:
        raise NotImplementedError

    def forward(self, q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, meta: Any,
                layer: LayerAttention) -> torch.Tensor:
        """``q`` ``[N, heads, head_dim]`` (rotary applied), the layer's caches ``[slots, kv_heads, head_dim]``
        (this step's K/V already written) -> ``[N, heads * head_dim]``."""
        raise NotImplementedError



    def warm_up_positions(self, batch_size: int) -> tuple[int, ...]:
        """Context lengths at which the build's warm-up runs decode steps of ``batch_size`` sequences, so that
        every path the backend compiles for is compiled then (default: one step at position 0)."""
        return (0,)


def discover_backends() -> dict[str, md.EntryPoint]:
    return {ep.name: ep for ep in md.entry_points(group=ENTRY_POINT_GROUP)}


# measured-fastest backend per device type (docs/benchmarks.md, "Attention backends"); the first available wins
AUTO_ORDER = {"cpu": ("fused_paged", "flex_paged", "sdpa_gather"), "cuda": ("flex_paged", "sdpa_gather")}
# pools of larger blocks (contiguous_kv: one max-length row per sequence) take the gather, which reads only the
# used prefix of a row, while a block list would cover whole rows
PAGED_MAX_BLOCK = 64


def backend_class(name: str, layout: AttentionLayout) -> type[AttentionBackend]:
    """The backend class for ``attention: name`` (``auto``: the measured-fastest available one for the device
    and the pool's block size)."""
    found = discover_backends()
    device = layout.device
    if name == "auto":
        order = AUTO_ORDER.get(device.type, ()) if layout.block_size <= PAGED_MAX_BLOCK else ()
        for candidate in order:
            if candidate in found and found[candidate].load().available(device) is None:
                return found[candidate].load()
        name = "sdpa_gather"
    if name not in found:
        raise PipelineError(f"unknown attention backend '{name}'; allowed: auto, " + ", ".join(sorted(found)))
    cls = found[name].load()
    why = cls.available(device)
    if why is not None:
        raise PipelineError(f"attention backend '{name}' cannot run on {device}: {why}")
    return cls
