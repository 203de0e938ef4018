"""``gguf``: run a GGUF model from the quantized codes its file ships, instead of quantizing the float weights.

A GGUF model (the default alias, or ``model: path/to/x.gguf``) is loaded as float weights dequantized from the
file. This plugin reads the same file's codes (:mod:`tokenmill.plugins.quant.gguf_codes`) and swaps each
selected layer for the module that holds them as they are:

- ``Q4_0`` / ``Q4_1`` -> :class:`~tokenmill.plugins.quant.int4.Int4Linear`, group 32: ``Q4_1``'s
  ``w = d * q + m`` is the int4 format's ``(q - 8) * scale + zero`` with ``scale = d``, ``zero = m + 8 d``
  (``Q4_0``: ``zero = 0``). The codes are the file's; the scales and zeros are stored in the compute dtype
  (bfloat16 by default, for the vectorized kernel: a relative rounding of 2^-9; ``compute_dtype: float32``
  keeps them exact).
- ``Q8_0`` -> :class:`~tokenmill.plugins.quant.int8_group.Int8GroupLinear` (int8 codes, one float16 scale per
  32 inputs, exact).

Layers whose tensor has another type (float, K-quants) stay as the float model has them. Every tensor is
checked against the float weight the model was loaded with (dequantized the way the ``gguf`` package does,
in float32: they must be equal, bit for bit), which also finds the row order llama.cpp's converter used for
the rotary q/k projections; a mismatch is an error naming the tensor.
"""
from __future__ import annotations

import weakref
from dataclasses import dataclass

import torch

from tokenmill.errors import PipelineError
from tokenmill.options import FilePath
from tokenmill.plugin import hookimpl
from tokenmill.plugins.quant.base import QuantizedEmbedding, QuantLinear, resolve_compute_dtype
from tokenmill.plugins.quant.gguf_codes import SUPPORTED, GgufFile, GgufTensor, read_gguf
from tokenmill.plugins.quant.quantizer import QuantOptions, QuantPlugin


