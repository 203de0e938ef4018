"""Group-wise int8: int8 codes with one scale per ``group_size`` inputs of a row (GGUF's ``Q8_0`` at group 32).

``w = q * scale`` per group; the scales keep the dtype they come in (float16 for ``Q8_0``: exact). PyTorch's
int8 kernel (``_weight_int8pack_mm``) takes one scale per row only, so a few rows (decode) run a compiled
multiply-and-reduce over the codes (inductor fuses the int8->float conversion, the scales and the sums, and
never materializes the float weight: 2.6 ms for the default model's 49152 x 576 LM head at 2 threads), and
many rows dequantize to the compute dtype and use the dense GEMM.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from tokenmill.plugins.quant.base import QuantLinear, run_kernel

DEFAULT_KERNEL_MAX_ROWS = 8


def group_int8_matmul(x: torch.Tensor, q: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
    """``x [M, K]`` float32 times the ``[N, K]`` codes ``q`` with ``scales [N, G]`` -> ``[M, N]`` float32."""
    m, k = x.shape
    n, g = scales.shape
    xg = x.view(m, 1, g, k // g)
    return ((xg * q.view(1, n, g, k // g).float()).sum(-1) * scales.float()[None]).sum(-1)


class Int8GroupLinear(QuantLinear):
    kind = "int8_group"

    def __init__(self, q: torch.Tensor, scales: torch.Tensor, bias: torch.Tensor | None, *,
                 compute_dtype: torch.dtype, kernel_max_rows: int | None = None) -> None:
        """``q [N, K]`` int8 codes, ``scales [N, K / group_size]`` (any float dtype, kept as given)."""
        n, k = q.shape
        super().__init__(k, n, bias, compute_dtype)
        if scales.dim() != 2 or scales.shape[0] != n or k % scales.shape[1]:
            raise ValueError(f"int8_group: scales of shape {list(scales.shape)} do not fit codes {[n, k]}")
        self.group_size = k // scales.shape[1]
        self.register_buffer("qweight", q.to(torch.int8).contiguous())
        self.register_buffer("scales", scales.contiguous())
        self.kernel_max_rows = DEFAULT_KERNEL_MAX_ROWS if kernel_max_rows is None else kernel_max_rows

    def dequantize(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        n, k = self.qweight.shape
        w = self.qweight.view(n, -1, self.group_size).float() * self.scales.float()[..., None]
        return w.view(n, k).to(dtype)

    def rows(self, ids: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        flat = ids.reshape(-1)
        q = self.qweight.index_select(0, flat).view(flat.shape[0], -1, self.group_size).float()
        w = q * self.scales.index_select(0, flat).float()[..., None]
        return w.view(*ids.shape, self.in_features).to(dtype)

    def _matmul(self, x: torch.Tensor) -> torch.Tensor:
        m = x.shape[0]
        if 0 < m <= self.kernel_max_rows:
            return run_kernel(group_int8_matmul, ("int8_group", m) + tuple(self.qweight.shape), x.float(),
                              self.qweight, self.scales)
        cd = self.compute_dtype
        return F.linear(x.to(cd), self.dequantize(cd))

    def portable_state(self):
        meta = {"kind": self.kind, "in_features": self.in_features, "out_features": self.out_features,
                "group_size": self.group_size, "bias": self.bias is not None}
        tensors = {"qweight": self.qweight, "scales": self.scales}
        if self.bias is not None:
            tensors["bias"] = self.bias
        return meta, tensors

    @classmethod
    def from_portable(cls, meta, tensors, *, compute_dtype, device, kernel_max_rows=None, **_):
        return cls(tensors["qweight"].to(device), tensors["scales"].to(device),
                   tensors["bias"].to(device) if meta.get("bias") else None,
                   compute_dtype=compute_dtype, kernel_max_rows=kernel_max_rows)

    def extra_repr(self) -> str:
        return super().extra_repr() + f", group_size={self.group_size}"
