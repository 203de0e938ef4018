"""What the three quantizers share: the quantized-module contract, row-split modules and the quantized
embedding (the plugin that selects layers and swaps modules is in :mod:`tokenmill.plugins.quant.quantizer`).

A quantized linear module (:class:`QuantLinear`) holds its weight as buffers in a compact format and
implements two forwards: ``forward`` (the fast path: a packed-weight kernel or a compiled dequant+matmul) and
``reference_forward`` (dequantize the whole weight, then ``F.linear``), which tests compare. It can also
dequantize single rows (:meth:`QuantLinear.rows`), which is what lets one quantized copy of a tied
embedding / LM head matrix serve both the input lookup and the output projection.
"""
from __future__ import annotations

import types
import warnings
from typing import Any, ClassVar, Literal

import torch
import torch.nn.functional as F

ComputeDType = Literal["auto", "bfloat16", "float32", "float16"]
_DTYPES = {"bfloat16": torch.bfloat16, "float32": torch.float32, "float16": torch.float16}


def resolve_compute_dtype(name: str, model_dtype: torch.dtype, device: torch.device) -> torch.dtype:
    """``auto``: bfloat16 (the dtype the packed CPU kernels are vectorized for) unless the model runs in fp16."""
    if name == "auto":
        return torch.float16 if model_dtype == torch.float16 else torch.bfloat16
    return _DTYPES[name]


