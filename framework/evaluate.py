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

HELDOUT_TOKENS = 20480  # the full evaluation slice; GPTQ calibrates on the text after it (quant/calibration.py)
DEFAULT_TOKENS = 4096   # `tokenmill eval perplexity` without --full: its first 4096 tokens (~1-2 min, 135M, 2 cores)


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


def strided_windows(total: int, window: int, stride: int) -> list[tuple[int, int, int]]:
    """``(begin, end, new)`` per window over ``total`` tokens: ``data[begin:end]`` is run and its last ``new``
    tokens are scored. Every scored token has at least one token of context inside its window (so with
    ``stride == window`` a window starts one token before the previous one ended)."""
    if window < 2 or stride < 1:
        raise ValueError(f"need window >= 2 and stride >= 1, got window={window}, stride={stride}")
    out, prev_end, begin = [], 1, 0  # the first token is context only
    while prev_end < total:
        begin = min(begin, prev_end - 1)
        end = min(begin + window, total)
        out.append((begin, end, end - prev_end))
        prev_end, begin = end, begin + stride
    return out


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
    t0 = time.perf_counter()
    for begin, end, n_new in strided_windows(total, window, stride):
        chunk = data[begin:end]  # targets chunk[-n_new:], predicted from positions [-n_new-1, -1)
        logits = model(chunk[None], logits_to_keep=n_new + 1).logits[0, :-1].float()
        nll += torch.nn.functional.cross_entropy(logits, chunk[-n_new:], reduction="sum").item()
        scored += n_new
        windows += 1
        if progress is not None:
            progress(scored, total - 1)
    return {"perplexity": math.exp(nll / scored), "nll": nll / scored, "tokens": scored, "windows": windows,
            "window": window, "stride": stride, "seconds": time.perf_counter() - t0}


def progress_line(done: int, total: int, seconds: float) -> str:
    """``2048/4096 tokens (50%), 31 s, about 31 s left`` (the estimate once a window is done)."""
    line = f"{done}/{total} tokens ({100 * done // max(total, 1)}%), {seconds:.0f} s"
    if 0 < done < total:
        line += f", about {seconds * (total - done) / done:.0f} s left"
    return line


def pipeline_perplexity(pipe, *, num_tokens: int = DEFAULT_TOKENS, window: int = 1024, stride: int = 512,
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
