"""``nf4``: 4-bit NormalFloat (QLoRA) weights, absmax scaling per block, optional double quantization.

Codebook: 16 levels in [-1, 1] with an exact zero, 8 positive and 7 negative, placed at quantiles of the
standard normal (:func:`nf4_codebook` derives them; the test checks QLoRA's published values).
Each block of ``block_size`` consecutive inputs of a row (64 by default) is scaled by its absolute maximum.
With ``double_quant`` the float32 absmax constants are themselves quantized: minus their mean, symmetric
int8 with one float32 scale per block of 256 constants (0.127 instead of 0.5 bits per weight at block 64).

Packing (our own, portable): byte ``j`` of a block holds element ``j`` (low nibble) and ``j + block/2``
(high nibble), so a block dequantizes into two contiguous halves.

No PyTorch kernel multiplies by NF4 weights, so:
- few rows (decode, ``<= kernel_max_rows``): a ``torch.compile``d dequant+GEMV, one fused loop that reads the
  packed bytes and the absmax, maps nibbles to levels with a 4-level select tree (vectorizes, unlike a table
  gather) and accumulates ``x * w`` row by row; the dequantized weight never goes to memory;
- many rows (prefill, batches, perplexity): a compiled dequantize to the compute dtype, then the dense GEMM.
Without a working compiler both fall back to eager dequantize + ``F.linear``.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from tokenmill.plugins.quant.base import COMPILE_BROKEN, QuantLinear, pad_to, resolve_compute_dtype, run_kernel
from tokenmill.plugins.quant.quantizer import QuantOptions, QuantPlugin

DEFAULT_KERNEL_MAX_ROWS = 1  # the GEMV compiles per row count; more rows use compiled dequant + GEMM
DQ_BLOCK = 256  # double quantization: absmax constants per int8 block

NF4_QLORA = (-1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453, -0.28444138169288635,
             -0.18477343022823334, -0.09105003625154495, 0.0, 0.07958029955625534, 0.16093020141124725,
             0.24611230194568634, 0.33791524171829224, 0.44070982933044434, 0.5626170039176941,
             0.7229568362236023, 1.0)


def nf4_codebook() -> torch.Tensor:
    """The 16 NF4 levels, derived from normal quantiles (float32, ascending).

    As in QLoRA: the outermost quantile ``offset`` is the midpoint of ``1 - 1/(2*15)`` and ``1 - 1/(2*16)``;
    8 positive levels are the quantiles at ``linspace(offset, 0.5, 9)[:-1]``, 7 negative ones at
    ``linspace(offset, 0.5, 8)[:-1]`` (mirrored), plus an exact 0; all divided by the largest.
    """
    offset = 0.5 * ((1 - 1 / (2 * 15)) + (1 - 1 / (2 * 16)))
    pos = torch.special.ndtri(torch.linspace(offset, 0.5, 9, dtype=torch.float64)[:-1])
    neg = -torch.special.ndtri(torch.linspace(offset, 0.5, 8, dtype=torch.float64)[:-1])
    levels = torch.cat([neg, torch.zeros(1, dtype=torch.float64), pos]).sort().values
    return (levels / levels.abs().max()).float()


CODE = nf4_codebook()
_CODE_LIST = [float(v) for v in CODE]


# ---------------------------------------------------------------------------------------------- format
def quantize_nf4(w: torch.Tensor, block_size: int = 64) -> tuple[torch.Tensor, torch.Tensor]:
    """``w [N, K]`` -> (``q`` uint8 [N, Kp] in 0..15, ``absmax`` float32 [N, Kp/block]); Kp = K padded."""
    w = w.float()
    n, k = w.shape
    kp = pad_to(k, block_size)
    wb = F.pad(w, (0, kp - k)).view(n, kp // block_size, block_size)
    absmax = wb.abs().amax(-1)
    norm = wb / torch.where(absmax > 0, absmax, torch.ones_like(absmax))[..., None]
    mids = (CODE[1:] + CODE[:-1]) / 2
    q = torch.bucketize(norm.contiguous(), mids).to(torch.uint8)
    return q.view(n, kp), absmax


class NF4Grid:
    """NF4 for GPTQ: the absmax of each block of ``block_size`` columns (and its reciprocal), then the nearest
    level per weight."""

    code_dtype = torch.uint8

    def __init__(self, block_size: int) -> None:
        self.group_size = block_size
        self.code = CODE
        self.mids = (CODE[1:] + CODE[:-1]) / 2

    def fit(self, w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        absmax = w.abs().amax(1)
        return absmax, torch.where(absmax > 0, absmax, torch.ones_like(absmax)).reciprocal()

    def levels(self, codes: torch.Tensor) -> torch.Tensor:
        """The NF4 level of each code (what a block scale multiplies)."""
        return self.code.to(codes.device)[codes.long()]

    @staticmethod
    def with_scales(scales: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Refitted block scales ``[N, G]`` in :meth:`fit`'s (scale, reciprocal) form."""
        return scales, torch.where(scales != 0, scales, torch.ones_like(scales)).reciprocal()

    def quantize(self, col: torch.Tensor, params) -> tuple[torch.Tensor, torch.Tensor]:
        absmax, inv = params
        if self.mids.device != col.device:
            self.mids, self.code = self.mids.to(col.device), self.code.to(col.device)
        q = torch.bucketize(col * inv, self.mids)
        return q.to(torch.uint8), self.code[q] * absmax


