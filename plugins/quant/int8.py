"""``int8``: weight-only int8 with one symmetric scale per output channel.

Fast path on CPU: ``torch.ops.aten._weight_int8pack_mm(x, w_int8, scales)`` (the activations cast to the
compute dtype; in torch 2.13 the CPU kernel is vectorized for bfloat16 only, float32 runs a scalar loop).
For many rows (prefill, large batches) the weight is converted to the compute dtype and multiplied with the
dense GEMM (bfloat16 uses AMX / AVX512-BF16 where the CPU has it), scales applied to the output.
The CPU kernel reads past the end of rows whose length is not a multiple of 32 (garbage or a crash in
torch 2.13), so such weights are stored zero-padded to a multiple of 32 columns and the activations padded
to match. One row of a compiled decode step runs a reduction over the codes instead, which inductor fuses
(:func:`tokenmill.model.kernels.cpu_gemm.compiled_gemv`: 5.5 ms for the default model's projections against
10.6 ms through the kernel).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from tokenmill.model.kernels.cpu_gemm import compiled_gemv
from tokenmill.plugins.quant.base import QuantLinear, pad_to, resolve_compute_dtype
from tokenmill.plugins.quant.quantizer import QuantOptions, QuantPlugin

DEFAULT_KERNEL_MAX_ROWS = 8
K_ALIGN = 32  # _weight_int8pack_mm needs rows of a multiple of 32 int8 values


def int8_scales(w: torch.Tensor) -> torch.Tensor:
    """One symmetric absmax scale per row of ``w [N, K]`` (1 for an all-zero row)."""
    amax = w.abs().amax(dim=1)
    return torch.where(amax > 0, amax / 127.0, torch.ones_like(amax))


def quantize_int8(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``w [N, K]`` float -> (``q`` int8 in [-127, 127], ``scales`` float32 [N]) with ``w ~= q * scales[:, None]``."""
    w = w.float()
    scales = int8_scales(w)
    q = torch.round(w / scales[:, None]).clamp_(-127, 127).to(torch.int8)
    return q, scales


class Int8Grid:
    """int8 for GPTQ: one absmax scale per row (fitted when the row's first column is reached), then
    ``round(w / scale)`` clamped to [-127, 127] per weight."""

    code_dtype = torch.int8
    group_size = None  # the whole row

    def fit(self, w: torch.Tensor) -> tuple[torch.Tensor]:
        return (int8_scales(w),)

    @staticmethod
    def levels(codes: torch.Tensor) -> torch.Tensor:
        """The value each code stands for, before the row scale (GPTQ's ``refit_scales``)."""
        return codes.float()

    @staticmethod
    def with_scales(scales: torch.Tensor) -> tuple[torch.Tensor]:
        return (scales,)

    def quantize(self, col: torch.Tensor, params) -> tuple[torch.Tensor, torch.Tensor]:
        (scale,) = params
        q = torch.round(col / scale).clamp_(-127, 127)
        return q.to(torch.int8), q * scale


