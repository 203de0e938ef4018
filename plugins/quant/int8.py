"""``int8``: weight-only int8 with one symmetric scale per output channel.

Fast path on CPU: ``torch.ops.aten._weight_int8pack_mm(x, w_int8, scales)`` (the activations cast to the
compute dtype; in torch 2.13 the CPU kernel is vectorized for bfloat16 only, float32 runs a scalar loop).
For many rows (prefill, large batches) the weight is converted to the compute dtype and multiplied with the
dense GEMM (bfloat16 uses AMX / AVX512-BF16 where the CPU has it), scales applied to the output.
The CPU kernel reads past the end of rows whose length is not a multiple of 32 (garbage or a crash in
torch 2.13), so such weights are stored zero-padded to a multiple of 32 columns and the activations padded
to match. One row of a compiled decode step runs a reduction over the codes instead, which inductor fuses
(:func:`tokenmill.model.kernels.cpu_gemm.compiled_gemv`: 5.5 ms for the default model's projections against
10.6 ms through the kernel). With ``activations: int8`` a compiled step's few-row products quantize the
activations too and run on VNNI (:mod:`tokenmill.plugins.quant.int8_act`).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F

from tokenmill.model.kernels.cpu_gemm import compiled_gemv
from tokenmill.plugin import hookimpl
from tokenmill.plugins.quant import int8_act
from tokenmill.plugins.quant.base import QuantLinear, pad_to, resolve_compute_dtype
from tokenmill.plugins.quant.quantizer import QuantOptions, QuantPlugin, is_head

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
                 compute_dtype: torch.dtype, kernel_max_rows: int | None = None, smooth: torch.Tensor | None = None,
                 outliers: torch.Tensor | None = None, splits: torch.Tensor | None = None) -> None:
        """``smooth`` (``[in_features]``): int8 activations (:mod:`~tokenmill.plugins.quant.int8_act`); the codes are
        of the weight with its columns multiplied by ``smooth``, and inputs are divided by it. ``outliers`` (sorted)
        and ``splits``: the loud input channels and into how many copies each enters the int8 product."""
        n, k = qweight.shape
        super().__init__(k, n, bias, compute_dtype)
        self.kp = pad_to(k, K_ALIGN)
        self.register_buffer("qweight", F.pad(qweight, (0, self.kp - k)).contiguous())
        self.register_buffer("scales", scales.float().contiguous())
        # the kernel wants scales in the activation dtype; kept (N values) rather than cast per call
        self.register_buffer("scales_c", self.scales.to(compute_dtype), persistent=False)
        self.kernel_max_rows = DEFAULT_KERNEL_MAX_ROWS if kernel_max_rows is None else kernel_max_rows
        self.use_kernel = qweight.device.type == "cpu"
        self.act = None
        if smooth is not None:
            outliers = torch.zeros(0, dtype=torch.long) if outliers is None else outliers
            splits = torch.ones_like(outliers) if splits is None else splits
            self.act = int8_act.ActInt8(self.qweight, self.scales, k, smooth, outliers, splits, self.kernel_max_rows)

    @classmethod
    def from_float(cls, weight: torch.Tensor, bias: torch.Tensor | None, *, compute_dtype: torch.dtype,
                   kernel_max_rows: int | None = None) -> "Int8Linear":
        q, scales = quantize_int8(weight)
        return cls(q, scales, bias, compute_dtype=compute_dtype, kernel_max_rows=kernel_max_rows)

    def dequantize(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        w = dequantize_int8(self.qweight[:, :self.in_features], self.scales)
        return (w if self.act is None else w / self.act.smooth).to(dtype)

    def rows(self, ids: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        flat = ids.reshape(-1)
        q = self.qweight.index_select(0, flat)[:, :self.in_features]
        w = q.to(dtype) * self.scales.index_select(0, flat).to(dtype)[:, None]
        if self.act is not None:
            w = w / self.act.smooth.to(dtype)
        return w.view(*ids.shape, self.in_features)

    def _matmul(self, x: torch.Tensor) -> torch.Tensor:
        cd = self.compute_dtype
        if self.act is not None:
            x = x.float() / self.act.smooth
            out = self.act.matmul(x, self.scales)
            if out is not None:
                return out
            x = self.act.fake_quantize(x)
        xc = x.to(cd)
        if self.kp != self.in_features:
            xc = F.pad(xc, (0, self.kp - self.in_features))
        if torch.compiler.is_compiling() and torch._inductor.config.freezing and cd != torch.float32 \
                and x.shape[0] <= self.kernel_max_rows:
            # frozen graph: inductor's weight-only int8 GEMM template (the float reduction's weight gets folded)
            return torch.ops.aten._weight_int8pack_mm(xc.contiguous(), self.qweight, self.scales_c)
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
        smooth = outliers = splits = None
        if self.act is not None:  # a column share keeps its channels' divisors and split channels, renumbered
            smooth, outliers, splits = self.act.smooth, self.act.outliers, self.act.splits
            if dim == 1:
                smooth = smooth[index]
                pos = torch.isin(index, outliers).nonzero()[:, 0]
                splits = splits[torch.searchsorted(outliers, index[pos])]  # (outliers are sorted)
                outliers = pos
        return Int8Linear(q, scales.clone(), bias, compute_dtype=self.compute_dtype,
                          kernel_max_rows=self.kernel_max_rows, smooth=smooth, outliers=outliers, splits=splits)

    def portable_state(self):
        meta = {"kind": self.kind, "in_features": self.in_features, "out_features": self.out_features,
                "bias": self.bias is not None}
        tensors = {"qweight": self.qweight[:, :self.in_features].contiguous(), "scales": self.scales}
        if self.act is not None:
            tensors.update(smooth=self.act.smooth, outliers=self.act.outliers, splits=self.act.splits)
        if self.bias is not None:
            tensors["bias"] = self.bias
        return meta, tensors

    @classmethod
    def from_portable(cls, meta, tensors, *, compute_dtype, device, kernel_max_rows=None, **_):
        return cls(tensors["qweight"].to(device), tensors["scales"].to(device),
                   tensors["bias"].to(device) if meta.get("bias") else None,
                   compute_dtype=compute_dtype, kernel_max_rows=kernel_max_rows,
                   smooth=tensors["smooth"].to(device) if "smooth" in tensors else None,
                   outliers=tensors["outliers"].to(device) if "outliers" in tensors else None,
                   splits=tensors["splits"].to(device) if "splits" in tensors else None)


class Int8(QuantPlugin):
    """Weight-only int8, symmetric per-output-channel scales (about 8.1 bits per weight)."""

    name = "int8"
    linear_cls = Int8Linear

    @dataclass(slots=True)
    class Options(QuantOptions):
        # float: weight-only. int8: also the activations of a compiled step's few-row products (W8A8 on VNNI,
        # calibrated at build; int8_act.py)
        activations: Literal["float", "int8"] = "float"
        smooth_alpha: float = 0.5   # int8 activations: SmoothQuant's migration strength (0: none)
        outlier_channels: int = 8   # int8 activations: loudest input channels per layer, split into copies

        def __post_init__(self) -> None:
            QuantOptions.__post_init__(self)
            if not 0 <= self.smooth_alpha <= 1:
                raise ValueError(f"smooth_alpha must be in [0, 1], got {self.smooth_alpha}")
            if self.outlier_channels < 0:
                raise ValueError(f"outlier_channels must be >= 0, got {self.outlier_channels}")
            if self.activations == "int8" and self.gptq:
                raise ValueError("activations: int8 calibrates its own smoothing of the float weights; it does not "
                                 "combine with gptq (drop one of them)")
            if self.activations == "int8" and not int8_act.available():
                raise ValueError("activations: int8 needs oneDNN's quantized linear (torch.ops.onednn."
                                 "qlinear_pointwise), which this PyTorch build lacks; use activations: float")

    def __init__(self, options=None) -> None:
        super().__init__(options)
        # int8 activations: each calibrated layer's input channel absmax, by its weight's storage
        self._act_amax: dict[int, torch.Tensor] = {}

    @hookimpl
    def calibrate(self, context) -> None:
        """With ``activations: int8``: every selected decoder layer's input channel absmax over calibration text
        (4 x 512 tokens of the text GPTQ calibrates on and a few chat requests), for the smoothing and the split
        channels."""
        if self.options.activations == "int8" and not self.options.load:
            from tokenmill.plugins.quant.calibration import calibration_ids

            # the LM head reads float activations: rounding them per row flipped the default model's first
            # answer token ("What is the capital of France?" -> "L'Etoile, ..." where float says "The capital ...")
            mods = {n: m for n, m in context.model.named_modules() if isinstance(m, torch.nn.Linear)
                    and self.wants(n, m) and not is_head(n)}
            samples = int8_act.calibration_samples(context.tokenizer, calibration_ids(context.tokenizer, 4, 512))
            amax = int8_act.activation_absmax(context.model, list(mods), samples)
            self._act_amax = {mods[n].weight.data_ptr(): a for n, a in amax.items()}
        QuantPlugin.calibrate(self, context)

    def gptq_grid(self, weight):
        return Int8Grid()

    def from_codes(self, codes, params, weight, bias):
        cd = resolve_compute_dtype(self.options.compute_dtype, weight.dtype, weight.device)
        return Int8Linear(codes, params[0][:, 0], bias, compute_dtype=cd, kernel_max_rows=self.options.kernel_max_rows)

    def quantize_weight(self, weight, bias, model_dtype):
        cd = resolve_compute_dtype(self.options.compute_dtype, model_dtype, weight.device)
        amax = self._act_amax.get(weight.data_ptr())
        if amax is None:
            return Int8Linear.from_float(weight, bias, compute_dtype=cd, kernel_max_rows=self.options.kernel_max_rows)
        smooth = int8_act.smoothing(amax, weight, self.options.smooth_alpha)
        q, scales = quantize_int8(weight.float() * smooth)
        outliers, splits = int8_act.outlier_channels(amax, smooth, self.options.outlier_channels)
        return Int8Linear(q, scales, bias, compute_dtype=cd, kernel_max_rows=self.options.kernel_max_rows,
                          smooth=smooth, outliers=outliers, splits=splits)
