"""Which kernel runs a float32 ``F.linear`` on CPU, by row count.

PyTorch's CPU ``F.linear`` calls MKL's sgemm. Measured on the dev box (2 threads, an AMD EPYC with AVX-512,
the default model's weight shapes, one full model's worth of GEMMs per call; see docs/architecture.md):

============  ==================  ===========================  ==============================
rows          ``F.linear`` (MKL)  ``W @ x^T`` (MKL, row-major)  oneDNN ``_linear_pointwise``
============  ==================  ===========================  ==============================
1             29.8 ms             12.5 ms (one row padded)      15.7 ms
4             43.3 ms             14.5 ms                       20.0 ms
8             46.0 ms             31.4 ms                       22.4 ms
17            64.8 ms             61.4 ms                       27.6 ms
370           494 ms              571 ms                        243 ms
============  ==================  ===========================  ==============================

So up to :data:`SKINNY_MAX_ROWS` rows we compute ``W @ x^T`` (a tall-skinny GEMM that streams the weight
once; 1 and 3 rows are padded by one, which MKL runs faster: 3 rows cost 18.0 ms, 4 rows 14.5), above that
oneDNN's fp32 matmul (AVX-512 on any vendor's CPU) when this build has it, else ``F.linear``. All three agree with ``F.linear`` to float32 rounding (tests/model/test_cpu_gemm.py).

The best small-row path differs between CPUs: on an Intel Xeon (2 threads) a one-token decode step ran at
13.5 tok/s through ``W @ x^T`` with the row padded, 15.1 through oneDNN and 22.2 through ``W @ x^T`` without
the padding (there MKL's one-row case is the fast one). So ``skinny_max_rows`` and ``pad_rows`` are per
instance, and the model runner measures the three choices (:data:`CHOICES`) on whole decode steps at build
(:meth:`tokenmill.model.runner.ModelRunner.tune_cpu_gemm`) and keeps the fastest.

With ``cpu_gemm: packed`` (a pipeline key) the runner also keeps each projection's weight in oneDNN's blocked
layout (:meth:`CpuLinear.pack`; one more copy of the float32 projections) and the rows above the small-row path
read that copy. A model's worth of projections (the default model's shapes, weights cold, 2 threads, AMD EPYC):
8 rows 32.8 -> 22.4 ms, 16 rows 40.4 -> 28.4 ms, 64 rows 90.6 -> 74.9 ms; the same values bit for bit.

Inside a compiled decode step (``compile: enabled``) one row goes through :func:`compiled_gemv` instead: a product
and a sum over the input dimension, which inductor turns into one vectorized loop per output row that streams the
weight once in its own dtype (bf16, int8), reading the normed input that the runner's compile options have it store
first (``tokenmill.model.runner._compile_options``). One model's worth of one-row projections
(the default model's shapes, 2 threads, AMD EPYC): bf16 22.3 ms through ``F.linear`` / oneDNN, 9.9 ms as the
compiled reduction; int8 weights 10.6 ms through ``_weight_int8pack_mm``, 5.5 ms; fp32 48.7 ms through inductor's
``mm``, 20.4 ms.

A bf16 weight is read as int32 words holding two weights each: masking off a word's low half leaves the high weight
as a float32, shifting the word up 16 bits gives the low one, both in-lane integer ops, where widening bf16 to
float32 (a zero-extension across the vector, then a shift) costs Zen 4 two double-pumped ops per 16 weights. The
input is split into its even and odd elements once per projection. Default model bf16, bare compiled steps in one
process (AMD EPYC): 17.65 -> 14.70 ms at 1 thread; at 2 threads, where the weights stream at the memory's rate
either way, 10.90 -> 11.21 ms and 80.1 -> 73.7 tok/s in requests (each layer's kernel splits in three, ~60 more
kernel calls and 121 dtype views: ~0.9 ms more of the wrapper's Python), so the model layer asks for it
(``bf16_pairs``) only when it is built to run on one thread.
"""
from __future__ import annotations

import sys

import torch
import torch.nn.functional as F

SKINNY_MAX_ROWS = 4
PACK_ROWS = 64  # the row count packed weights are laid out for (cpu_gemm: packed)
PAD_ROWS = (1, 3)  # row counts MKL runs slower than one more row (1 row 2x, 3 rows 1.25x): padded by a row
# the small-row paths the runner chooses between: name -> (skinny_max_rows, pad_rows)
CHOICES: dict[str, tuple[int, tuple[int, ...]]] = {"skinny": (SKINNY_MAX_ROWS, PAD_ROWS),
                                                   "skinny-unpadded": (SKINNY_MAX_ROWS, ()), "onednn": (0, ())}