def dequantize_int8(q: torch.Tensor, scales: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    return (q.float() * scales.float()[:, None]).to(dtype)


class Int8Linear(QuantLinear):
    kind = "int8"

    def __init__(self, qweight: torch.Tensor, scales: torch.Tensor, bias: torch.Tensor | None, *,
                 compute_dtype: torch.dtype, kernel_max_rows: int | None = None) -> None:
        n, k = qweight.shape
        super().__init__(k, n, bias, compute_dtype)
        self.kp = pad_to(k, K_ALIGN)
        self.register_buffer("qweight", F.pad(qweight, (0, self.kp - k)).contiguous())
        self.register_buffer("scales", scales.float().contiguous())
        # the kernel wants scales in the activation dtype; kept (N values) rather than cast per call
        self.register_buffer("scales_c", self.scales.to(compute_dtype), persistent=False)
        self.kernel_max_rows = DEFAULT_KERNEL_MAX_ROWS if kernel_max_rows is None else kernel_max_rows
        self.use_kernel = qweight.device.type == "cpu"

    @classmethod
    def from_float(cls, weight: torch.Tensor, bias: torch.Tensor | None, *, compute_dtype: torch.dtype,
                   kernel_max_rows: int | None = None) -> "Int8Linear":
        q, scales = quantize_int8(weight)
        return cls(q, scales, bias, compute_dtype=compute_dtype, kernel_max_rows=kernel_max_rows)

    def dequantize(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        return dequantize_int8(self.qweight[:, :self.in_features], self.scales, dtype)

    def rows(self, ids: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        flat = ids.reshape(-1)
        q = self.qweight.index_select(0, flat)[:, :self.in_features]
        w = q.to(dtype) * self.scales.index_select(0, flat).to(dtype)[:, None]
        return w.view(*ids.shape, self.in_features)

    def _matmul(self, x: torch.Tensor) -> torch.Tensor:
        cd = self.compute_dtype
        xc = x.to(cd)
        if self.kp != self.in_features:
            xc = F.pad(xc, (0, self.kp - self.in_features))
        out = compiled_gemv(xc, self.qweight)  # one row of a compiled step on CPU: a fused reduction over the codes
        if out is not None:
            return out * self.scales
        if self.use_kernel and x.shape[0] <= self.kernel_max_rows and cd != torch.float32:
            return torch.ops.aten._weight_int8pack_mm(xc.contiguous(), self.qweight, self.scales_c)
        # int8 values are exact in bf16/fp16/fp32; the scale is applied to the output
        return F.linear(xc, self.qweight.to(cd)) * self.scales_c

    def take(self, dim: int, index: torch.Tensor, keep_bias: bool = True) -> "Int8Linear":
        """A copy holding output rows (``dim`` 0) or input columns (``dim`` 1) ``index`` (tensor parallelism):
        each row keeps its scale, so a column share's partial sums add up to this layer's output."""
        q = self.qweight[:, :self.in_features].index_select(dim, index).clone()
        scales = self.scales[index] if dim == 0 else self.scales
        bias = None if self.bias is None else self.bias[index] if dim == 0 else self.bias if keep_bias else None
        return Int8Linear(q, scales.clone(), bias, compute_dtype=self.compute_dtype,
                          kernel_max_rows=self.kernel_max_rows)

    def portable_state(self):
        meta = {"kind": self.kind, "in_features": self.in_features, "out_features": self.out_features,
                "bias": self.bias is not None}
        tensors = {"qweight": self.qweight[:, :self.in_features].contiguous(), "scales": self.scales}
        if self.bias is not None:
            tensors["bias"] = self.bias
        return meta, tensors

    @classmethod
    def from_portable(cls, meta, tensors, *, compute_dtype, device, kernel_max_rows=None, **_):
        return cls(tensors["qweight"].to(device), tensors["scales"].to(device),
                   tensors["bias"].to(device) if meta.get("bias") else None,
                   compute_dtype=compute_dtype, kernel_max_rows=kernel_max_rows)


class Int8(QuantPlugin):
    """Weight-only int8, symmetric per-output-channel scales (about 8.1 bits per weight)."""

    name = "int8"
    linear_cls = Int8Linear

    @dataclass(slots=True)
    class Options(QuantOptions):
        pass

    def gptq_grid(self, weight):
        return Int8Grid()

    def from_codes(self, codes, params, weight, bias):
        cd = resolve_compute_dtype(self.options.compute_dtype, weight.dtype, weight.device)
        return Int8Linear(codes, params[0][:, 0], bias, compute_dtype=cd, kernel_max_rows=self.options.kernel_max_rows)

    def quantize_weight(self, weight, bias, model_dtype):
        cd = resolve_compute_dtype(self.options.compute_dtype, model_dtype, weight.device)
        return Int8Linear.from_float(weight, bias, compute_dtype=cd, kernel_max_rows=self.options.kernel_max_rows)