def pad_to(n: int, multiple: int) -> int:
    return -(-n // multiple) * multiple


def pad_weight(w: torch.Tensor, rows: int, cols: int) -> torch.Tensor:
    """Zero-pad a 2-D weight to ``[rows, cols]`` (no copy when it already has that shape)."""
    if w.shape == (rows, cols):
        return w
    return F.pad(w, (0, cols - w.shape[1], 0, rows - w.shape[0]))


_COMPILED: dict[tuple, object] = {}
COMPILE_BROKEN: list[str] = []  # set once torch.compile failed here (no C++ compiler, ...): stay eager


def compiled(fn, key: tuple):
    """``torch.compile(fn)`` specialized for ``key`` (a weight shape), as its own code object.

    Dynamo limits recompilations per code object (8 by default); a model has a handful of weight shapes
    times a few row counts, and tests build several models in one process, so each shape gets a copy of the
    function's code with its own cache instead of sharing one.
    """
    k = (fn.__name__,) + key
    if k not in _COMPILED:
        code = fn.__code__.replace(co_name=f"{fn.__name__}_" + "_".join(str(v) for v in key))
        clone = types.FunctionType(code, fn.__globals__, code.co_name, fn.__defaults__, fn.__closure__)
        from tokenmill.model.resolve import persist_compiled_kernels

        persist_compiled_kernels()
        _COMPILED[k] = torch.compile(clone, dynamic=False)
    return _COMPILED[k]


def run_kernel(fn, key: tuple, *args, compile: bool = True):
    """``fn(*args)``, compiled per ``key`` when ``compile``; traced inline inside an enclosing compiled region
    (the runner's ``compile: enabled`` graph); eager when compiling is unavailable."""
    if compile and not COMPILE_BROKEN:
        if torch.compiler.is_compiling():
            return fn(*args)
        try:
            return compiled(fn, key)(*args)
        except Exception as exc:  # no C++ compiler, unsupported platform: stay correct, slower
            COMPILE_BROKEN.append(f"{type(exc).__name__}: {exc}")
            warnings.warn(f"quantization kernels: torch.compile unavailable, running eagerly ({COMPILE_BROKEN[0]})",
                          RuntimeWarning, stacklevel=3)
    return fn(*args)


class QuantLinear(torch.nn.Module):
    """Base of the quantized replacements for ``nn.Linear`` (same call signature, same output shape).

    Subclasses register their compact weight as buffers (so ``Pipeline.info()`` counts their real bytes) and
    implement :meth:`dequantize`, :meth:`rows`, :meth:`_matmul` and the portable (de)serialization.
    """

    kind: ClassVar[str] = ""

    def __init__(self, in_features: int, out_features: int, bias: torch.Tensor | None,
                 compute_dtype: torch.dtype) -> None:
        super().__init__()
        self.in_features = in_features
        self.out_features = out_features
        self.compute_dtype = compute_dtype
        if bias is not None:
            self.register_buffer("bias", bias.detach().clone())
        else:
            self.bias = None

    # -- to implement -------------------------------------------------------------------------------
    def dequantize(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """The full ``[out_features, in_features]`` weight as stored (what the reference multiplies by)."""
        raise NotImplementedError

    def rows(self, ids: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        """Dequantized rows ``ids`` (any shape) -> ``[*ids.shape, in_features]``: the embedding lookup."""
        raise NotImplementedError

    def _matmul(self, x: torch.Tensor) -> torch.Tensor:
        """``x [M, in_features]`` -> ``[M, out_features]`` without bias, in any float dtype."""
        raise NotImplementedError

    def portable_state(self) -> tuple[dict, dict[str, torch.Tensor]]:
        """(metadata, tensors) in a device- and CPU-capability-independent layout, for saving."""
        raise NotImplementedError

    @classmethod
    def from_portable(cls, meta: dict, tensors: dict[str, torch.Tensor], *, compute_dtype: torch.dtype,
                      device: torch.device, **opts: Any) -> "QuantLinear":
        raise NotImplementedError

    @classmethod
    def fuse(cls, mods: list["QuantLinear"]) -> "QuantLinear | None":
        """One module computing ``mods`` (same input) side by side, their outputs concatenated, or None where
        this format cannot (the model runner then calls each). Called by the runner for q/k/v and gate/up;
        an implementation should share the parts' storage rather than copy it."""
        return None

    # -- shared --------------------------------------------------------------------------------------
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self._matmul(x if x.dim() == 2 else x.reshape(-1, self.in_features)).to(x.dtype)
        if self.bias is not None:
            y = y + self.bias.to(y.dtype)
        return y if x.dim() == 2 else y.reshape(*x.shape[:-1], self.out_features)

    def reference_forward(self, x: torch.Tensor) -> torch.Tensor:
        """Dequantize everything, then ``F.linear`` in the input's dtype: the ground truth for the fast path."""
        bias = None if self.bias is None else self.bias.to(x.dtype)
        return F.linear(x, self.dequantize(x.dtype), bias)

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, "
                f"bias={self.bias is not None}, compute_dtype={str(self.compute_dtype).removeprefix('torch.')}")


class SplitRowsLinear(QuantLinear):
    """Output rows split into consecutive ranges, each its own quantized module (e.g. int8 then int4).

    Used for the LM head / embedding matrix with ``lm_head_int8_rows``: its first rows (token ids; in BPE
    vocabularies the frequent tokens come first, in merge order) stay int8, the rest use the plugin's format.
    """

    kind = "split"

    def __init__(self, parts: list[QuantLinear]) -> None:
        super().__init__(parts[0].in_features, sum(p.out_features for p in parts), None, parts[0].compute_dtype)
        self.parts = torch.nn.ModuleList(parts)
        self.starts = [0]
        for p in parts:
            self.starts.append(self.starts[-1] + p.out_features)

    def dequantize(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        return torch.cat([p.dequantize(dtype) for p in self.parts], 0)

    def rows(self, ids: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        flat = ids.reshape(-1)
        out = None
        for p, lo, hi in zip(self.parts, self.starts, self.starts[1:]):
            r = p.rows((flat - lo).clamp(0, hi - lo - 1), dtype)
            out = r if out is None else torch.where(((flat >= lo) & (flat < hi))[:, None], r, out)
        return out.view(*ids.shape, self.in_features)

    def _matmul(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat([p._matmul(x).to(x.dtype) for p in self.parts], -1)

    def portable_state(self):
        metas, tensors = [], {}
        for i, p in enumerate(self.parts):
            meta, ts = p.portable_state()
            metas.append(meta)
            tensors.update({f"p{i}.{k}": v for k, v in ts.items()})
        return {"kind": self.kind, "in_features": self.in_features, "out_features": self.out_features,
                "parts": metas, "bias": False}, tensors

    @classmethod
    def from_portable(cls, meta, tensors, *, compute_dtype, device, **opts):
        from tokenmill.plugins.quant import LINEAR_KINDS

        parts = []
        for i, m in enumerate(meta["parts"]):
            ts = {k[len(f"p{i}."):]: v for k, v in tensors.items() if k.startswith(f"p{i}.")}
            parts.append(LINEAR_KINDS[m["kind"]].from_portable(m, ts, compute_dtype=compute_dtype, device=device,
                                                               **opts))
        return cls(parts)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, rows={self.starts}"


class QuantizedEmbedding(torch.nn.Module):
    """An input embedding backed by a :class:`QuantLinear` table: dequantizes only the looked-up rows.

    For a tied embedding / LM head, ``table`` is the very module that serves as ``lm_head``: one quantized copy
    of the matrix serves both (``named_modules`` and ``buffers`` list it once).
    """

    def __init__(self, table: QuantLinear, num_embeddings: int, embedding_dim: int, padding_idx: int | None,
                 dtype: torch.dtype) -> None:
        super().__init__()
        self.table = table
        self.num_embeddings = num_embeddings
        self.embedding_dim = embedding_dim
        self.padding_idx = padding_idx
        self.out_dtype = dtype

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.table.rows(input_ids, self.out_dtype)

    def extra_repr(self) -> str:
        return f"{self.num_embeddings}, {self.embedding_dim}, table={self.table.kind}"
