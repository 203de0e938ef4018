"""GPTQ: error-compensating weight quantization from calibration activations.

After Frantar et al. 2022 ("GPTQ: Accurate Post-Training Quantization for Generative Pre-trained
Transformers"). Round-to-nearest keeps each weight close to its code; GPTQ keeps each layer's *output* close:
for a linear layer ``y = x W^T`` with calibration inputs ``X [n, K]`` it minimizes ``||X W^T - X Q^T||^2``,
whose Hessian in each row of ``W`` is ``H = 2 X^T X / n``. Columns are quantized one at a time; a column's
rounding error, scaled by the inverse Hessian, is subtracted from the columns not yet quantized, so they absorb
it (the optimal-brain-surgeon update restricted to one column order). With the upper Cholesky factor ``U`` of
``H^-1`` the update for column ``j`` is ``W[:, j:] -= ((w_j - q_j) / U[j, j]) * U[j, j:]``; updates are applied
lazily per block of 128 columns (within the block at once, to the rest with one matrix product per block).

Grids with groups (int4 scale + zero per group, NF4 absmax per block, int8 absmax per row) fit a group's
constants when its first column is reached, from the group's *current* weights (already moved by the errors
of earlier columns), so the constants cover what is actually quantized. ``act_order`` quantizes columns in
order of decreasing ``H`` diagonal (the inputs with the most energy first); a group's constants are then fitted
when any of its columns comes first, from all its columns' current values (pending in-block updates included).

Calibration (:func:`gptq_model`): token sequences from ``pydoc_data.topics`` *after* the slice that
``tokenmill eval perplexity`` scores (see :func:`calibration_ids`), run through the model block by block. For each
decoder block its selected linears are taken in the order the block calls them, those reading the same input
(q/k/v, gate/up) together, sharing the ``X^T X`` product; with ``true_sequential`` (the default) each group's
Hessians come from a pass over every calibration sequence in which the layers before it are already quantized
(the pass stops after the group), otherwise all from one float pass. With ``sequential`` (the default) the
block's outputs are then recomputed with the quantized weights, so the next block is calibrated on the inputs it
will see.
"""
from __future__ import annotations

import contextlib
import time
import warnings
from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING, Protocol

import torch
import torch.nn.functional as F

from tokenmill.plugins.quant.base import pad_to

if TYPE_CHECKING:
    from tokenmill.plugins.quant.base import QuantLinear, QuantPlugin

LAZY_BLOCK = 128  # columns whose updates are applied together


# ------------------------------------------------------------------------------------------- options
@dataclass(slots=True)
class GPTQOptions:
    """The ``gptq:`` mapping of a quantization plugin (``gptq: true`` takes every default)."""

    samples: int = 32        # calibration sequences
    seq_len: int = 512       # tokens per sequence
    damp: float = 0.01       # added to H's diagonal, as a fraction of its mean
    act_order: bool = False  # quantize columns in order of decreasing H diagonal
    sequential: bool = True  # calibrate each block on the outputs of the already quantized blocks before it
    true_sequential: bool = True  # within a block, calibrate each layer on the outputs of the quantized layers
                                  # before it (q/k/v, then o, then gate/up, then down: one partial pass each)
    seed: int = 0            # which calibration sequences are drawn
    batch_size: int = 8      # sequences per forward in the calibration pass (memory, not results)

    def __post_init__(self) -> None:
        if self.samples < 1:
            raise ValueError(f"samples must be >= 1, got {self.samples}")
        if not 8 <= self.seq_len <= 8192:
            raise ValueError(f"seq_len must be between 8 and 8192, got {self.seq_len}")
        if not 0.0 < self.damp <= 1.0:
            raise ValueError(f"damp must be in (0, 1], got {self.damp}")
        if self.batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {self.batch_size}")


