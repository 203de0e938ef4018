"""``int4``: group-wise asymmetric 4-bit weights, two values per byte, a scale and a zero point per group.

Format: for each output row and each group of ``group_size`` inputs, ``w ~= (q - 8) * scale + zero`` with
``q`` in 0..15 (the convention of PyTorch's tinygemm-style kernels; ``zero = min + 8 * scale``). Scales and
zeros are stored in the compute dtype (bfloat16 by default: 4 bytes per group, 1 bit per weight at g32).

Kernels:
- CPU: ``aten._weight_int4pack_mm_for_cpu(x, packed, group_size, scales_and_zeros)`` on the layout made by
  ``aten._convert_weight_to_int4pack_for_cpu``. In torch 2.13 it requires ``N % 16 == 0``,
  ``K % group_size == 0``, ``group_size`` in {32, 64, 128, 256}; ``inner_k_tiles`` is accepted but unused on
  CPU; it runs float32, float16 and bfloat16 activations but only the bfloat16 path is vectorized on x86
  (AVX2/AVX512), so the activations are cast to bfloat16 around it. We pad N to 16 and K to the group size.
- CUDA: ``aten._weight_int4pack_mm`` on ``aten._convert_weight_to_int4pack`` tiles (bfloat16 activations).

The CPU layout depends on the CPU's vector width (blocks of 64 output rows on AVX512, 32 on AVX2, nibbles of
different rows interleaved within a block). We learn it once by probing the conversion op
(:class:`CpuInt4Layout`) and verify the inverse on every weight we pack, so the packed tensor is the only
copy in memory: rows for the embedding, the dense path for many rows, and saving all unpack from it.
Checkpoints store the portable layout (:func:`pack_int4`: row-major, low nibble = even column).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from tokenmill.plugins.quant.base import QuantLinear, pad_to, resolve_compute_dtype, run_kernel
from tokenmill.plugins.quant.quantizer import QuantOptions, QuantPlugin
from tokenmill.plugins.quant.int4_cpu_layout import CpuInt4Layout, cpu_layout, int4_dequant_cpu  # noqa: F401

GROUP_SIZES = (32, 64, 128, 256)
DEFAULT_KERNEL_MAX_ROWS = 16


# ---------------------------------------------------------------------------------------------- format
def int4_scale_zero(wmin: torch.Tensor, wmax: torch.Tensor, scale_dtype: torch.dtype
                    ) -> tuple[torch.Tensor, torch.Tensor]:
    """Min-max scale and zero point of a group (rounded to ``scale_dtype``, as stored; returned in float32):
    ``w ~= (q - 8) * scale + zero`` for ``q`` in 0..15."""
    scale = ((wmax - wmin) / 15.0).clamp_min(1e-8).to(scale_dtype).float()
    return scale, (wmin + 8.0 * scale).to(scale_dtype).float()


def quantize_int4(w: torch.Tensor, group_size: int, scale_dtype: torch.dtype = torch.bfloat16, *,
                  rows_per_chunk: int = 8192) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``w [N, K]`` -> (``q`` uint8 [N, Kp] in 0..15, ``scales`` [N, G], ``zeros`` [N, G]) in ``scale_dtype``.

    Min-max per group. ``Kp`` is K rounded up to the group size; padded columns quantize to whatever (they
    meet zero activations) and take no part in their group's range. Scales and zeros are rounded to
    ``scale_dtype`` before ``q`` is computed, so ``q`` is optimal for the stored parameters. (Shrinking the
    range to minimize squared error was measured worse in perplexity on the default model, so it is not done.)
    """
    n, k = w.shape
    kp = pad_to(k, group_size)
    g = kp // group_size
    q_out = torch.empty(n, kp, dtype=torch.uint8, device=w.device)
    s_out = torch.empty(n, g, dtype=scale_dtype, device=w.device)
    z_out = torch.empty(n, g, dtype=scale_dtype, device=w.device)
    for r0 in range(0, n, rows_per_chunk):
        wc = w[r0:r0 + rows_per_chunk].float()
        rows = wc.shape[0]
        wmin = F.pad(wc, (0, kp - k), value=float("inf")).view(rows, g, group_size).amin(-1)
        wmax = F.pad(wc, (0, kp - k), value=float("-inf")).view(rows, g, group_size).amax(-1)
        scale_s, zero_s = int4_scale_zero(wmin, wmax, scale_dtype)
        wp = F.pad(wc, (0, kp - k)).view(rows, g, group_size)
        q = torch.round((wp - zero_s[..., None]) / scale_s[..., None] + 8.0).clamp_(0, 15)
        q_out[r0:r0 + rows] = q.view(rows, kp).to(torch.uint8)
        s_out[r0:r0 + rows] = scale_s.to(scale_dtype)
        z_out[r0:r0 + rows] = zero_s.to(scale_dtype)
    return q_out, s_out, z_out


