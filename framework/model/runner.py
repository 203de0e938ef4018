"""The model runner: embed -> the architecture's layers -> final norm -> head, one batched forward over the pool.

The architecture (:mod:`tokenmill.model.archs`) says what a layer is made of; the attention backend
(:mod:`tokenmill.model.attention`) builds its per-step metadata from the block tables and runs attention for
one layer; the runner writes each layer's new K/V into the pool and returns logits together with the final
hidden states of the same rows. The engine and the drafters use only the public methods below.
"""
from __future__ import annotations

import contextlib
import time
import types
from dataclasses import dataclass

import torch

from tokenmill.hooktypes import KVCacheSpec, KVPool
from tokenmill.model.archs import Layer, build_arch
from tokenmill.model.archs.base import attention_shape
from tokenmill.model.attention import AttentionLayout, backend_class
from tokenmill.model.batch import ForwardBatch, build_batch
from tokenmill.model.kernels.cpu_gemm import CHOICES
from tokenmill.model.shard import Shard
from tokenmill.spec import CPU_GEMM


@dataclass(slots=True)
class RunnerOutput:
    logits: torch.Tensor   # [R, vocab] float32, one row per ``logits_idx`` entry of the batch
    hidden: torch.Tensor   # [R, hidden] the final (normed) hidden states of the same rows


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


def _rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    rd = cos.shape[-1]
    if rd == x.shape[-1]:
        return x * cos + _rotate_half(x) * sin
    rot, rest = x[..., :rd], x[..., rd:]  # partial rotary (Phi-3 variants): the rest passes through
    return torch.cat((rot * cos + _rotate_half(rot) * sin, rest), dim=-1)


def _own_code(method):
    """``method`` (bound) over a copy of its function's code: dynamo keeps its compiled graphs and their guards per
    code object, so each runner gets a cache of its own, which no other runner's calls can reach."""
    fn = method.__func__
    clone = types.FunctionType(fn.__code__.replace(), fn.__globals__, fn.__name__, fn.__defaults__, fn.__closure__)
    return types.MethodType(clone, method.__self__)


def _input_guards(entries) -> list[bool]:
    """Guards to keep: those on the forward's arguments (shapes, dtypes, the attention metadata's structure).
    Guards on the runner itself (``self.*``: the layers, their weights, closures) and on globals are dropped:
    the model a runner closes over is fixed after build and, with :func:`_own_code`, no other runner shares its
    graphs; checking those ~600 guards cost ~1 ms per decode step."""
    return [not e.is_global and e.name.split(".")[0].split("[")[0] != "self" for e in entries]


def _compile_options(mode: str | None, device: torch.device, backend: str) -> dict:
    """torch.compile's options for the decode step: the ``mode``'s own (torch.compile takes a mode or options, not
    both), the guard filter, and on CPU a lower bar for inductor to store an elementwise result before the kernels
    that read it. Inductor's CPU default (a chain read from up to 12 buffers stays inline) recomputed the
    residual sum and the norm inside every output row of the one-row projections that read them. Stored once
    instead, a compiled batch-1 step of the default model measured (one process, six interleaved rounds, same
    tokens) 43.0 vs 33.9 tok/s in bf16 at 1 thread, 54.1 vs 48.3 at 2 threads, int8 65.6 vs 56.2 and fp32 32.1
    vs 30.4 at 1 thread.

    ``size_asserts`` off: the generated wrapper otherwise checks the size and stride of every graph input on
    every call, the weights included (551 checks a step for the default model, ~0.4 ms at batch 1). The weights
    are the runner's own and fixed; the per-step inputs keep dynamo's guards. Measured the same way, int8 at 1
    thread: 78.9 vs 76.3 tok/s."""
    import torch._inductor

    if backend != "inductor":  # the modes and the threshold are inductor's options
        return {"guard_filter_fn": _input_guards}
    options = dict(torch._inductor.list_mode_options(mode or "default"), guard_filter_fn=_input_guards,
                   size_asserts=False)
    if device.type == "cpu":
        options["realize_acc_reads_threshold"] = 2
    return options