def _onednn_op():
    """oneDNN's fp32 linear (``torch.ops.mkldnn._linear_pointwise``) if this build has it and it gives
    ``F.linear``'s values on a probe; else None."""
    if not torch.backends.mkldnn.is_available():
        return None
    op = getattr(torch.ops.mkldnn, "_linear_pointwise", None)
    if op is None:
        return None
    try:
        g = torch.Generator().manual_seed(0)
        x, w, b = (torch.randn(8, 24, generator=g), torch.randn(40, 24, generator=g),
                   torch.randn(40, generator=g))
        with torch.inference_mode():
            ok = torch.allclose(op(x, w, b, "none", [], ""), F.linear(x, w, b), rtol=1e-4, atol=1e-4)
    except (RuntimeError, TypeError):
        return None
    return op if ok else None


class CpuLinear:
    """``F.linear`` for 2-D float32 inputs on CPU, dispatched by row count (module docstring)."""

    def __init__(self, *, onednn: bool = True) -> None:
        self.onednn = _onednn_op() if onednn else None
        self.skinny_max_rows = SKINNY_MAX_ROWS  # 0: oneDNN (or F.linear) at every row count
        self.pad_rows = PAD_ROWS  # row counts of the skinny path computed with one more (copied) row

    def choose(self, name: str) -> None:
        """Take one of :data:`CHOICES`."""
        self.skinny_max_rows, self.pad_rows = CHOICES[name]

    @property
    def backend(self) -> str:
        return "onednn" if self.onednn is not None else "mkl"

    def pack(self, weight: torch.Tensor) -> torch.Tensor | None:
        """``weight`` in oneDNN's blocked layout (a copy; :data:`PACK_ROWS` is the row count it is laid out for),
        or None without oneDNN."""
        if self.onednn is None:
            return None
        return torch.ops.mkldnn._reorder_linear_weight(weight, PACK_ROWS)

    def __call__(self, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                 packed: torch.Tensor | None = None) -> torch.Tensor:
        """``packed``: ``weight`` as :meth:`pack` laid it out, used above the small-row path."""
        m = x.shape[0]
        if 0 < m <= self.skinny_max_rows:
            xs = torch.cat([x, x[:1]]) if m in self.pad_rows else x
            out = torch.mm(weight, xs.t()).t()[:m].contiguous()
            return out if bias is None else out + bias
        # traced by torch.compile, inductor's own mm: it lowers no oneDNN linear on a plain weight
        if self.onednn is not None and m > 0 and not torch.compiler.is_compiling():
            return self.onednn(x, weight if packed is None else packed, bias, "none", [], "")
        return F.linear(x, weight, bias)


def compiled_gemv(x: torch.Tensor, weight: torch.Tensor, *, bf16_pairs: bool = False) -> torch.Tensor | None:
    """``x @ weight.T`` in float32 for one row on CPU while torch.compile traces (module docstring); None elsewhere,
    where the caller's own kernel is the faster one. ``weight`` may be float, bf16 or int8 codes (the caller
    applies their scales to the result). ``bf16_pairs``: read a bf16 weight as int32 pairs (module docstring)."""
    if x.shape[0] != 1 or x.device.type != "cpu" or not torch.compiler.is_compiling():
        return None
    if weight.dtype == torch.int8 and torch._inductor.config.freezing:
        # frozen, an int8 -> float32 convert of a weight is constant-folded into a float32 copy (the default model's
        # int8 head: 4.3 ms a step instead of 2.2); inductor keeps int8 -> bfloat16 (exact for int8) in the loop
        weight = weight.to(torch.bfloat16)
    if bf16_pairs and _bf16_pairs(weight):
        # two bf16 weights read as one int32 word: the high one is a float32 once the low half is masked off, the low
        # one once shifted up 16 bits; two in-lane ops per 32 weights where widening converts take four (module
        # docstring). The input is split into its even and odd elements to match.
        w32 = weight.view(torch.int32)
        xf = x.float()[0]
        x2 = torch.stack([xf[0::2], xf[1::2]])
        lo = (w32 << 16).view(torch.float32)
        hi = (w32 & -65536).view(torch.float32)
        return (lo * x2[0] + hi * x2[1]).sum(-1)[None]
    return (weight.float() * x.float()).sum(-1)[None]


def _bf16_pairs(weight: torch.Tensor) -> bool:
    """Whether a bf16 weight can be read as int32 pairs (little-endian: element ``2j`` is word ``j``'s low half). A
    contiguous weight with rows of even length starts at an even element (a model's own weights and row slices of
    them do; dynamo cannot trace ``storage_offset``)."""
    return (weight.dtype == torch.bfloat16 and sys.byteorder == "little" and weight.dim() == 2
            and weight.is_contiguous() and weight.shape[-1] % 2 == 0)
