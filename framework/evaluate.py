"""Quality evaluation: perplexity on held-out English that ships with Python.

The text is ``pydoc_data.topics`` (the Python reference's help topics), topics in sorted order joined by
blank lines, tokenized once; we score a fixed slice of its first ``num_tokens + 1`` tokens with strided
windows (each window ``window`` tokens long, advancing by ``stride``; only the tokens not scored by the
previous window count, each with up to ``window - 1`` tokens of context). GPTQ calibration draws its text
from the tokens after the default slice (``HELDOUT_TOKENS``), so a longer evaluation of a GPTQ-quantized
model scores text it was calibrated on. The forward pass is the HF model's
own modules as the pipeline loaded them, so quantized modules swapped in by plugins are what gets measured.
"""
from __future__ import annotations

import math
import time

import torch

HELDOUT_TOKENS = 20480  # the default evaluation slice; GPTQ calibrates on the text after it (quant/calibration.py)


def heldout_text() -> str:
    from pydoc_data.topics import topics

    return "\n\n".join(topics[k] for k in sorted(topics))


def heldout_tokens(tokenizer, num_tokens: int) -> list[int]:
    """The first ``num_tokens + 1`` tokens of :func:`heldout_text` (``num_tokens`` targets are scored)."""
    ids = tokenizer(heldout_text(), add_special_tokens=False)["input_ids"]
    if len(ids) < num_tokens + 1:
        raise ValueError(f"the held-out text has only {len(ids)} tokens for this tokenizer; "
                         f"ask for at most {len(ids) - 1}")
    return ids[:num_tokens + 1]


@torch.inference_mode()
def perplexity(model, ids: list[int], *, window: int = 1024, stride: int = 512, progress=None) -> dict:
    """Strided-window perplexity of ``model`` (a transformers causal LM) over ``ids``.

    :return: ``{"perplexity", "nll", "tokens", "windows", "window", "stride", "seconds"}``; ``tokens`` is the
        number of scored targets (``len(ids) - 1``).
    """
    if not 1 <= stride <= window:
        raise ValueError(f"need 1 <= stride <= window, got stride={stride}, window={window}")
    device = next(model.parameters()).device
    data = torch.tensor(ids, dtype=torch.long, device=device)
    total = data.numel()
    nll, scored, windows = 0.0, 0, 0
    prev_end = 1  # the first token is context only
    t0 = time.perf_counter()
    begin = 0
    while prev_end < total:
        end = min(begin + window, total)
        chunk = data[begin:end]
        n_new = end - prev_end  # targets chunk[-n_new:], predicted from positions [-n_new-1, -1)
        logits = model(chunk[None], logits_to_keep=n_new + 1).logits[0, :-1].float()
        targets = chunk[-n_new:]
        nll += torch.nn.functional.cross_entropy(logits, targets, reduction="sum").item()
        scored += n_new
        windows += 1
        prev_end = end
        begin += stride
        if progress is not None:
            progress(scored, total - 1)
    return {"perplexity": math.exp(nll / scored), "nll": nll / scored, "tokens": scored, "windows": windows,
            "window": window, "stride": stride, "seconds": time.perf_counter() - t0}


def pipeline_perplexity(pipe, *, num_tokens: int = HELDOUT_TOKENS, window: int = 1024, stride: int = 512,
                        progress=None) -> dict:
    """Perplexity of a built :class:`tokenmill.Pipeline`'s model (as loaded and quantized) on the held-out slice."""
    window = min(window, pipe.limits.max_model_len)
    stride = min(stride, window)
    ids = heldout_tokens(pipe.tokenizer, num_tokens)
    out = perplexity(pipe.loaded.model, ids, window=window, stride=stride, progress=progress)
    out.update(text="pydoc_data.topics (sorted topics, first tokens)", pipeline=pipe.spec.name,
               model=pipe.loaded.name, quantized_layers=len(pipe.quantized_layers),
               weight_bytes=pipe.info()["weight_bytes"])
    return out