def gptq_settings(value) -> dict | None:
    """Validate a plugin's ``gptq`` option: null/false -> None (round to nearest), true -> the defaults, a
    mapping -> its settings over the defaults. Returns the full settings as a plain dict (what a checkpoint's
    manifest records and compares)."""
    from tokenmill.options import build_options

    if value is None or value is False:
        return None
    if value is True:
        value = {}
    if not isinstance(value, dict):
        raise ValueError(f"gptq must be true, false, null or a mapping of GPTQ settings, got {value!r}")
    try:
        return asdict(build_options(GPTQOptions, value, "gptq"))
    except ValueError as exc:
        raise ValueError(f"gptq: {str(exc).removeprefix('bad value for gptq: ')}") from None


# --------------------------------------------------------------------------------------------- grids
class Grid(Protocol):
    """A 4/8-bit format as GPTQ sees it: constants fitted per group of ``group_size`` columns of a row
    (None: the whole row), then one column at a time quantized against them."""

    group_size: int | None
    code_dtype: torch.dtype

    def fit(self, w: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """``w [N, m]`` (the group's current weights) -> per-row constants, each ``[N]`` float32."""

    def quantize(self, col: torch.Tensor, params: tuple[torch.Tensor, ...]) -> tuple[torch.Tensor, torch.Tensor]:
        """``col [N]`` -> (codes ``[N]`` in ``code_dtype``, their dequantized values ``[N]`` float32)."""


# ------------------------------------------------------------------------------------------ the solver
def inverse_hessian_factor(h: torch.Tensor, damp: float) -> torch.Tensor:
    """Upper Cholesky factor of ``(H + damp * mean(diag H) * I)^-1`` in float32 (computed in float64).

    When the dampened matrix is still not positive definite (rank-poor calibration), the dampening grows
    tenfold until it is, with a warning."""
    h = h.double()
    eye = torch.eye(h.shape[0], dtype=h.dtype, device=h.device)
    mean = h.diagonal().mean().clamp_min(1e-12)
    d = damp
    for _ in range(6):
        chol, info = torch.linalg.cholesky_ex(h + d * mean * eye)
        if info.item() == 0:
            inv = torch.cholesky_inverse(chol)
            u, info = torch.linalg.cholesky_ex(inv, upper=True)
            if info.item() == 0:
                if d != damp:
                    warnings.warn(f"gptq: the Hessian needed dampening {d:g} instead of {damp:g}", RuntimeWarning,
                                  stacklevel=3)
                return u.float()
        d *= 10
    raise RuntimeError("gptq: the Hessian is not positive definite even with heavy dampening")


@torch.no_grad()
def gptq_quantize(weight: torch.Tensor, hessian: torch.Tensor, grid: Grid, *, damp: float = 0.01,
                  act_order: bool = False, block: int = LAZY_BLOCK
                  ) -> tuple[torch.Tensor, list[torch.Tensor], torch.Tensor]:
    """Quantize ``weight [N, K]`` onto ``grid`` minimizing the output error under ``hessian [K, K]``.

    :return: (``codes [N, Kp]`` in ``grid.code_dtype``, the constants as ``[N, G]`` float32 tensors (one per
        kind the grid fits; ``G = Kp / group_size``), the dequantized weight ``[N, K]`` float32). ``Kp`` is K
        rounded up to the group size; padded columns hold code-of-zero values that meet zero activations.
    """
    n, k = weight.shape
    gs = grid.group_size or k
    kp = pad_to(k, gs)
    ngroups = kp // gs
    dev = weight.device
    w = F.pad(weight.detach().float(), (0, kp - k))
    h = F.pad(hessian.detach().float(), (0, kp - k, 0, kp - k))
    diag = h.diagonal()
    dead = diag <= 0  # padded columns and inputs that were always zero: no error to propagate to or from
    h[dead, dead] = 1.0
    w[:, k:] = 0.0
    if act_order:
        perm = torch.argsort(h.diagonal(), descending=True, stable=True)
        w = w[:, perm].contiguous()
        h = h[perm][:, perm]
    else:
        perm = torch.arange(kp, device=dev)
    u = inverse_hessian_factor(h, damp)
    position = torch.argsort(perm)  # original column -> position in processing order
    group_of = (perm // gs).tolist()
    members = [position[g * gs:min((g + 1) * gs, k)] for g in range(ngroups)]  # real columns, by position
    params: list[tuple[torch.Tensor, ...] | None] = [None] * ngroups
    codes = torch.empty(n, kp, dtype=grid.code_dtype, device=dev)
    with _one_thread(dev):
        _solve(w, u, grid, codes, params, group_of, members, block)
    codes = codes[:, position]
    deq = w[:, position][:, :k]
    stacked = [torch.stack([p[i] for p in params], dim=1) for i in range(len(params[0]))]
    return codes, stacked, deq


@contextlib.contextmanager
def _one_thread(device: torch.device):
    """The column loop is thousands of small ops: on a CPU, intra-op threads only add synchronization (and
    stall badly when another process holds a core), so it runs on one."""
    if device.type != "cpu":
        yield
        return
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def _solve(w, u, grid, codes, params, group_of, members, block) -> None:
    """The column loop of :func:`gptq_quantize` (in place on ``w``, ``codes``, ``params``)."""
    n, kp = w.shape
    dev = w.device
    for i1 in range(0, kp, block):
        i2 = min(i1 + block, kp)
        u_blk = u[i1:i2, i1:i2]
        err = torch.zeros(n, i2 - i1, device=dev)
        for j in range(i1, i2):
            g = group_of[j]
            if params[g] is None:
                pos = members[g]
                cur = w[:, pos]  # a copy; columns of later blocks still miss this block's pending updates
                later = pos >= i2
                if j > i1 and bool(later.any()):
                    cur[:, later] -= err[:, :j - i1] @ u[i1:j][:, pos[later]]
                params[g] = grid.fit(cur)
            col = w[:, j]
            c, v = grid.quantize(col, params[g])
            codes[:, j] = c
            e = err[:, j - i1]
            torch.sub(col, v, out=e).div_(u_blk[j - i1, j - i1])
            w[:, j:i2].addr_(e, u_blk[j - i1, j - i1:], alpha=-1.0)  # column j becomes v (up to rounding)
            col.copy_(v)
        if i2 < kp:
            w[:, i2:] -= err @ u[i1:i2, i2:]


def rtn_quantize(weight: torch.Tensor, grid: Grid) -> tuple[torch.Tensor, torch.Tensor]:
    """Round-to-nearest on ``grid`` (constants fitted from the weight itself): (codes, dequantized) — the
    baseline GPTQ is compared against in the tests."""
    n, k = weight.shape
    gs = grid.group_size or k
    kp = pad_to(k, gs)
    w = F.pad(weight.float(), (0, kp - k))
    codes = torch.empty(n, kp, dtype=grid.code_dtype)
    deq = torch.empty(n, kp)
    for g in range(kp // gs):
        p = grid.fit(w[:, g * gs:min((g + 1) * gs, k)])
        for j in range(g * gs, (g + 1) * gs):
            codes[:, j], deq[:, j] = grid.quantize(w[:, j], p)
    return codes, deq[:, :k]


# ------------------------------------------------------------------------------------- calibration data
def calibration_ids(tokenizer, samples: int, seq_len: int, seed: int = 0) -> torch.Tensor:
    """``[samples, seq_len]`` token ids from ``pydoc_data.topics`` past the evaluation slice.

    ``tokenmill eval perplexity`` scores the first ``HELDOUT_TOKENS + 1`` tokens of the same text; the rest is
    cut into consecutive ``seq_len``-token chunks and ``samples`` of them are drawn with ``seed``."""
    from tokenmill.evaluate import HELDOUT_TOKENS, heldout_text

    ids = tokenizer(heldout_text(), add_special_tokens=False)["input_ids"]
    start = HELDOUT_TOKENS + 1
    avail = max(len(ids) - start, 0)
    chunks = avail // seq_len
    if chunks < samples:
        raise ValueError(f"gptq: the calibration text (pydoc_data.topics after its first {start} tokens, which "
                         f"the perplexity evaluation scores) has {avail} tokens for this tokenizer: room for "
                         f"{chunks} sequences of {seq_len}; lower samples or seq_len")
    gen = torch.Generator().manual_seed(seed)
    pick = torch.randperm(chunks, generator=gen)[:samples].sort().values
    data = torch.tensor(ids[start:start + chunks * seq_len], dtype=torch.long).view(chunks, seq_len)
    return data[pick]


# ---------------------------------------------------------------------------------- the model-level pass
class _Stop(Exception):
    pass


class _LayerStats:
    """Per linear layer, from forward hooks: ``H = 2 X^T X / n`` over its inputs ``X``. Layers called on the
    very same input tensor (q/k/v, gate/up) share the product."""

    def __init__(self, linears: dict[str, torch.nn.Linear], stop_after: str | None = None) -> None:
        self.stop_after = stop_after  # raise _Stop once this layer has been seen: the rest of the block is not needed
        self.h = {name: torch.zeros(m.in_features, m.in_features, device=m.weight.device)
                  for name, m in linears.items()}
        self.count = {name: 0 for name in linears}
        self._cache: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
        self.handles = [m.register_forward_hook(self._hook(name)) for name, m in linears.items()]

    def _product(self, x: torch.Tensor) -> torch.Tensor:
        hit = self._cache.get(id(x))
        if hit is None or hit[0] is not x:
            xf = x.reshape(-1, x.shape[-1]).float()
            hit = (x, xf.t() @ xf)
            self._cache[id(x)] = hit
        return hit[1]

    def _hook(self, name: str):
        def hook(module, args, output):
            x = args[0]
            m = x.numel() // x.shape[-1]
            total = self.count[name] + m
            self.h[name].mul_(self.count[name] / total).add_(self._product(x), alpha=2.0 / total)
            self.count[name] = total
            if name == self.stop_after:
                raise _Stop
        return hook

    def end_batch(self) -> None:
        self._cache.clear()

    def remove(self) -> None:
        for hd in self.handles:
            hd.remove()
        self.end_batch()


def _call_groups(block, linears: dict[str, torch.nn.Linear], x: torch.Tensor, extra) -> list[list[str]]:
    """``linears`` in the order the block calls them, those called on the same input tensor grouped (q/k/v,
    gate/up): the order in which ``true_sequential`` quantizes them."""
    calls: list[tuple[str, int]] = []

    def hook(name):
        return lambda module, args, output: calls.append((name, id(args[0])))

    handles = [m.register_forward_hook(hook(name)) for name, m in linears.items()]
    try:
        block(x, *extra[0], **extra[1])
    finally:
        for hd in handles:
            hd.remove()
    groups: list[list[str]] = []
    prev = None
    for name, src in calls:
        if any(name in g for g in groups):
            continue
        if src == prev and groups:
            groups[-1].append(name)
        else:
            groups.append([name])
        prev = src
    missing = [name for name in linears if not any(name in g for g in groups)]
    return groups + ([missing] if missing else [])


def decoder_blocks(model) -> tuple[str, torch.nn.ModuleList]:
    """The qualified name and the ``ModuleList`` of the model's decoder blocks (``model.layers`` in the
    supported families)."""
    n_layers = getattr(model.config, "num_hidden_layers", None)
    for name, mod in model.named_modules():
        if isinstance(mod, torch.nn.ModuleList) and name.endswith("layers") and len(mod) == n_layers:
            return name, mod
    raise ValueError("gptq: cannot find the model's decoder blocks (a ModuleList 'layers' of "
                     f"num_hidden_layers={n_layers} modules)")


def _block_output(out):
    return out[0] if isinstance(out, (tuple, list)) else out


@torch.no_grad()
def _block_inputs(model, block, ids: torch.Tensor) -> tuple[torch.Tensor, dict]:
    """Run ``model`` on ``ids`` up to ``block`` and return the block's hidden-state input and keyword
    arguments (position embeddings, mask, ...)."""
    got: dict = {}

    def pre(module, args, kwargs):
        kwargs = dict(kwargs)
        got["x"] = args[0] if args else kwargs.pop("hidden_states")
        got["args"] = args[1:]
        got["kwargs"] = kwargs
        raise _Stop

    handle = block.register_forward_pre_hook(pre, with_kwargs=True)
    try:
        model(input_ids=ids, use_cache=False)
    except _Stop:
        pass
    finally:
        handle.remove()
    if "x" not in got:
        raise ValueError("gptq: the model's forward never reached its first decoder block")
    return got["x"], (got["args"], got["kwargs"])


@torch.no_grad()
def gptq_model(plugin: "QuantPlugin", model, tokenizer, settings: dict, *, progress: bool = False
               ) -> tuple[dict[str, "QuantLinear"], dict]:
    """Quantize every linear layer in the decoder blocks that ``plugin`` selects, with GPTQ.

    :return: (qualified name -> quantized module, a summary: settings, calibration tokens, seconds). The model
        is left as it was found (its weights are restored after each block).
    """
    from tqdm.auto import tqdm

    t0 = time.perf_counter()
    opts = GPTQOptions(**settings)
    prefix, blocks = decoder_blocks(model)
    device = next(model.parameters()).device
    ids = calibration_ids(tokenizer, opts.samples, opts.seq_len, opts.seed).to(device)
    batches = list(ids.split(opts.batch_size))
    xs, extras = [], []
    for b in batches:
        x, extra = _block_inputs(model, blocks[0], b)
        xs.append(x)
        extras.append(extra)
    prepared: dict[str, "QuantLinear"] = {}
    t_solve = 0.0
    for i, block in enumerate(tqdm(blocks, desc="gptq", unit="block", disable=not progress)):
        last = i + 1 == len(blocks)
        linears = {f"{prefix}.{i}.{n}": m for n, m in block.named_modules()
                   if isinstance(m, torch.nn.Linear) and plugin.wants(f"{prefix}.{i}.{n}", m)}
        groups = _call_groups(block, linears, xs[0], extras[0]) if opts.true_sequential else [list(linears)]
        saved: dict[str, torch.Tensor] = {}
        try:
            for group in groups:
                stats = _LayerStats({name: linears[name] for name in group}, stop_after=group[-1])
                try:
                    for x, (args, kw) in zip(xs, extras):
                        with contextlib.suppress(_Stop):
                            block(x, *args, **kw)
                        stats.end_batch()
                finally:
                    stats.remove()
                t1 = time.perf_counter()
                for name in group:
                    m = linears[name]
                    q = plugin.gptq_layer(m.weight.detach(), None if m.bias is None else m.bias.detach(),
                                          stats.h.pop(name), opts)
                    prepared[name] = q
                    if opts.sequential or opts.true_sequential:  # later layers see this one quantized
                        saved[name] = m.weight.detach().clone()
                        m.weight.copy_(q.dequantize(m.weight.dtype))
                t_solve += time.perf_counter() - t1
            if not last:  # the next block's inputs: this block's outputs, quantized (sequential) or float
                if not opts.sequential:
                    for name, w in saved.items():
                        linears[name].weight.copy_(w)
                    saved.clear()
                xs = [_block_output(block(x, *args, **kw)) for x, (args, kw) in zip(xs, extras)]
        finally:
            for name, w in saved.items():
                linears[name].weight.copy_(w)
    summary = {"method": "gptq", **settings, "tokens": int(ids.numel()), "layers": len(prepared),
               "text": "pydoc_data.topics after the perplexity slice", "seconds": round(time.perf_counter() - t0, 1),
               "solve_seconds": round(t_solve, 1)}
    return prepared, summary


def relative_output_error(weight: torch.Tensor, approx: torch.Tensor, x: torch.Tensor) -> float:
    """``||x W^T - x A^T|| / ||x W^T||``: how far a quantized weight moves a layer's outputs on inputs ``x``."""
    ref = x @ weight.float().t()
    return float((ref - x @ approx.float().t()).norm() / ref.norm().clamp_min(1e-12))


__all__ = ["GPTQOptions", "Grid", "calibration_ids", "decoder_blocks", "gptq_model", "gptq_quantize",
           "gptq_settings", "inverse_hessian_factor", "relative_output_error", "rtn_quantize"]