class Int4Grid:
    """int4 for GPTQ: min-max scale and zero of each group (rounded to ``scale_dtype``, as stored), then
    ``q = round((w - zero) / scale + 8)`` clamped to 0..15 per weight."""

    code_dtype = torch.uint8

    def __init__(self, group_size: int, scale_dtype: torch.dtype = torch.bfloat16) -> None:
        self.group_size = group_size
        self.scale_dtype = scale_dtype

    def fit(self, w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return int4_scale_zero(w.amin(1), w.amax(1), self.scale_dtype)

    def quantize(self, col: torch.Tensor, params) -> tuple[torch.Tensor, torch.Tensor]:
        scale, zero = params
        q = torch.round((col - zero) / scale + 8.0).clamp_(0, 15)
        return q.to(torch.uint8), (q - 8.0) * scale + zero


def dequantize_int4(q: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor, group_size: int,
                    dtype: torch.dtype = torch.float32) -> torch.Tensor:
    n, kp = q.shape
    qg = q.view(n, kp // group_size, group_size).float()
    w = (qg - 8.0) * scales.float()[..., None] + zeros.float()[..., None]
    return w.view(n, kp).to(dtype)


def pack_int4(q: torch.Tensor) -> torch.Tensor:
    """``q [N, K]`` (values 0..15, K even) -> ``[N, K/2]`` uint8, low nibble = even column."""
    q = q.to(torch.uint8)
    return q[:, 0::2] | (q[:, 1::2] << 4)


def unpack_int4(p: torch.Tensor) -> torch.Tensor:
    """Inverse of :func:`pack_int4`."""
    return torch.stack([p & 15, p >> 4], dim=-1).view(p.shape[0], p.shape[1] * 2)


# --------------------------------------------------------------------------------------------- module
class Int4Linear(QuantLinear):
    kind = "int4"

    def __init__(self, q: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor, bias: torch.Tensor | None, *,
                 in_features: int, out_features: int, group_size: int, compute_dtype: torch.dtype,
                 kernel_max_rows: int | None = None, compile_kernels: bool = True) -> None:
        """``q [N, Kp]`` values 0..15 (unpacked); ``scales``/``zeros`` ``[N, G]`` in their storage dtype."""
        super().__init__(in_features, out_features, bias, compute_dtype)
        if group_size not in GROUP_SIZES:
            raise ValueError(f"group_size must be one of {GROUP_SIZES}, got {group_size}")
        n, kp = q.shape
        self.group_size = group_size
        self.kp = kp
        self.np_ = pad_to(n, 16)
        self.kernel_max_rows = DEFAULT_KERNEL_MAX_ROWS if kernel_max_rows is None else kernel_max_rows
        self.compile_kernels = compile_kernels
        dev = q.device
        qp = F.pad(q, (0, 0, 0, self.np_ - n), value=8)  # padded rows dequantize to `zero` = 0
        sz = torch.stack([scales, zeros], dim=-1).transpose(0, 1)  # [G, N, 2]
        sz = F.pad(sz, (0, 0, 0, self.np_ - n))
        self.register_buffer("scales_and_zeros", sz.to(compute_dtype).contiguous())
        self.layout: CpuInt4Layout | None = None
        self.device_kind = dev.type
        if dev.type == "cpu":
            packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(qp.to(torch.int32).contiguous(), 2)
            try:
                layout = cpu_layout(self.np_, kp)
                ok = torch.equal(layout.unpack(packed), qp)
            except NotImplementedError:
                ok = False
            if ok:
                self.layout = layout
                self.register_buffer("packed", packed)
            else:  # unknown kernel layout: keep the portable copy as well (more memory, still correct)
                self.register_buffer("packed", packed)
                self.register_buffer("portable", pack_int4(qp))
        else:
            self.inner_k_tiles = 8 if kp % 128 == 0 else (4 if kp % 64 == 0 else 2)
            hi_first = ((qp[:, 0::2] << 4) | qp[:, 1::2]).to(torch.uint8)
            self.register_buffer("packed", torch.ops.aten._convert_weight_to_int4pack(hi_first.contiguous(),
                                                                                      self.inner_k_tiles))
            self.register_buffer("portable", pack_int4(qp))

    @classmethod
    def from_float(cls, weight, bias, *, group_size: int, compute_dtype: torch.dtype,
                   kernel_max_rows: int | None = None, compile_kernels: bool = True) -> "Int4Linear":
        n, k = weight.shape
        q, s, z = quantize_int4(weight, group_size, compute_dtype)
        return cls(q, s, z, bias, in_features=k, out_features=n, group_size=group_size,
                   compute_dtype=compute_dtype, kernel_max_rows=kernel_max_rows, compile_kernels=compile_kernels)

    # -- unpacking -----------------------------------------------------------------------------------
    def _q_padded(self) -> torch.Tensor:
        """``q [Np, Kp]`` uint8 (values 0..15)."""
        if self.layout is not None:
            return self.layout.unpack(self.packed)
        return unpack_int4(self.portable)

    def _q_rows(self, ids: torch.Tensor) -> torch.Tensor:
        if self.layout is not None:
            return self.layout.gather_rows(self.packed, ids)
        return unpack_int4(self.portable.index_select(0, ids))

    def _scale_zero(self) -> tuple[torch.Tensor, torch.Tensor]:
        sz = self.scales_and_zeros  # [G, Np, 2]
        return sz[..., 0].t(), sz[..., 1].t()  # [Np, G] each

    def _dequant_padded(self, dtype: torch.dtype) -> torch.Tensor:
        if self.layout is not None:
            return run_kernel(int4_dequant_cpu, ("int4", str(dtype), self.group_size) + self.layout.key,
                              self.packed, self.scales_and_zeros, self.layout, self.group_size, dtype,
                              compile=self.compile_kernels)
        s, z = self._scale_zero()
        return dequantize_int4(self._q_padded(), s, z, self.group_size, dtype)

    def dequantize(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        s, z = self._scale_zero()
        w = dequantize_int4(self._q_padded(), s, z, self.group_size, torch.float32)
        return w[:self.out_features, :self.in_features].to(dtype)

    def rows(self, ids: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        flat = ids.reshape(-1)
        g = self.group_size
        s, z = self._scale_zero()
        q = self._q_rows(flat).view(flat.shape[0], -1, g).float()  # [T, G, g]
        w = (q - 8.0) * s.index_select(0, flat).float()[..., None] + z.index_select(0, flat).float()[..., None]
        return w.view(flat.shape[0], self.kp)[:, :self.in_features].to(dtype).view(*ids.shape, self.in_features)

    # -- matmul --------------------------------------------------------------------------------------
    def _matmul(self, x: torch.Tensor) -> torch.Tensor:
        cd = self.compute_dtype
        xc = x.to(cd)
        if self.kp != self.in_features:
            xc = F.pad(xc, (0, self.kp - self.in_features))
        m = x.shape[0]
        if m <= self.kernel_max_rows and cd != torch.float32:
            if self.device_kind == "cpu":
                y = torch.ops.aten._weight_int4pack_mm_for_cpu(xc, self.packed, self.group_size,
                                                               self.scales_and_zeros)
            elif cd == torch.bfloat16:
                y = torch.ops.aten._weight_int4pack_mm(xc, self.packed, self.group_size, self.scales_and_zeros)
            else:
                y = F.linear(xc, self._dequant_padded(cd))
        else:
            y = F.linear(xc, self._dequant_padded(cd))
        return y[:, :self.out_features]

    @classmethod
    def fuse(cls, mods: list["Int4Linear"]) -> "Int4Linear | None":
        """q/k/v or gate/up as one CPU kernel call: the packed layout keeps blocks of output rows apart, so the
        parts' packed rows, stacked, are the packed form of their stacked codes (checked here, where a layout
        would not allow it the parts stay apart). The parts' ``packed`` become views of the fused one: no second
        copy. One model's worth of decode projections at one row (default model shapes, 1 / 2 threads, AMD
        EPYC): 6.74 / 4.42 ms as 210 calls, 6.45 / 3.88 ms as 120."""
        first = mods[0]
        same = all(type(m) is cls and m.layout is not None and m.np_ == m.out_features and m.kp == first.kp
                   and m.in_features == first.in_features and m.group_size == first.group_size
                   and m.compute_dtype == first.compute_dtype and m.kernel_max_rows == first.kernel_max_rows
                   and m.compile_kernels == first.compile_kernels and (m.bias is None) == (first.bias is None)
                   for m in mods)
        if len(mods) < 2 or not same:
            return None
        q = torch.cat([m._q_padded() for m in mods])
        scales, zeros = (torch.cat(parts) for parts in zip(*(m._scale_zero() for m in mods)))
        bias = None if first.bias is None else torch.cat([m.bias for m in mods])
        fused = cls(q, scales, zeros, bias, in_features=first.in_features, out_features=q.shape[0],
                    group_size=first.group_size, compute_dtype=first.compute_dtype,
                    kernel_max_rows=first.kernel_max_rows, compile_kernels=first.compile_kernels)
        if fused.layout is None or not torch.equal(fused.packed, torch.cat([m.packed for m in mods])):
            return None
        start = 0
        for m in mods:
            m._buffers["packed"] = fused.packed[start:start + m.out_features]
            start += m.out_features
        return fused

    # -- (de)serialization ---------------------------------------------------------------------------
    def portable_state(self):
        s, z = self._scale_zero()
        n = self.out_features
        meta = {"kind": self.kind, "in_features": self.in_features, "out_features": n,
                "group_size": self.group_size, "padded_in_features": self.kp, "bias": self.bias is not None}
        tensors = {"qweight": pack_int4(self._q_padded()[:n]).contiguous(), "scales": s[:n].contiguous(),
                   "zeros": z[:n].contiguous()}
        if self.bias is not None:
            tensors["bias"] = self.bias
        return meta, tensors

    @classmethod
    def from_portable(cls, meta, tensors, *, compute_dtype, device, kernel_max_rows=None, compile_kernels=True,
                      **_):
        q = unpack_int4(tensors["qweight"].to(device))
        return cls(q, tensors["scales"].to(device), tensors["zeros"].to(device),
                   tensors["bias"].to(device) if meta.get("bias") else None,
                   in_features=meta["in_features"], out_features=meta["out_features"],
                   group_size=meta["group_size"], compute_dtype=compute_dtype, kernel_max_rows=kernel_max_rows,
                   compile_kernels=compile_kernels)

    def extra_repr(self) -> str:
        return super().extra_repr() + f", group_size={self.group_size}"


class Int4(QuantPlugin):
    """Group-wise asymmetric int4 (about 4.5-5 bits per weight with bfloat16 scales and zeros)."""

    name = "int4"
    linear_cls = Int4Linear

    @dataclass(slots=True)
    class Options(QuantOptions):
        group_size: int = 64
        compile_kernels: bool = True  # torch.compile the unpack+dequantize of the many-rows path

        def __post_init__(self) -> None:
            QuantOptions.__post_init__(self)
            if self.group_size not in GROUP_SIZES:
                raise ValueError(f"group_size must be one of {', '.join(map(str, GROUP_SIZES))}, "
                                 f"got {self.group_size}")
            if self.gptq and self.gptq["refit_scales"]:
                raise ValueError("gptq: refit_scales is for scale-only grids (nf4, int8); int4 has zero points")

    def gptq_grid(self, weight):
        cd = resolve_compute_dtype(self.options.compute_dtype, weight.dtype, weight.device)
        return Int4Grid(self.options.group_size, cd)

    def from_codes(self, codes, params, weight, bias):
        cd = resolve_compute_dtype(self.options.compute_dtype, weight.dtype, weight.device)
        n, k = weight.shape
        scale, zero = params
        return Int4Linear(codes, scale.to(cd), zero.to(cd), bias, in_features=k, out_features=n,
                          group_size=self.options.group_size, compute_dtype=cd,
                          kernel_max_rows=self.options.kernel_max_rows, compile_kernels=self.options.compile_kernels)

    def quantize_weight(self, weight, bias, model_dtype):
        cd = resolve_compute_dtype(self.options.compute_dtype, model_dtype, weight.device)
        return Int4Linear.from_float(weight, bias, group_size=self.options.group_size, compute_dtype=cd,
                                     kernel_max_rows=self.options.kernel_max_rows,
                                     compile_kernels=self.options.compile_kernels)