class _TraceFlags:
    """Compiler settings that have to hold while dynamo traces a compiled step, so the runner sets them around
    every compiled call (any call may trace: a new shape) and restores them after; set and restored directly
    (~4 us a call, where ``config.patch`` costs ~25).

    * dynamo's ``install_free_tensors``, unless the runner compiles with ``dynamic: true``: the runner's weights
      become attributes of the graph instead of inputs that the code dynamo generates before each call gathers
      from the modules (~0.3 ms a step for the default model's 550 tensors; int8 batch 1 at 2 threads, one
      process, 60 alternating blocks of 10 calls: 9.85 -> 9.39 ms a step, same tokens). With it, the compiled
      ``self_int8`` draft, which compiles with ``dynamic: true``, computed wrong logits (max difference 3.55
      against its eager step on a tiny model) while the same draft compiled without matched (the target's graphs,
      whose key length is marked dynamic, match too); the cause was not found.
    * inductor's ``freezing``, where a module asks for it (:func:`_module_options`): the weights become
      constants of the graph (``torch.is_grad_enabled()`` is off here, which freezing also needs)."""

    __slots__ = ("_flags", "_saved")

    def __init__(self, *, freezing: bool, free_tensors: bool) -> None:
        import torch._dynamo.config
        import torch._inductor.config

        self._flags = [(torch._dynamo.config, "install_free_tensors", True)] if free_tensors else []
        if freezing:
            self._flags.append((torch._inductor.config, "freezing", True))
        self._saved: list = []

    def __enter__(self) -> None:
        self._saved = [(module, name, getattr(module, name)) for module, name, _ in self._flags]
        for module, name, value in self._flags:
            setattr(module, name, value)

    def __exit__(self, *exc) -> None:
        for module, name, value in self._saved:
            setattr(module, name, value)


def _module_options(model) -> dict:
    """The inductor options the model's modules ask their compiled forward to run under: a module's
    ``inductor_options`` mapping (e.g. int8 activations: ``freezing`` and the CPU GEMM template). ``freezing`` has to
    hold while dynamo traces as well, so the runner sets it around its compiled calls (:class:`_TraceFlags`); the
    rest are options."""
    options: dict = {}
    for module in model.modules():
        options.update(getattr(module, "inductor_options", None) or {})
    return options


