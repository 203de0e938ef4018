"""llama.cpp as a peer row, through ``llama-cpp-python`` (optional: ``pip install llama-cpp-python==0.3.36``
builds llama.cpp from source, 5-15 min on 2 cores; never installed by CI).

The GGUFs are made from the default model's own file by llama.cpp's quantizer (``llama_model_quantize`` with
requantizing allowed): F32 and BF16 hold exactly the float weights tokenmill loads (the shipped Q4_1
dequantized), Q8_0 and Q4_0 are llama.cpp's own quantizations of them. They are kept under the tokenmill cache.

Timing is wall time around the Python API's calls: ``eval(prompt)`` for prompt processing, then one
``eval([token])`` per new token with the argmax of llama.cpp's logits between them (through this package
``llama_perf_context`` reads zeros, so its own counters are not used).
"""
from __future__ import annotations

import ctypes
import time
from pathlib import Path

import numpy as np

FTYPES = {"F32": "LLAMA_FTYPE_ALL_F32", "BF16": "LLAMA_FTYPE_MOSTLY_BF16", "Q8_0": "LLAMA_FTYPE_MOSTLY_Q8_0",
          "Q4_0": "LLAMA_FTYPE_MOSTLY_Q4_0", "Q4_1": "LLAMA_FTYPE_MOSTLY_Q4_1"}


def available() -> bool:
    try:
        import llama_cpp  # noqa: F401
    except ImportError:
        return False
    return True


def make_gguf(src: Path, kind: str, out_dir: Path) -> Path:
    """``src`` requantized by llama.cpp to ``kind`` (one of :data:`FTYPES`), cached in ``out_dir``."""
    import llama_cpp

    out = out_dir / f"{src.stem.split('.')[0]}.{kind}.gguf"
    if out.is_file():
        return out
    out_dir.mkdir(parents=True, exist_ok=True)
    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = getattr(llama_cpp, FTYPES[kind])
    params.allow_requantize = True
    params.nthread = 2
    tmp = out.with_suffix(".tmp")
    rc = llama_cpp.llama_model_quantize(str(src).encode(), str(tmp).encode(), ctypes.byref(params))
    if rc != 0:
        raise RuntimeError(f"llama_model_quantize {src} -> {kind} failed ({rc})")
    tmp.rename(out)
    return out


def run(path: Path, prompt_ids: list[int], new_tokens: int, threads: int, repeats: int = 2) -> dict:
    """Greedy decode of ``new_tokens`` after ``prompt_ids`` (batch 1), the fastest of ``repeats`` runs after a
    warm-up: decode and prompt tok/s, the wall time, and the tokens."""
    import llama_cpp

    llm = llama_cpp.Llama(model_path=str(path), n_ctx=max(2048, len(prompt_ids) + new_tokens + 8),
                          n_batch=2048, n_ubatch=2048, n_threads=threads, n_threads_batch=threads,
                          verbose=False, logits_all=False)
    vocab = llm.n_vocab()

    def logits():
        return np.ctypeslib.as_array(llama_cpp.llama_get_logits_ith(llm.ctx, -1), shape=(vocab,))

    best = None
    for i in range(repeats + 1):  # the first run warms up
        llm.reset()
        t0 = time.perf_counter()
        llm.eval(prompt_ids)
        t_prompt = time.perf_counter() - t0
        toks = []
        for _ in range(new_tokens):
            tok = int(logits().argmax())  # greedy on llama.cpp's logits of the last position
            toks.append(tok)
            llm.eval([tok])
        wall = time.perf_counter() - t0
        row = {"decode_tok_s": new_tokens / max(wall - t_prompt, 1e-9), "prompt_tok_s": len(prompt_ids) / t_prompt,
               "prompt_s": t_prompt, "wall_s": wall, "tokens": toks}
        if i and (best is None or row["wall_s"] < best["wall_s"]):
            best = row
    llm.close()
    return best
