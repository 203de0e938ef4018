"""Payloads passed to and returned from hooks. Small slotted dataclasses owned by the framework."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Protocol, Sequence as Seq

import torch

from tokenmill.sequence import Sequence


@dataclass(slots=True, frozen=True)
class SchedulerLimits:
    """Bounds every scheduler must respect for one step."""

    max_num_seqs: int
    max_num_batched_tokens: int
    max_model_len: int


class KVHandle(Protocol):
    """The engine's view of the KV cache offered to schedulers.

    It routes to the ``allocate_kv`` / ``free_kv`` hooks, so a scheduler never knows which KV plugin runs.
    ``block_size`` is the pool's tokens per block (``max_model_len`` for the one-row-per-sequence default).
    """

    block_size: int

    def allocate(self, seq: Sequence, num_new_tokens: int, num_cached_tokens: int = 0) -> bool:
        """Reserve slots for ``num_new_tokens`` more tokens of ``seq`` (after ``num_cached_tokens`` reused
        from the prefix cache, for a sequence starting from zero); False when there is no room."""

    def cached_prefix(self, seq: Sequence) -> int:
        """Leading tokens of a not-yet-started ``seq`` the prefix cache can supply (0 without one)."""

    def free(self, seq: Sequence, reusable: bool = True) -> None:
        """Give back every block ``seq`` holds (a scheduler preempting a victim frees it at once)."""

    def num_free_tokens(self) -> int:
        """Token slots not held by any sequence (cached-but-unused blocks count as free)."""

    def num_slots(self, seq: Sequence) -> int:
        """Token slots ``seq`` holds: its block table's blocks times ``block_size`` (0 when it holds none).
        What freeing it returns, less its blocks that other sequences share through the prefix cache; a
        preempting scheduler compares victims with it."""


@dataclass(slots=True)
class ScheduleInput:
    """What a scheduler sees each step. ``waiting`` is in arrival order (preempted requests first)."""

    waiting: Seq[Sequence]
    running: Seq[Sequence]
    limits: SchedulerLimits
    kv: KVHandle
    now: float


@dataclass(slots=True)
class ScheduledSeq:
    """Run ``num_new_tokens`` of ``seq``'s not-yet-computed tokens this step."""

    seq: Sequence
    num_new_tokens: int


@dataclass(slots=True)
class SchedulerOutput:
    """A scheduler's decision for one step.

    ``scheduled`` sequences run (KV already allocated through ``ScheduleInput.kv``); ``preempted`` ones go
    back to the waiting queue and lose their KV (recomputed later); ``rejected`` ones fail with the reason.
    """

    scheduled: list[ScheduledSeq] = field(default_factory=list)
    preempted: list[Sequence] = field(default_factory=list)
    rejected: list[tuple[Sequence, str]] = field(default_factory=list)

    @property
    def num_scheduled_tokens(self) -> int:
        return sum(s.num_new_tokens for s in self.scheduled)


@dataclass(slots=True, frozen=True)
class KVLayers:
    """K/V layers a plugin's own model keeps in the pipeline's KV blocks (``kv_layers``): a draft model's.

    They share the target's block tables: token ``p`` of a sequence lives at the same row of these layers as of
    the target's, so the blocks a sequence holds carry both, are counted once and go back together."""

    owner: str          # the declaring plugin's name: its layers are ``KVPool.extra[owner]``
    num_layers: int
    num_kv_heads: int
    head_dim: int


@dataclass(slots=True, frozen=True)
class KVCacheSpec:
    """Shape of the KV cache a model needs; given to ``init_kv_cache``."""

    num_layers: int
    num_kv_heads: int
    head_dim: int
    dtype: torch.dtype
    device: torch.device
    max_model_len: int
    max_num_seqs: int
    extra: tuple[KVLayers, ...] = ()  # plugins' layers in the same blocks (``kv_layers``), in the same dtype

    @property
    def bytes_per_token(self) -> int:
        """K/V bytes one token slot holds, over the target's layers and every extra one."""
        elem = torch.empty((), dtype=self.dtype).element_size()
        shapes = [(self.num_layers, self.num_kv_heads, self.head_dim)]
        shapes += [(x.num_layers, x.num_kv_heads, x.head_dim) for x in self.extra]
        return sum(2 * layers * heads * dim * elem for layers, heads, dim in shapes)

    def allocate(self, num_blocks: int, block_size: int) -> "KVPool":
        """A zero-filled pool of ``num_blocks`` blocks: the target's layers and, in ``extra``, each declared set
        of layers over the same rows (what a KV plugin's ``init_kv_cache`` returns)."""
        def layers(count: int, heads: int, dim: int) -> list[torch.Tensor]:
            return [torch.zeros((num_blocks * block_size, heads, dim), dtype=self.dtype, device=self.device)
                    for _ in range(count)]

        extra = {x.owner: KVPool(layers(x.num_layers, x.num_kv_heads, x.head_dim),
                                 layers(x.num_layers, x.num_kv_heads, x.head_dim), block_size, num_blocks)
                 for x in self.extra}
        return KVPool(layers(self.num_layers, self.num_kv_heads, self.head_dim),
                      layers(self.num_layers, self.num_kv_heads, self.head_dim), block_size, num_blocks, extra)


