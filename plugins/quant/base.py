"""What the three quantizers share: layer selection, the quantized-module contract, the quantized embedding,
and the plugin that swaps modules through ``quantize_layer`` (or loads them from a saved checkpoint).

A quantized linear module (:class:`QuantLinear`) holds its weight as buffers in a compact format and
implements two forwards: ``forward`` (the fast path: a packed-weight kernel or a compiled dequant+matmul) and
``reference_forward`` (dequantize the whole weight, then ``F.linear``), which tests compare. It can also
dequantize single rows (:meth:`QuantLinear.rows`), which is what lets one quantized copy of a tied
embedding / LM head matrix serve both the input lookup and the output projection.
"""
from __future__ import annotations

import fnmatch
import types
import warnings
import weakref
from dataclasses import dataclass, field
from typing import Any, ClassVar, Literal

import torch
import torch.nn.functional as F

from tokenmill.plugin import Plugin, hookimpl

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


@dataclass(slots=True)
class QuantOptions:
    """Options every quantizer takes (the YAML mapping under ``int8:``, ``int4:`` or ``nf4:``)."""

    include: list[str] = field(default_factory=lambda: ["*"])  # fnmatch globs on qualified names
    skip: list[str] = field(default_factory=list)               # globs to leave in float
    lm_head: bool = True        # quantize the output projection (``lm_head``)
    embed_tokens: bool = True   # quantize the input embedding (row lookups); with tied weights one shared copy
    compute_dtype: ComputeDType = "auto"
    kernel_max_rows: int | None = None  # rows up to which the packed kernel runs; more: dequantize + dense GEMM
    lm_head_int8_rows: int = 0  # int4/nf4: keep the first N rows of the LM head / embedding matrix in int8
    # int4/nf4: selected decoder linear layers matching these globs are stored in int8 (per-channel) instead:
    # mixed precision for the layers the format hurts most (like llama.cpp's *_M mixes keep attn_v higher)
    int8_layers: list[str] = field(default_factory=list)
    load: str | None = None     # a directory written by `tokenmill quantize`: load it instead of quantizing
    # GPTQ for the decoder blocks' linear layers: true (defaults) or a mapping of GPTQ settings (see gptq.py);
    # null/false rounds to nearest. Normalized to the full settings dict (recorded in checkpoints).
    gptq: dict | bool | None = None

    def __post_init__(self) -> None:
        from tokenmill.plugins.quant.gptq import gptq_settings

        self.gptq = gptq_settings(self.gptq)
        for key in ("include", "skip", "int8_layers"):
            if not all(isinstance(p, str) and p for p in getattr(self, key)):
                raise ValueError(f"{key} must be a list of non-empty glob patterns, got {getattr(self, key)!r}")
        if self.kernel_max_rows is not None and self.kernel_max_rows < 0:
            raise ValueError(f"kernel_max_rows must be >= 0, got {self.kernel_max_rows}")
        if self.lm_head_int8_rows < 0:
            raise ValueError(f"lm_head_int8_rows must be >= 0, got {self.lm_head_int8_rows}")

    def settings(self) -> dict:
        """The options that decide the stored format (recorded in a checkpoint's manifest)."""
        skip = {"load", "compute_dtype", "kernel_max_rows", "compile_kernels"}
        return {k: getattr(self, k) for k in self.__dataclass_fields__ if k not in skip}


