"""A cache of GPTQ results, so a pipeline with ``gptq`` calibrates once per model and settings, not per build.

GPTQ is the slow part of building a quantized pipeline (minutes on CPU for the default model). Its output
is a pure function of the float weights, the quantizer's settings and the calibration tokens, so the
quantized layers are stored under ``$TOKENMILL_HOME/gptq/<plugin>-<key>/`` (the key hashes all three),
in the same portable layout as ``tokenmill quantize`` checkpoints, and a later build with the same inputs
loads them in seconds. ``gptq_cache: false`` on the quantizer turns it off; deleting the directory is
always safe.
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from pathlib import Path

import torch

FORMAT = 1
WEIGHTS = "layers.safetensors"
META = "meta.json"
SEP = "::"


def cache_key(plugin, model, ids: torch.Tensor) -> str:
    """A hash of what GPTQ's output depends on: the float model's tensors, the settings, the calibration ids."""
    import tokenmill.plugins.quant.calibration as calibration
    import tokenmill.plugins.quant.gptq as gptq

    h = hashlib.blake2b(digest_size=16)
    h.update(json.dumps({"format": FORMAT, "plugin": plugin.name, "settings": plugin.options.settings(),
                         "config": model.config.to_dict(), "torch": torch.__version__}, sort_keys=True,
                        default=str).encode())
    for mod in (gptq, calibration):  # a change to the algorithm invalidates what it produced
        h.update(Path(mod.__file__).read_bytes())
    seen: set[tuple] = set()
    for name, t in model.state_dict().items():
        key = (t.data_ptr(), tuple(t.shape), t.stride(), t.dtype)
        if key in seen:  # tied weights: hashed once
            continue
        seen.add(key)
        h.update(f"{name}:{t.dtype}:{tuple(t.shape)}".encode())
        h.update(t.detach().to("cpu").contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    h.update(ids.to("cpu").numpy().tobytes())
    return h.hexdigest()


def cache_path(plugin, key: str) -> Path:
    from tokenmill.model.resolve import cache_dir

    return cache_dir() / "gptq" / f"{plugin.name}-{key}"


def load(plugin, path: Path, device: torch.device, model_dtype: torch.dtype):
    """``(name -> quantized module, summary)`` from a cache entry, or None when there is none (or it is
    unreadable: then it is recomputed and rewritten)."""
    from safetensors import safe_open

    from tokenmill.plugins.quant import LINEAR_KINDS
    from tokenmill.plugins.quant.base import resolve_compute_dtype

    opts = plugin.options
    cd = resolve_compute_dtype(opts.compute_dtype, model_dtype, device)
    extra = {"compile_kernels": getattr(opts, "compile_kernels", True)}
    try:
        meta = json.loads((path / META).read_text())
        tensors = safe_open(str(path / WEIGHTS), framework="pt")
        out = {}
        for name, layer in meta["layers"].items():
            head = name + SEP
            ts = {k[len(head):]: tensors.get_tensor(k) for k in tensors.keys() if k.startswith(head)}
            out[name] = LINEAR_KINDS[layer["kind"]].from_portable(layer, ts, compute_dtype=cd, device=device,
                                                                  kernel_max_rows=opts.kernel_max_rows, **extra)
        return out, {**meta["summary"], "cached": str(path)}
    except Exception:  # truncated or foreign entry: drop it; the caller calibrates and writes it again
        shutil.rmtree(path, ignore_errors=True)
        return None


def save(path: Path, prepared: dict, summary: dict) -> None:
    """Write a cache entry atomically (a temporary directory renamed into place)."""
    from safetensors.torch import save_file

    metas, tensors = {}, {}
    for name, q in prepared.items():
        metas[name], ts = q.portable_state()
        tensors.update({f"{name}{SEP}{k}": t.detach().to("cpu").contiguous().clone() for k, t in ts.items()})
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=path.parent, prefix=".tmp-"))
    try:
        save_file(tensors, str(tmp / WEIGHTS))
        (tmp / META).write_text(json.dumps({"format": FORMAT, "layers": metas, "summary": summary}, indent=1))
        os.replace(tmp, path)
    except OSError:
        shutil.rmtree(tmp, ignore_errors=True)  # another process won the race, or the disk is full: no cache
