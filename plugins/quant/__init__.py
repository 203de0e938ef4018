"""Weight quantization plugins: ``int8``, ``int4``, ``nf4`` and ``gguf`` (``quantize_layer`` module swaps).

Each plugin replaces the selected ``nn.Linear`` layers (and, unless told otherwise, the input embedding, which
shares one quantized copy with a tied LM head) by a module that keeps the weight packed and multiplies with a
packed-weight kernel (int8, int4) or a compiled dequant+GEMV (nf4). ``tokenmill quantize`` saves the result
(safetensors + manifest) and ``load: DIR`` reuses it without quantizing again. ``gguf`` quantizes nothing:
it takes a GGUF model's own codes from its file.
"""
from tokenmill.plugins.quant.base import QuantizedEmbedding, QuantLinear, SplitRowsLinear
from tokenmill.plugins.quant.quantizer import QuantPlugin
from tokenmill.plugins.quant.int4 import Int4, Int4Linear
from tokenmill.plugins.quant.int8 import Int8, Int8Linear
from tokenmill.plugins.quant.nf4 import NF4, NF4Linear
from tokenmill.plugins.quant.int8_group import Int8GroupLinear
from tokenmill.plugins.quant.gguf import GGUF

LINEAR_KINDS: dict[str, type[QuantLinear]] = {cls.kind: cls for cls in (Int8Linear, Int4Linear, NF4Linear,
                                                                         Int8GroupLinear, SplitRowsLinear)}

__all__ = ["GGUF", "Int4", "Int8GroupLinear", "Int4Linear", "Int8", "Int8Linear", "LINEAR_KINDS", "NF4", "NF4Linear", "QuantLinear",
           "QuantPlugin", "QuantizedEmbedding", "SplitRowsLinear"]