class QuantPlugin(Plugin):
    """A ``quantize_layer`` plugin: selects layers by name, quantizes them (or loads them), swaps modules.

    The pipeline offers every ``nn.Linear`` and the input ``nn.Embedding`` (names like
    ``model.layers.3.mlp.up_proj``, ``lm_head``, ``model.embed_tokens``). A layer is quantized when it matches an
    ``include`` glob and no ``skip`` glob, and, for the LM head and the embedding, when ``lm_head`` /
    ``embed_tokens`` allow it. When the embedding and the LM head share one weight (tied) and both are
    quantized, they share one quantized matrix.
    """

    name = ""
    linear_cls: ClassVar[type[QuantLinear]] = QuantLinear
    Options = QuantOptions

    def __init__(self, options=None) -> None:
        super().__init__(options)
        self._tied: list[tuple[weakref.ref, QuantLinear]] = []  # float weight -> its quantized module
        self._loader = None
        self.quantized: dict[str, str] = {}  # qualified name -> kind (what this plugin replaced)
        self._prepared: dict[str, tuple[weakref.ref, QuantLinear]] | None = None  # GPTQ results by layer name
        self.calibration: dict | None = None  # what the GPTQ pass did (settings, tokens, seconds)

    # -- selection -------------------------------------------------------------------------------------
    def wants(self, name: str, module: torch.nn.Module) -> bool:
        opts = self.options
        if isinstance(module, torch.nn.Embedding):
            if not opts.embed_tokens:
                return False
        elif not isinstance(module, torch.nn.Linear):
            return False
        elif name == "lm_head" or name.endswith(".lm_head"):
            if not opts.lm_head:
                return False
        return (any(fnmatch.fnmatchcase(name, p) for p in opts.include)
                and not any(fnmatch.fnmatchcase(name, p) for p in opts.skip))

    def in_int8(self, name: str, module: torch.nn.Module) -> bool:
        """Whether a selected layer goes to int8 instead of this plugin's format (``int8_layers``)."""
        return (isinstance(module, torch.nn.Linear) and self.name != "int8"
                and any(fnmatch.fnmatchcase(name, p) for p in self.options.int8_layers))

    # -- quantization ----------------------------------------------------------------------------------
    def quantize_weight(self, weight: torch.Tensor, bias: torch.Tensor | None, model_dtype: torch.dtype
                        ) -> QuantLinear:
        """Quantize one float ``[out, in]`` weight into this plugin's module."""
        raise NotImplementedError

    def gptq_grid(self, weight: torch.Tensor):
        """This format as a :class:`tokenmill.plugins.quant.gptq.Grid` for ``weight`` (GPTQ support)."""
        raise NotImplementedError(f"'{self.name}' does not support gptq")

    def from_codes(self, codes: torch.Tensor, params: list[torch.Tensor], weight: torch.Tensor,
                   bias: torch.Tensor | None) -> QuantLinear:
        """This plugin's module from codes and per-group constants chosen by GPTQ for ``weight``."""
        raise NotImplementedError(f"'{self.name}' does not support gptq")

    def gptq_layer(self, weight: torch.Tensor, bias: torch.Tensor | None, hessian: torch.Tensor,
                   opts) -> QuantLinear:
        """Quantize one float ``[out, in]`` weight with GPTQ under ``hessian`` (``[in, in]``)."""
        from tokenmill.plugins.quant.gptq import gptq_quantize

        codes, params, _ = gptq_quantize(weight, hessian, self.gptq_grid(weight), damp=opts.damp,
                                         act_order=opts.act_order, refit=opts.refit_scales)
        return self.from_codes(codes, params, weight, bias)

    @hookimpl
    def calibrate(self, context) -> None:
        """With ``gptq``: quantize the selected linear layers of the decoder blocks from calibration text now
        (the whole float model is needed); ``quantize_layer`` then hands out the results."""
        if self.options.load or not self.options.gptq:
            return
        from tokenmill.plugins.quant.calibration import gptq_model

        prepared, self.calibration = gptq_model(self, context.model, context.tokenizer, self.options.gptq,
                                                progress=context.progress)
        mods = dict(context.model.named_modules())
        self._prepared = {name: (weakref.ref(mods[name].weight), q) for name, q in prepared.items()}

    def _gptq_result(self, name: str, module: torch.nn.Module) -> QuantLinear | None:
        if not self.options.gptq or not isinstance(module, torch.nn.Linear):
            return None
        if self._prepared is None:
            if self.wants(name, module) and not (name == "lm_head" or name.endswith(".lm_head")):
                from tokenmill.errors import PipelineError

                raise PipelineError(f"'{self.name}' with gptq needs its calibration pass over the whole model "
                                    f"(the `calibrate` hook, which Pipeline calls before `quantize_layer`), but "
                                    f"'{name}' was offered without one; call the plugin's calibrate(context=...) "
                                    f"first, or drop gptq from these options")
            return None
        entry = self._prepared.pop(name, None)
        if entry is None:
            return None
        ref, q = entry
        if ref() is not module.weight:
            raise RuntimeError(f"gptq: '{name}' is not the layer that was calibrated")
        return q

    def _shared(self, weight: torch.Tensor) -> QuantLinear | None:
        for ref, q in self._tied:
            if ref() is weight:
                return q
        return None

    @hookimpl
    def quantize_layer(self, name: str, module: torch.nn.Module, model_config) -> torch.nn.Module | None:
        if self.options.load:
            from tokenmill.plugins.quant.checkpoint import CheckpointLoader

            if self._loader is None:
                self._loader = CheckpointLoader(self.options.load, self, model_config)
            new = self._loader.module_for(name, module)
            if new is not None:
                self.quantized[name] = getattr(new, "kind", None) or new.table.kind
            return new
        if not self.wants(name, module):
            return None
        if self.in_int8(name, module):
            from tokenmill.plugins.quant.int8 import Int8Linear

            w, b = module.weight.detach(), None if module.bias is None else module.bias.detach()
            cd = resolve_compute_dtype(self.options.compute_dtype, w.dtype, w.device)
            with torch.no_grad():
                q = Int8Linear.from_float(w, b, compute_dtype=cd, kernel_max_rows=self.options.kernel_max_rows)
            self.quantized[name] = q.kind
            return q
        prepared = self._gptq_result(name, module)
        if prepared is not None:
            self.quantized[name] = prepared.kind
            return prepared
        weight = module.weight
        q = self._shared(weight)
        if q is None:
            bias = module.bias if isinstance(module, torch.nn.Linear) else None
            bias = None if bias is None else bias.detach()
            head = isinstance(module, torch.nn.Embedding) or name == "lm_head" or name.endswith(".lm_head")
            with torch.no_grad():
                if head and self.options.lm_head_int8_rows and self.name != "int8":
                    q = self._split_head(weight.detach(), bias)
                else:
                    q = self.quantize_weight(weight.detach(), bias, weight.dtype)
            if bias is None:
                self._tied.append((weakref.ref(weight), q))
        if isinstance(module, torch.nn.Embedding):
            new = QuantizedEmbedding(q, module.num_embeddings, module.embedding_dim, module.padding_idx,
                                     weight.dtype)
        else:
            new = q
        self.quantized[name] = q.kind
        return new

    def _split_head(self, weight: torch.Tensor, bias: torch.Tensor | None) -> QuantLinear:
        """The LM head / embedding matrix with its first ``lm_head_int8_rows`` rows in int8, the rest in this
        plugin's format (all int8 when that covers every row)."""
        from tokenmill.plugins.quant.int8 import Int8Linear

        rows = min(self.options.lm_head_int8_rows, weight.shape[0])
        cd = resolve_compute_dtype(self.options.compute_dtype, weight.dtype, weight.device)
        int8 = Int8Linear.from_float(weight[:rows], None if bias is None else bias[:rows], compute_dtype=cd,
                                     kernel_max_rows=self.options.kernel_max_rows)
        if rows == weight.shape[0]:
            return int8
        rest = self.quantize_weight(weight[rows:], None if bias is None else bias[rows:], weight.dtype)
        return SplitRowsLinear([int8, rest])