@dataclass(slots=True)
class KVPool:
    """Preallocated K/V storage: per layer a tensor of ``[num_blocks * block_size, num_kv_heads, head_dim]``.

    Token ``p`` of a sequence with block table ``bt`` lives at row ``bt[p // block_size] * block_size +
    p % block_size``. Rows never written are zero, so masked reads stay finite. ``extra`` holds the layers
    plugins declared (``KVCacheSpec.extra``), by owner, over the same blocks and block tables.
    """

    k: list[torch.Tensor]
    v: list[torch.Tensor]
    block_size: int
    num_blocks: int
    extra: dict[str, "KVPool"] = field(default_factory=dict)

    @property
    def nbytes(self) -> int:
        """Bytes of every layer, the extra ones included."""
        own = sum(t.numel() * t.element_size() for t in self.k + self.v)
        return own + sum(pool.nbytes for pool in self.extra.values())


@dataclass(slots=True)
class KVAllocation:
    """``allocate_kv``'s answer: the sequence's whole block table after the allocation."""

    block_table: list[int]


@dataclass(slots=True)
class VerifyInput:
    """Logits for the positions that produce tokens this step, and the drafts they check.

    For sequence ``seqs[i]``, rows ``row_start[i] : row_start[i] + 1 + len(drafts[i])`` of ``logits`` are the
    target's distributions after the last accepted token and after each draft token in turn.
    ``parents[i]`` is not None for a draft tree (see :class:`tokenmill.speculation.Draft`): row
    ``row_start[i] + 1 + j`` is then the distribution after draft ``j`` and its ancestors, and the answer is
    the accepted path's tokens plus one.
    """

    seqs: list[Sequence]
    logits: torch.Tensor
    row_start: list[int]
    drafts: list[list[int]]
    parents: list[list[int] | None] = field(default_factory=list)

    def tree(self, i: int) -> list[int] | None:
        return self.parents[i] if self.parents else None

    def follows(self, i: int, k: int) -> list[int]:
        """The draft tokens that row ``row_start[i] + k`` comes after, beyond ``seqs[i].token_ids``: none for
        ``k == 0``, the first ``k`` drafts of a chain, or draft ``k - 1``'s path from the root of a tree."""
        drafts = self.drafts[i]
        parents = self.tree(i)
        if parents is None:
            return drafts[:k]
        path, node = [], k - 1
        while node >= 0:
            path.append(drafts[node])
            node = parents[node]
        return path[::-1]


@dataclass(slots=True)
class CalibrationContext:
    """The loaded float model before any layer is swapped (given once to ``calibrate``)."""

    model: object              # the transformers model as loaded; run it, leave its modules and weights as found
    tokenizer: object
    model_name: str
    device: torch.device
    dtype: torch.dtype
    progress: bool = False     # whether long passes may show a progress bar
    # the GGUF file the float weights were dequantized from (an alias or a ``.gguf`` model), else None: a
    # plugin can take the file's own quantized codes instead of quantizing the float weights again
    source_gguf: str | None = None


@dataclass(slots=True)
class PipelineContext:
    """What plugins may know about the built pipeline (given once to ``configure``)."""

    model: object              # the loaded (possibly quantized) transformers model; read it, never mutate it
    tokenizer: object
    model_name: str
    model_path: str
    device: torch.device
    dtype: torch.dtype
    limits: SchedulerLimits
    kv_spec: KVCacheSpec
    # the pipeline's KV pool: a sequence's first ``num_computed_tokens`` positions hold the target's K/V at the
    # rows its ``block_table`` gives (read them; a self-draft may write only the slots it reserved past those,
    # which the target overwrites); ``extra[owner]``: the layers a plugin declared through ``kv_layers``
    kv_pool: KVPool | None = None
    progress: bool = False     # whether the build may print what it prepares (False under --quiet)
    eos_token_ids: frozenset[int] = frozenset()  # the tokens that end a request (unless it ignores EOS)
    # ranks the model is split over (docs/distributed.md): above 1, ``model`` is rank 0's shard (its heads, MLP
    # columns and vocabulary rows), so a plugin that reuses the target's modules must refuse or cope
    tensor_parallel_size: int = 1
    # seconds of one forward of B sequences of W new tokens each (a logit row per token) on scratch KV, called
    # as time_forward(B, W); None where it cannot be timed (a compiled runner); for calibrating a cost model
    # inside ``configure`` only: afterwards it raises
    time_forward: Callable[[int, int], float | None] | None = None


@dataclass(slots=True)
class StepStats:
    """Measured facts about one finished engine step, for observers (``step_end``)."""

    step: int
    num_seqs: int
    num_prefill_tokens: int
    num_decode_tokens: int
    num_generated_tokens: int
    token_budget: int
    duration_s: float
    forward_s: float
    num_preempted: int
    num_running: int
    num_waiting: int
    num_draft_tokens: int = 0
    num_accepted_draft_tokens: int = 0
    num_forward_tokens: int = 0  # tokens the forward ran: every scheduled token plus every draft token (tree nodes)