class ModelRunner:
    """Runs any registered architecture on flattened batches over a paged KV pool."""

    def __init__(self, model, pool: KVPool, *, attention: str = "auto", compile_spec=None,
                 max_model_len: int | None = None, shard: Shard | None = None, cpu_gemm: str = "auto") -> None:
        if cpu_gemm not in CPU_GEMM:
            raise ValueError(f"unknown cpu_gemm {cpu_gemm!r}; allowed: {', '.join(CPU_GEMM)}")
        self.model = model
        self.config = model.config
        # dynamic-shape graphs keep quantized q/k/v and gate/up apart: traced with symbolic sizes, each layer's views
        # of a fused module's output took the self-draft's first compile from 85 s to 570 s (2 threads, AMD EPYC)
        dynamic = compile_spec is not None and compile_spec.enabled and compile_spec.dynamic
        self.arch = build_arch(model, shard, fuse_quantized=not dynamic)
        # cpu_gemm: packed -- float32 projections also kept in oneDNN's layout for steps of many rows
        self.packed_weight_bytes = self.arch.linear.pack() if cpu_gemm == "packed" else 0
        self.pool = pool
        param = next(model.parameters())
        self.device = param.device
        self.windows = tuple(dict.fromkeys(layer.attn.window for layer in self.arch.layers))
        self._window_of = [self.windows.index(layer.attn.window) for layer in self.arch.layers]
        compiled = compile_spec is not None and compile_spec.enabled
        max_len = max_model_len or getattr(self.config, "max_position_embeddings", 2048)
        self.layout = AttentionLayout(self.arch.num_heads, self.arch.num_kv_heads, self.arch.head_dim,
                                      pool.block_size, pool.num_blocks, max_len, self.device, pool.k[0].dtype,
                                      self.windows, compile_spec.kv_multiple if compiled else 0)
        self.attention = backend_class(attention, self.layout)(self.layout)
        # Compiled path: all-decode steps, padded to batch-size buckets, so a handful of graphs serve every
        # step (CUDA graphs under reduce-overhead). Prefill and mixed steps vary in shape and stay eager.
        self._compiled = None
        self.cpu_gemm: str | None = None  # the small-row GEMM path tune_cpu_gemm chose, if it ran
        self.decode_buckets: list[int] | None = None
        self._trace_flags: _TraceFlags | None = None  # set around the compiled calls (see _TraceFlags)
        if compiled:
            options = _compile_options(compile_spec.mode, self.device, compile_spec.backend)
            freezing = False
            if compile_spec.backend == "inductor":
                options.update(_module_options(model))
                freezing = bool(options.pop("freezing", False))
            self._trace_flags = _TraceFlags(freezing=freezing, free_tensors=not compile_spec.dynamic)
            self._compiled = torch.compile(_own_code(self._forward_impl), fullgraph=compile_spec.fullgraph,
                                           dynamic=compile_spec.dynamic, backend=compile_spec.backend, options=options)
            self.decode_buckets = list(compile_spec.buckets)

    @property
    def cpu_gemm_skinny_rows(self) -> int | None:
        """Up to how many rows a step's float32 projections run ``W @ x^T`` (None: no CPU float32 path)."""
        cpu = self.arch.linear.cpu
        return None if cpu is None else cpu.skinny_max_rows

    @property
    def compiled(self) -> bool:
        return self._compiled is not None

    @property
    def layers(self) -> list[Layer]:
        return self.arch.layers

    @staticmethod
    def kv_spec(model, *, dtype, device, max_model_len: int, max_num_seqs: int) -> KVCacheSpec:
        _, num_kv_heads, head_dim = attention_shape(model)
        return KVCacheSpec(model.config.num_hidden_layers, num_kv_heads, head_dim, dtype, device, max_model_len,
                           max_num_seqs)

    # ------------------------------------------------------------------ public API
    def batch(self, items: list[tuple[list[int], int, list[int], int]], *, trees: dict[int, list[int]] | None = None,
              max_padded_tokens: int = 1) -> ForwardBatch:
        """Lay out one step for this runner (see :func:`tokenmill.model.batch.build_batch` for ``items``)."""
        return build_batch(items, self.pool.block_size, decode_buckets=self.decode_buckets,
                           max_padded_tokens=max_padded_tokens, trees=trees)

    @torch.inference_mode()
    def forward(self, batch: ForwardBatch) -> RunnerOutput:
        """Write the new tokens' K/V into the pool; logits and final hidden states of ``batch.logits_idx``."""
        metas = tuple(self.attention.prepare(batch, w) for w in self.windows)
        impl = self._compiled if (self._compiled is not None and batch.decode_padded) else self._forward_impl
        dev = self.device
        with self._trace_flags if impl is self._compiled else contextlib.nullcontext():
            logits, hidden = impl(batch.input_ids.to(dev), batch.positions.to(dev), batch.slot_mapping.to(dev),
                                  batch.logits_idx.to(dev), metas, self.pool.k, self.pool.v)
        return RunnerOutput(logits, hidden)

    def run(self, items, *, trees: dict[int, list[int]] | None = None, max_padded_tokens: int = 1) -> RunnerOutput:
        """:meth:`batch` then :meth:`forward`."""
        return self.forward(self.batch(items, trees=trees, max_padded_tokens=max_padded_tokens))

    def warm_up(self, max_seqs: int, *, widths: tuple[int, ...] = (1,)) -> None:
        """Run the step shapes a decode loop will meet (every batch bucket up to ``max_seqs``, each width, at the
        context lengths the attention backend asks for and, compiled, at a second padded key length: the gather
        path marks the key length dynamic, so that length reuses the graph; a backend that does not would have
        dynamo recompile there once, into a graph for any length) once now, so compiling happens at build and not
        inside the first requests. Writes only slots that no sequence holds yet (the pool is fresh), each of which its
        owner overwrites before it is ever read."""
        sizes = [b for b in (self.decode_buckets or [1 << i for i in range(max_seqs.bit_length() + 1)])
                 if b <= max(max_seqs, 1)]
        for b in sizes:
            positions = self.attention.warm_up_positions(b)
            if self.compiled and self.layout.kv_multiple:  # a second key length: dynamo recompiles on the first new
                positions = tuple(dict.fromkeys((*positions, self.layout.kv_multiple)))  # shape, for every length
            for position in positions:
                blocks = list(range(-(-(position + max(widths)) // self.pool.block_size)))
                if len(blocks) > self.pool.num_blocks:
                    continue
                for width in widths:
                    self.run([([0] * width, position, blocks, 1)] * b, max_padded_tokens=max(widths))
        if self.compiled and sizes:  # a step mixing decodes and a prefill chunk runs eager: whatever the backend
            b, position = sizes[-1], self.attention.warm_up_positions(sizes[-1])[-1]  # compiles for it, now too
            blocks = list(range(-(-(position + 2) // self.pool.block_size)))
            if len(blocks) <= self.pool.num_blocks:
                self.run([([0], position, blocks, 1)] * b + [([0, 0], position, blocks, 1)])

    @torch.inference_mode()
    def time_forward(self, num_seqs: int, width: int, context: int = 256, runs: int = 3) -> float | None:
        """Seconds of one forward of ``num_seqs`` sequences of ``width`` new tokens each, after ``context``
        earlier positions (scratch K/V), a logit row for every new token: what a decode step verifying drafts
        computes. The median of ``runs`` timed runs after one that warms kernels up (one timing can be a third
        off on a busy machine, and a cost curve made monotone would carry a high one to every larger size).
        None for a compiled runner (a new shape would compile), a pool too small or sequences longer than
        ``max_model_len``. Like :meth:`warm_up` it writes only slots of the fresh pool, so it is for build
        time."""
        context = max(0, min(context, self.layout.max_model_len - width))
        blocks = list(range(-(-(context + width) // self.pool.block_size)))
        if self.compiled or width > self.layout.max_model_len or len(blocks) > self.pool.num_blocks:
            return None
        return self.time_run([([0] * width, context, blocks, width)] * num_seqs, runs=runs)

    @torch.inference_mode()
    def time_run(self, items, *, runs: int = 3, max_padded_tokens: int = 1) -> float:
        """Seconds of :meth:`run` on ``items``: the median of ``runs`` timed runs after an untimed one (which may
        compile or warm kernels). It writes the slots ``items`` name, so give it scratch ones."""
        self.run(items, max_padded_tokens=max_padded_tokens)
        times = []
        for _ in range(runs):
            t0 = time.perf_counter()
            self.run(items, max_padded_tokens=max_padded_tokens)
            times.append(time.perf_counter() - t0)
        return sorted(times)[runs // 2]

    def tune_cpu_gemm(self, steps: int = 5) -> str | None:
        """CPU fp32 only: time whole one-token decode steps through each small-row GEMM path (``W @ x^T`` with
        and without the padded row, oneDNN; :data:`tokenmill.model.kernels.cpu_gemm.CHOICES`), interleaved, and
        keep the fastest median for this machine (which wins differs between CPUs). Where that is a ``W @ x^T``
        path, it then finds the row count up to which it stays faster than oneDNN (:meth:`_tune_skinny_rows`).
        Returns the choice's name, or None where there is nothing to choose (no oneDNN, or every projection a
        quantized module: a quantized pipeline's build skips the timing), or where the decode steps are compiled
        (inductor cannot lower oneDNN's linear at one row, so a compiled runner keeps the default). Like
        :meth:`warm_up` it writes only slots of the fresh pool that their owner overwrites before reading."""
        cpu = self.arch.linear.cpu
        if cpu is None or cpu.onednn is None or self.compiled or not self.arch.linear.plain:
            return None
        times = self._time_settings(CHOICES, 1, steps)
        self.cpu_gemm = min(times, key=times.get)
        cpu.choose(self.cpu_gemm)
        if cpu.skinny_max_rows > 1:
            self._tune_skinny_rows(steps)
        return self.cpu_gemm

    def _tune_skinny_rows(self, steps: int) -> None:
        """Lower ``skinny_max_rows`` to the last row count (from 2 up) whose step ``W @ x^T`` runs faster than
        oneDNN. With packed weights (``cpu_gemm: packed``) oneDNN wins from 3 rows on the dev box (one-sequence
        steps at 300 positions, 2 threads: 3 rows 35.6 vs 42.2 ms, 4 rows 34.2 vs 41.4), which makes the short
        verifies of speculative decoding cheaper; with plain weights ``W @ x^T`` keeps every row up to 4."""
        cpu = self.arch.linear.cpu
        top, pad = cpu.skinny_max_rows, cpu.pad_rows
        for rows in range(2, top + 1):
            times = self._time_settings({"skinny": (rows, pad), "onednn": (rows - 1, pad)}, rows, steps)
            if times["onednn"] < times["skinny"]:
                cpu.skinny_max_rows = rows - 1
                return
        cpu.skinny_max_rows = top

    def _time_settings(self, settings: dict[str, tuple[int, tuple[int, ...]]], rows: int,
                       steps: int) -> dict[str, float]:
        """Median seconds of a one-sequence step of ``rows`` new tokens under each ``(skinny_max_rows, pad_rows)``
        setting: one untimed step each, then ``steps`` rounds interleaved."""
        cpu = self.arch.linear.cpu
        item = [([0] * rows, 0, list(range(-(-rows // self.pool.block_size))), rows)]
        times: dict[str, list[float]] = {name: [] for name in settings}
        for name in times:
            cpu.skinny_max_rows, cpu.pad_rows = settings[name]
            self.run(item)
        for _ in range(steps):
            for name, ts in times.items():
                cpu.skinny_max_rows, cpu.pad_rows = settings[name]
                t0 = time.perf_counter()
                self.run(item)
                ts.append(time.perf_counter() - t0)
        return {name: sorted(ts)[len(ts) // 2] for name, ts in times.items()}

    @torch.inference_mode()
    def move_kv(self, block_table: list[int], src: list[int], dst: list[int]) -> None:
        """Copy the K/V at positions ``src`` of a sequence to positions ``dst`` (in order, every layer): the
        accepted path of a draft tree moves to consecutive positions."""
        bs = self.pool.block_size

        def slots(positions):
            return torch.tensor([block_table[p // bs] * bs + p % bs for p in positions], device=self.device)

        s, d = slots(src), slots(dst)
        for cache in (*self.pool.k, *self.pool.v):
            cache.index_copy_(0, d, cache.index_select(0, s))

    def close(self) -> None:
        """Release what the runner holds beyond its tensors (a tensor-parallel runner: its worker ranks)."""

    # ------------------------------------------------------------------ the forward
    def _forward_impl(self, input_ids, positions, slot_mapping, logits_idx, metas, k_pool, v_pool):
        arch = self.arch
        n = input_ids.shape[0]
        hq, hk, d = arch.num_heads, arch.num_kv_heads, arch.head_dim
        h = arch.embed(input_ids)
        rope = arch.rope(h, positions)
        for i, layer in enumerate(arch.layers):
            x = layer.attn_in(h) if layer.attn_in is not None else h
            q, k, v = layer.qkv(x)
            if layer.q_norm is not None and not layer.qk_norm_per_head:
                q, k = layer.q_norm(q), layer.k_norm(k)
            q, k, v = q.view(n, hq, d), k.view(n, hk, d), v.reshape(n, hk, d)
            if layer.q_norm is not None and layer.qk_norm_per_head:
                q, k = layer.q_norm(q), layer.k_norm(k)
            cos, sin = rope[layer.rope]
            q, k = _rotary(q, cos, sin), _rotary(k, cos, sin)
            k_pool[i].index_copy_(0, slot_mapping, k)
            v_pool[i].index_copy_(0, slot_mapping, v)
            o = layer.o_proj(self.attention.forward(q, k_pool[i], v_pool[i], metas[self._window_of[i]], layer.attn))
            if layer.attn_out is not None:
                o = layer.attn_out(o)
            h = h + (o if layer.residual_scale == 1.0 else o * layer.residual_scale)
            x = layer.mlp_in(h) if layer.mlp_in is not None else h
            m = layer.mlp(x)
            if layer.mlp_out is not None:
                m = layer.mlp_out(m)
            h = h + (m if layer.residual_scale == 1.0 else m * layer.residual_scale)
        h = arch.final_norm(h.index_select(0, logits_idx))
        return arch.logits(h), h
