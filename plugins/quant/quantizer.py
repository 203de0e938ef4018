"""The quantizer plugin the three formats share: options, layer selection (``include`` / ``skip`` /
``int8_layers``), GPTQ calibration, and the module swap through ``quantize_layer`` (or loading a checkpoint).
"""
from __future__ import annotations

import fnmatch
import sys
import weakref
from dataclasses import dataclass, field
from typing import ClassVar

import torch

from tokenmill.options import FilePath
from tokenmill.plugin import Plugin, hookimpl
from tokenmill.plugins.quant.base import (ComputeDType, QuantizedEmbedding, QuantLinear, SplitRowsLinear,
                                         resolve_compute_dtype)


def is_head(name: str) -> bool:
    """Whether the qualified layer name is the output projection (``lm_head``, also under a wrapper module)."""
    return name == "lm_head" or name.endswith(".lm_head")


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
    load: FilePath | None = None  # a directory written by `tokenmill quantize`: load it instead of quantizing
    # GPTQ for the decoder blocks' linear layers: true (defaults) or a mapping of GPTQ settings (see gptq.py);
    # null/false rounds to nearest. Normalized to the full settings dict (recorded in checkpoints).
    gptq: dict | bool | None = None
    gptq_cache: bool = True     # keep GPTQ results under $TOKENMILL_HOME/gptq (keyed by weights + settings)

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
        skip = {"load", "compute_dtype", "kernel_max_rows", "compile_kernels", "gptq_cache"}
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
        elif is_head(name):
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
        from tokenmill.plugins.quant import gptq_cache
        from tokenmill.plugins.quant.calibration import calibration_ids, gptq_model
        from tokenmill.plugins.quant.gptq import GPTQOptions

        path = found = ids = None
        if self.options.gptq_cache:
            g = GPTQOptions(**self.options.gptq)
            ids = calibration_ids(context.tokenizer, g.samples, g.seq_len, g.seed)
            path = gptq_cache.cache_path(self, gptq_cache.cache_key(self, context.model, ids))
            found = gptq_cache.load(self, path, context.device, context.dtype) if path.is_dir() else None
        if found is not None:
            prepared, self.calibration = found
        else:
            if context.progress:
                print(f"{self.name}: GPTQ calibration (a few minutes on CPU for a small model"
                      + (f"; cached for later builds in {path})" if path else ")"), file=sys.stderr, flush=True)
            prepared, self.calibration = gptq_model(self, context.model, context.tokenizer, self.options.gptq,
                                                    progress=context.progress, ids=ids)
            if path is not None:
                gptq_cache.save(path, prepared, self.calibration)
        mods = dict(context.model.named_modules())
        self._prepared = {name: (weakref.ref(mods[name].weight), q) for name, q in prepared.items()}

    def _gptq_result(self, name: str, module: torch.nn.Module) -> QuantLinear | None:
        if not self.options.gptq or not isinstance(module, torch.nn.Linear):
            return None
        if self._prepared is None:
            if self.wants(name, module) and not is_head(name):
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
            with torch.no_grad():
                q = self._int8(module.weight.detach(), None if module.bias is None else module.bias.detach())
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
            head = isinstance(module, torch.nn.Embedding) or is_head(name)
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

    def _int8(self, weight: torch.Tensor, bias: torch.Tensor | None) -> QuantLinear:
        """``weight`` in int8 (per-channel), with this plugin's compute dtype and kernel rows: the head rows of
        ``lm_head_int8_rows`` and the ``int8_layers``."""
        from tokenmill.plugins.quant.int8 import Int8Linear

        cd = resolve_compute_dtype(self.options.compute_dtype, weight.dtype, weight.device)
        return Int8Linear.from_float(weight, bias, compute_dtype=cd, kernel_max_rows=self.options.kernel_max_rows)

    def _split_head(self, weight: torch.Tensor, bias: torch.Tensor | None) -> QuantLinear:
        """The LM head / embedding matrix with its first ``lm_head_int8_rows`` rows in int8, the rest in this
        plugin's format (all int8 when that covers every row)."""
        rows = min(self.options.lm_head_int8_rows, weight.shape[0])
        int8 = self._int8(weight[:rows], None if bias is None else bias[:rows])
        if rows == weight.shape[0]:
            return int8
        rest = self.quantize_weight(weight[rows:], None if bias is None else bias[rows:], weight.dtype)
        return SplitRowsLinear([int8, rest])