def dequantize_nf4(q: torch.Tensor, absmax: torch.Tensor, block_size: int,
                   dtype: torch.dtype = torch.float32) -> torch.Tensor:
    n, kp = q.shape
    w = CODE.to(q.device)[q.long()].view(n, kp // block_size, block_size) * absmax.float()[..., None]
    return w.view(n, kp).to(dtype)


def double_quantize(absmax: torch.Tensor, block: int = DQ_BLOCK
                    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """float32 constants -> (int8 codes padded to a multiple of ``block``, float32 scale per block, mean).

    ``absmax ~= codes * scale[i // block] + mean`` with error at most ``scale / 2`` per constant, where
    ``scale = max |absmax - mean| / 127`` over the block.
    """
    flat = absmax.reshape(-1).float()
    mean = flat.mean()
    c = F.pad(flat - mean, (0, pad_to(flat.numel(), block) - flat.numel()))
    cb = c.view(-1, block)
    scale = (cb.abs().amax(-1) / 127.0).clamp_min(1e-12)
    codes = torch.round(cb / scale[:, None]).clamp_(-127, 127).to(torch.int8)
    return codes.view(-1), scale, mean.reshape(1)


def double_dequantize(codes: torch.Tensor, scale: torch.Tensor, mean: torch.Tensor, numel: int) -> torch.Tensor:
    return ((codes.view(scale.shape[0], -1).float() * scale[:, None]).view(-1)[:numel] + mean)


def pack_nf4(q: torch.Tensor, block_size: int) -> torch.Tensor:
    """``q [N, Kp]`` -> ``[N, Kp/2]`` uint8: in each block, byte j = element j (low) | element j+block/2 (high)."""
    n, kp = q.shape
    h = block_size // 2
    qb = q.to(torch.uint8).view(n, kp // block_size, 2, h)
    return (qb[:, :, 0] | (qb[:, :, 1] << 4)).reshape(n, kp // 2)


def unpack_nf4(p: torch.Tensor, block_size: int) -> torch.Tensor:
    n, half = p.shape
    pb = p.view(n, -1, block_size // 2)
    return torch.cat([pb & 15, pb >> 4], dim=-1).view(n, half * 2)


# --------------------------------------------------------------------------------------------- kernels
def _levels(q: torch.Tensor) -> torch.Tensor:
    """NF4 level of each code 0..15 through a 4-deep tree of selects on its bits (exact constants).

    Compiles to vector blends; a 16-entry table gather compiles to scalar loads on CPU. Works on int32 codes
    (uint8 masks would force slow mask conversions in the generated code). Run eagerly, a gather is faster.
    """
    if not torch.compiler.is_compiling():
        return CODE.to(q.device)[q.long()]
    q = q.to(torch.int32)
    bits = [(q & (1 << i)) != 0 for i in range(4)]
    level = [torch.where(bits[0], _CODE_LIST[2 * i + 1], _CODE_LIST[2 * i]) for i in range(8)]
    for b in bits[1:]:
        level = [torch.where(b, level[2 * i + 1], level[2 * i]) for i in range(len(level) // 2)]
    return level[0]


def _absmax(absmax_or_codes: torch.Tensor, dq_scale: torch.Tensor | None, dq_mean: torch.Tensor | None,
            n: int, kb: int) -> torch.Tensor:
    if dq_scale is None:
        return absmax_or_codes
    return double_dequantize(absmax_or_codes, dq_scale, dq_mean, n * kb).view(n, kb)


def nf4_gemv(x: torch.Tensor, packed: torch.Tensor, absmax: torch.Tensor, dq_scale: torch.Tensor | None,
             dq_mean: torch.Tensor | None, block_size: int) -> torch.Tensor:
    """``x [M, Kp]`` float32 times the NF4 weight, transposed -> ``[M, N]`` float32 (meant to run compiled).

    The weight is dequantized block by block inside the reduction (two halves of ``block/2`` per byte row),
    scaled by the block's absmax and multiplied into ``x``; nothing of ``[N, K]`` size is materialized.
    """
    n = packed.shape[0]
    m, kp = x.shape
    kb = kp // block_size
    h = block_size // 2
    a = _absmax(absmax, dq_scale, dq_mean, n, kb)
    p = packed.view(n, kb, h)
    w = torch.stack([_levels(p & 15), _levels(p >> 4)], dim=2) * a[:, :, None, None]  # [N, KB, 2, h]
    return (x.view(m, 1, kb, 2, h) * w[None]).sum((-1, -2, -3))


def nf4_dequant(packed: torch.Tensor, absmax: torch.Tensor, dq_scale: torch.Tensor | None,
                dq_mean: torch.Tensor | None, block_size: int, dtype: torch.dtype) -> torch.Tensor:
    """The NF4 weight as ``[N, Kp]`` in ``dtype`` (meant to run compiled: one pass over the packed bytes)."""
    n, half = packed.shape
    kb = half * 2 // block_size
    a = _absmax(absmax, dq_scale, dq_mean, n, kb)
    p = packed.view(n, kb, block_size // 2)
    w = torch.cat([_levels(p & 15), _levels(p >> 4)], dim=2) * a[:, :, None]
    return w.to(dtype).view(n, half * 2)


# --------------------------------------------------------------------------------------------- module
class NF4Linear(QuantLinear):
    kind = "nf4"

    def __init__(self, q: torch.Tensor, absmax: torch.Tensor, bias: torch.Tensor | None, *, in_features: int,
                 out_features: int, block_size: int, double_quant: bool, compute_dtype: torch.dtype,
                 kernel_max_rows: int | None = None, compile_kernels: bool = True,
                 dq: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None) -> None:
        """``q [N, Kp]`` codes 0..15 (unpacked); ``absmax [N, Kp/block]`` float32 (or ``dq`` given)."""
        super().__init__(in_features, out_features, bias, compute_dtype)
        n, kp = q.shape
        self.block_size = block_size
        self.kp = kp
        self.kb = kp // block_size
        self.double_quant = double_quant
        self.kernel_max_rows = DEFAULT_KERNEL_MAX_ROWS if kernel_max_rows is None else kernel_max_rows
        self.compile_kernels = compile_kernels
        self.register_buffer("packed", pack_nf4(q, block_size).contiguous())
        if double_quant:
            codes, scale, mean = dq if dq is not None else double_quantize(absmax)
            self.register_buffer("absmax_codes", codes.contiguous())
            self.register_buffer("absmax_scale", scale.float().contiguous())
            self.register_buffer("absmax_mean", mean.float().reshape(1))
        else:
            self.register_buffer("absmax", absmax.float().contiguous())

    @classmethod
    def from_float(cls, weight, bias, *, block_size: int, double_quant: bool, compute_dtype: torch.dtype,
                   kernel_max_rows: int | None = None, compile_kernels: bool = True) -> "NF4Linear":
        n, k = weight.shape
        q, absmax = quantize_nf4(weight, block_size)
        return cls(q, absmax, bias, in_features=k, out_features=n, block_size=block_size,
                   double_quant=double_quant, compute_dtype=compute_dtype, kernel_max_rows=kernel_max_rows,
                   compile_kernels=compile_kernels)

    # -- pieces --------------------------------------------------------------------------------------
    def _scale_args(self) -> tuple:
        if self.double_quant:
            return self.absmax_codes, self.absmax_scale, self.absmax_mean
        return self.absmax, None, None

    def absmax_values(self) -> torch.Tensor:
        """The (dequantized) absmax constants ``[N, Kp/block]`` float32."""
        a, s, m = self._scale_args()
        return _absmax(a, s, m, self.out_features, self.kb)

    def codes(self) -> torch.Tensor:
        return unpack_nf4(self.packed, self.block_size)

    def dequantize(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        w = dequantize_nf4(self.codes(), self.absmax_values(), self.block_size, torch.float32)
        return w[:, :self.in_features].to(dtype)

    def _absmax_rows(self, rows: torch.Tensor) -> torch.Tensor:
        if not self.double_quant:
            return self.absmax.index_select(0, rows)
        idx = (rows[:, None] * self.kb + torch.arange(self.kb, device=rows.device)).reshape(-1)
        a = (self.absmax_codes.index_select(0, idx).float() * self.absmax_scale.index_select(0, idx // DQ_BLOCK)
             + self.absmax_mean)
        return a.view(rows.shape[0], self.kb)

    def rows(self, ids: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        flat = ids.reshape(-1)
        q = unpack_nf4(self.packed.index_select(0, flat), self.block_size)
        w = dequantize_nf4(q, self._absmax_rows(flat), self.block_size, torch.float32)
        return w[:, :self.in_features].to(dtype).view(*ids.shape, self.in_features)

    def _run(self, fn, key: tuple, *args):
        return run_kernel(fn, key, *args, compile=self.compile_kernels)

    def _matmul(self, x: torch.Tensor) -> torch.Tensor:
        m = x.shape[0]
        pad = self.kp - self.in_features
        a, s, mean = self._scale_args()
        if m <= self.kernel_max_rows and self.compile_kernels and not COMPILE_BROKEN:
            xf = x.float()
            if pad:
                xf = F.pad(xf, (0, pad))
            return self._run(nf4_gemv, ("gemv", self.out_features, self.kp, self.block_size,
                                        self.double_quant, m), xf, self.packed, a, s, mean, self.block_size)
        cd = self.compute_dtype
        w = self._run(nf4_dequant, ("deq", self.out_features, self.kp, self.block_size, self.double_quant,
                                    str(cd)), self.packed, a, s, mean, self.block_size, cd)
        xc = x.to(cd)
        if pad:
            xc = F.pad(xc, (0, pad))
        return F.linear(xc, w)

    # -- (de)serialization ---------------------------------------------------------------------------
    def portable_state(self):
        meta = {"kind": self.kind, "in_features": self.in_features, "out_features": self.out_features,
                "block_size": self.block_size, "double_quant": self.double_quant,
                "padded_in_features": self.kp, "bias": self.bias is not None}
        tensors = {"packed": self.packed}
        if self.double_quant:
            tensors.update(absmax_codes=self.absmax_codes, absmax_scale=self.absmax_scale,
                           absmax_mean=self.absmax_mean)
        else:
            tensors["absmax"] = self.absmax
        if self.bias is not None:
            tensors["bias"] = self.bias
        return meta, tensors

    @classmethod
    def from_portable(cls, meta, tensors, *, compute_dtype, device, kernel_max_rows=None, compile_kernels=True,
                      **_):
        t = {k: v.to(device) for k, v in tensors.items()}
        q = unpack_nf4(t["packed"], meta["block_size"])
        dq = (t["absmax_codes"], t["absmax_scale"], t["absmax_mean"]) if meta["double_quant"] else None
        return cls(q, t.get("absmax"), t.get("bias") if meta.get("bias") else None,
                   in_features=meta["in_features"], out_features=meta["out_features"],
                   block_size=meta["block_size"], double_quant=meta["double_quant"], compute_dtype=compute_dtype,
                   kernel_max_rows=kernel_max_rows, compile_kernels=compile_kernels, dq=dq)

    def extra_repr(self) -> str:
        return super().extra_repr() + f", block_size={self.block_size}, double_quant={self.double_quant}"


class NF4(QuantPlugin):
    """NF4 with absmax per block (64) and optional double quantization (about 4.13-4.5 bits per weight)."""

    name = "nf4"
    linear_cls = NF4Linear

    @dataclass(slots=True)
    class Options(QuantOptions):
        block_size: int = 64
        double_quant: bool = True
        compile_kernels: bool = True  # torch.compile the dequant(+GEMV) kernels; false: eager dequantize

        def __post_init__(self) -> None:
            QuantOptions.__post_init__(self)
            if self.block_size < 2 or self.block_size & (self.block_size - 1) or self.block_size > 4096:
                raise ValueError(f"block_size must be a power of two between 2 and 4096, got {self.block_size}")

    def gptq_grid(self, weight):
        return NF4Grid(self.options.block_size)

    def from_codes(self, codes, params, weight, bias):
        cd = resolve_compute_dtype(self.options.compute_dtype, weight.dtype, weight.device)
        n, k = weight.shape
        return NF4Linear(codes, params[0], bias, in_features=k, out_features=n, block_size=self.options.block_size,
                         double_quant=self.options.double_quant, compute_dtype=cd,
                         kernel_max_rows=self.options.kernel_max_rows, compile_kernels=self.options.compile_kernels)

    def quantize_weight(self, weight, bias, model_dtype):
        cd = resolve_compute_dtype(self.options.compute_dtype, model_dtype, weight.device)
        return NF4Linear.from_float(weight, bias, block_size=self.options.block_size,
                                    double_quant=self.options.double_quant, compute_dtype=cd,
                                    kernel_max_rows=self.options.kernel_max_rows,
                                    compile_kernels=self.options.compile_kernels)