def _rope_orders(n: int, heads: int) -> list[torch.Tensor]:
    """Row orders llama.cpp's converter may have applied to a rotary projection of ``heads`` heads (it
    interleaves the two rotary halves of each head), and their inverses."""
    if heads <= 0 or n % (2 * heads):
        return []
    idx = torch.arange(n).view(heads, 2, n // heads // 2).transpose(1, 2).reshape(n)
    return [idx, torch.argsort(idx)]


class GGUF(QuantPlugin):
    """The GGUF file's own 4-bit / 8-bit codes (module docstring)."""

    name = "gguf"

    @dataclass(slots=True)
    class Options(QuantOptions):
        file: FilePath | None = None  # the GGUF to read; default: the one the model was converted from

        def __post_init__(self) -> None:
            QuantOptions.__post_init__(self)
            for key, off in (("gptq", None), ("int8_layers", []), ("lm_head_int8_rows", 0), ("load", None)):
                if getattr(self, key) != off:
                    raise ValueError(f"gguf: '{key}' does not apply (the codes come from the GGUF file as they "
                                     f"are); allowed: file, include, skip, lm_head, embed_tokens, compute_dtype, "
                                     f"kernel_max_rows")

    def __init__(self, options=None) -> None:
        super().__init__(options)
        self.file: GgufFile | None = None
        self.source: dict[str, str] = {}       # layer name -> the GGUF type its codes came from
        self.left_float: dict[str, str] = {}   # selected layers kept in float, and why
        self._names = None
        self._heads: tuple[int, ...] = ()

    @hookimpl
    def calibrate(self, context) -> None:
        """Read the GGUF file (``file:``, else the one the model was converted from)."""
        import gguf

        path = self.options.file or context.source_gguf
        if path is None:
            raise PipelineError(f"gguf: model '{context.model_name}' was not loaded from a GGUF file; load a "
                                f"GGUF model (an alias or a .gguf path) or name the file with `file:`")
        try:
            self.file = read_gguf(path)
        except ValueError as exc:
            raise PipelineError(f"gguf: {exc}") from None
        arch = {v: k for k, v in gguf.MODEL_ARCH_NAMES.items()}.get(self.file.architecture)
        if arch is None:
            raise PipelineError(f"gguf: {path} is for architecture '{self.file.architecture}', which the gguf "
                                f"package does not know")
        cfg = context.model.config
        self._names = gguf.get_tensor_name_map(arch, cfg.num_hidden_layers)
        self._heads = tuple(dict.fromkeys(h for h in (cfg.num_attention_heads,
                                                      getattr(cfg, "num_key_value_heads", None)) if h))

    @hookimpl
    def configure(self, context) -> None:
        """The layers are swapped by now: drop the codes no layer took (skipped or unselected layers)."""
        if self.file is not None:
            self.file.tensors.clear()

    def _tensor(self, name: str, module: torch.nn.Module) -> GgufTensor | None:
        """The file's tensor for layer ``name``, rows in the loaded weight's order; None (noted) if not quantized."""
        base = self._names.get_name(name) if self._names is not None else None
        key = f"{base}.weight" if base else None
        if key == "output.weight" and key not in self.file.tensors and key not in self.file.other:
            key = "token_embd.weight"  # no separate output matrix: llama.cpp ties it to the embedding
        if key is None or key not in self.file.tensors:
            self.left_float[name] = (f"its tensor is {self.file.other[key]}" if key in self.file.other
                                     else "no tensor in the file")
            return None
        t = self.file.tensors.pop(key)  # the module built from it holds the codes from here on
        w = module.weight.detach()
        if t.shape != tuple(w.shape):
            raise PipelineError(f"gguf: tensor {key} of {self.file.path} has shape {list(t.shape)}, the loaded "
                                f"'{name}' {list(w.shape)}")
        deq = t.dequantize().to(w.dtype)
        if torch.equal(deq, w):
            return t
        for heads in self._heads:
            for order in _rope_orders(w.shape[0], heads):
                if torch.equal(deq[order], w):
                    return t.permute_rows(order)
        raise PipelineError(f"gguf: tensor {key} of {self.file.path} does not hold the weights of '{name}' as "
                            f"loaded (its dequantized values differ); is `file:` the model's own GGUF?")

    def _module(self, t: GgufTensor, bias: torch.Tensor | None, dtype: torch.dtype) -> QuantLinear:
        from tokenmill.plugins.quant.int4 import Int4Linear
        from tokenmill.plugins.quant.int8_group import Int8GroupLinear

        cd = resolve_compute_dtype(self.options.compute_dtype, dtype, t.q.device)
        n, k = t.shape
        if t.type == "Q8_0":
            return Int8GroupLinear(t.q, t.d, bias, compute_dtype=cd, kernel_max_rows=self.options.kernel_max_rows)
        d = t.d.float()
        zero = t.m.float() + 8.0 * d if t.type == "Q4_1" else torch.zeros_like(d)
        return Int4Linear(t.q, d, zero, bias, in_features=k, out_features=n, group_size=32, compute_dtype=cd,
                          kernel_max_rows=self.options.kernel_max_rows)

    @hookimpl
    def quantize_layer(self, name: str, module: torch.nn.Module, model_config) -> torch.nn.Module | None:
        if self.file is None:
            raise PipelineError("gguf: the plugin reads its file in the `calibrate` hook, which Pipeline calls "
                                "before `quantize_layer`; call calibrate(context=...) first")
        if not self.wants(name, module):
            return None
        weight = module.weight
        q = self._shared(weight)
        if q is None:
            t = self._tensor(name, module)
            if t is None:
                return None
            bias = getattr(module, "bias", None) if isinstance(module, torch.nn.Linear) else None
            with torch.no_grad():
                q = self._module(t, None if bias is None else bias.detach(), weight.dtype)
            self.source[name] = t.type
            if bias is None:
                self._tied.append((weakref.ref(weight), q))
        else:
            self.source[name] = "shared"
        self.quantized[name] = q.kind
        if isinstance(module, torch.nn.Embedding):
            return QuantizedEmbedding(q, module.num_embeddings, module.embedding_dim, module.padding_idx, weight.dtype)
        return q


__all__ = ["GGUF", "SUPPORTED"]
