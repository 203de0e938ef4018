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

The model-level calibration pass that feeds this solver is in :mod:`tokenmill.plugins.quant.calibration`.
"""
from __future__ import annotations

import contextlib
import warnings
from dataclasses import asdict, dataclass
from typing import Protocol

import torch
import torch.nn.functional as F

from tokenmill.plugins.quant.base import pad_to


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
    refit_scales: bool = False  # after the column loop, least-squares block scales for the chosen codes
                                # (scale-only grids: nf4, int8); see refit_scales()
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
                  act_order: bool = False, block: int = LAZY_BLOCK, refit: bool = False
                  ) -> tuple[torch.Tensor, list[torch.Tensor], torch.Tensor]:
    """Quantize ``weight [N, K]`` onto ``grid`` minimizing the output error under ``hessian [K, K]``.

    :return: (``codes [N, Kp]`` in ``grid.code_dtype``, the constants as ``[N, G]`` float32 tensors (one per
        kind the grid fits; ``G = Kp / group_size``), the dequantized weight ``[N, K]`` float32). ``Kp`` is K
        rounded up to the group size; padded columns hold code-of-zero values that meet zero activations.
        With ``refit`` the scales are then re-solved for the chosen codes (:func:`refit_scales`).
    """
    if refit and not hasattr(grid, "levels"):
        raise ValueError(f"gptq: refit_scales needs a scale-only grid (nf4, int8), not {type(grid).__name__}")
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
    h_original = h  # original column order (the solver permutes a copy and updates w in place)
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
    if refit:
        values = grid.levels(codes)
        scales = refit_scales(F.pad(weight.detach().float(), (0, kp - k)), h_original, values, gs, damp,
                              stacked[0])
        stacked = list(grid.with_scales(scales))
        deq = (values.view(n, ngroups, gs) * scales[..., None]).view(n, kp)[:, :k]
    return codes, stacked, deq


@torch.no_grad()
def refit_scales(weight: torch.Tensor, hessian: torch.Tensor, values: torch.Tensor, group_size: int,
                 damp: float, fallback: torch.Tensor) -> torch.Tensor:
    """Least-squares group scales for fixed codes.

    For a grid whose dequantized weight is ``scale[g] * level[j]`` (NF4 blocks, int8 rows), the scales that
    minimize a row's output error ``(w - s*l)^T H (w - s*l)`` once the codes are chosen solve the small system
    ``(L^T H L) s = L^T H w`` with ``L[j, g] = level[j]`` for ``j`` in group ``g``: one ``G x G`` solve per row.
    GPTQ's codes were picked against the groups' first-fit scales; refitting can only lower this objective
    (with ``H`` dampened as in the column loop).

    :param weight: ``[N, Kp]`` float weights (padded columns zero). :param hessian: ``[Kp, Kp]``.
    :param values: ``[N, Kp]`` the codes' levels. :param fallback: ``[N, G]`` scales kept for groups whose
        levels are all zero.
    :return: ``[N, G]`` float32 scales.
    """
    n, kp = weight.shape
    g = kp // group_size
    h = hessian.double()
    h = h + damp * h.diagonal().mean().clamp_min(1e-12) * torch.eye(kp, dtype=h.dtype, device=h.device)
    v = values.double().view(n, g, group_size)
    hv = torch.einsum("kgl,ngl->nkg", h.view(kp, g, group_size), v)             # H @ L per row: [N, Kp, G]
    m = torch.einsum("ngl,nglh->ngh", v, hv.view(n, g, group_size, g))          # L^T H L: [N, G, G]
    b = (v * (weight.double() @ h).view(n, g, group_size)).sum(-1)               # L^T H w: [N, G]
    empty = (v == 0).all(-1)                                                    # [N, G]
    eye = torch.eye(g, dtype=m.dtype, device=m.device)
    m = torch.where(empty[:, :, None] | empty[:, None, :], eye * empty[:, :, None], m)
    b = torch.where(empty, fallback.double(), b)
    scales, info = torch.linalg.solve_ex(m, b)
    bad = info != 0
    if bool(bad.any()):
        scales[bad] = fallback.double()[bad]
    return scales.float()


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


def relative_output_error(weight: torch.Tensor, approx: torch.Tensor, x: torch.Tensor) -> float:
    """``||x W^T - x A^T|| / ||x W^T||``: how far a quantized weight moves a layer's outputs on inputs ``x``."""
    ref = x @ weight.float().t()
    return float((ref - x @ approx.float().t()).norm() / ref.norm().clamp_min(1e-12))


__all__ = ["GPTQOptions", "Grid", "gptq_quantize", "gptq_settings", "inverse_hessian_factor", "refit_scales",
           "relative_output_error", "rtn_quantize"]
