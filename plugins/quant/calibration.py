"""GPTQ's model-level pass: calibration text, per-layer Hessians from forward hooks, block by block.

Calibration text: token sequences from ``pydoc_data.topics`` *after* the slice that ``tokenmill eval perplexity``
scores (see :func:`calibration_ids`), run through the model block by block (:func:`gptq_model`). For each decoder
block its selected linears are taken in the order the block calls them, those reading the same input
(q/k/v, gate/up) together, sharing the ``X^T X`` product; with ``true_sequential`` (the default) each group's
Hessians come from a pass over every calibration sequence in which the layers before it are already quantized
(the pass stops after the group), otherwise all from one float pass. With ``sequential`` (the default) the
block's outputs are then recomputed with the quantized weights, so the next block is calibrated on the inputs it
will see.
"""
from __future__ import annotations

import contextlib
import time
from typing import TYPE_CHECKING

import torch

from tokenmill.plugins.quant.gptq import GPTQOptions

if TYPE_CHECKING:
    from tokenmill.plugins.quant.base import QuantLinear
    from tokenmill.plugins.quant.quantizer import QuantPlugin


def calibration_ids(tokenizer, samples: int, seq_len: int, seed: int = 0) -> torch.Tensor:
    """``[samples, seq_len]`` token ids from ``pydoc_data.topics`` past the evaluation slice.

    ``tokenmill eval perplexity`` scores the first ``HELDOUT_TOKENS + 1`` tokens of the same text; the rest is
    cut into consecutive ``seq_len``-token chunks and ``samples`` of them are drawn with ``seed``."""
    from tokenmill.evaluate import HELDOUT_TOKENS, heldout_text

    ids = tokenizer(heldout_text(), add_special_tokens=False)["input_ids"]
    start = HELDOUT_TOKENS + 1
    avail = max(len(ids) - start, 0)
    chunks = avail // seq_len
    if chunks < samples:
        raise ValueError(f"gptq: the calibration text (pydoc_data.topics after its first {start} tokens, which "
                         f"the perplexity evaluation scores) has {avail} tokens for this tokenizer: room for "
                         f"{chunks} sequences of {seq_len}; lower samples or seq_len")
    gen = torch.Generator().manual_seed(seed)
    pick = torch.randperm(chunks, generator=gen)[:samples].sort().values
    data = torch.tensor(ids[start:start + chunks * seq_len], dtype=torch.long).view(chunks, seq_len)
    return data[pick]


class _Stop(Exception):
    pass


class _LayerStats:
    """Per linear layer, from forward hooks: ``H = 2 X^T X / n`` over its inputs ``X``. Layers called on the
    very same input tensor (q/k/v, gate/up) share the product."""

    def __init__(self, linears: dict[str, torch.nn.Linear], stop_after: str | None = None) -> None:
        self.stop_after = stop_after  # raise _Stop once this layer has been seen: the rest of the block is not needed
        self.h = {name: torch.zeros(m.in_features, m.in_features, device=m.weight.device)
                  for name, m in linears.items()}
        self.count = {name: 0 for name in linears}
        self._cache: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
        self.handles = [m.register_forward_hook(self._hook(name)) for name, m in linears.items()]

    def _product(self, x: torch.Tensor) -> torch.Tensor:
        hit = self._cache.get(id(x))
        if hit is None or hit[0] is not x:
            xf = x.reshape(-1, x.shape[-1]).float()
            hit = (x, xf.t() @ xf)
            self._cache[id(x)] = hit
        return hit[1]

    def _hook(self, name: str):
        def hook(module, args, output):
            x = args[0]
            m = x.numel() // x.shape[-1]
            total = self.count[name] + m
            self.h[name].mul_(self.count[name] / total).add_(self._product(x), alpha=2.0 / total)
            self.count[name] = total
            if name == self.stop_after:
                raise _Stop
        return hook

    def end_batch(self) -> None:
        self._cache.clear()

    def remove(self) -> None:
        for hd in self.handles:
            hd.remove()
        self.end_batch()


def _call_groups(block, linears: dict[str, torch.nn.Linear], x: torch.Tensor, extra) -> list[list[str]]:
    """``linears`` in the order the block calls them, those called on the same input tensor grouped (q/k/v,
    gate/up): the order in which ``true_sequential`` quantizes them."""
    calls: list[tuple[str, torch.Tensor]] = []  # the inputs themselves: an id() is reused once a tensor is freed

    def hook(name):
        return lambda module, args, output: calls.append((name, args[0]))

    handles = [m.register_forward_hook(hook(name)) for name, m in linears.items()]
    try:
        block(x, *extra[0], **extra[1])
    finally:
        for hd in handles:
            hd.remove()
    groups: list[list[str]] = []
    prev = None
    for name, src in calls:
        if any(name in g for g in groups):
            continue
        if src is prev and groups:
            groups[-1].append(name)
        else:
            groups.append([name])
        prev = src
    missing = [name for name in linears if not any(name in g for g in groups)]
    return groups + ([missing] if missing else [])


def _block_groups(order: list[list[str]], linears: dict[str, torch.nn.Linear], stem: str) -> list[list[str]]:
    """One block's selected ``linears`` (qualified names starting with ``stem``) grouped as in ``order`` (the
    call groups of the first block, by names relative to it): the decoder blocks share one structure."""
    groups = [g for g in ([stem + n for n in grp if stem + n in linears] for grp in order) if g]
    missing = [name for name in linears if not any(name in g for g in groups)]
    return groups + ([missing] if missing else [])


def decoder_blocks(model) -> tuple[str, torch.nn.ModuleList]:
    """The qualified name and the ``ModuleList`` of the model's decoder blocks (``model.layers`` in the
    supported families)."""
    n_layers = getattr(model.config, "num_hidden_layers", None)
    for name, mod in model.named_modules():
        if isinstance(mod, torch.nn.ModuleList) and name.endswith("layers") and len(mod) == n_layers:
            return name, mod
    raise ValueError("gptq: cannot find the model's decoder blocks (a ModuleList 'layers' of "
                     f"num_hidden_layers={n_layers} modules)")


def _block_output(out):
    return out[0] if isinstance(out, (tuple, list)) else out


@torch.no_grad()
def _block_inputs(model, block, ids: torch.Tensor) -> tuple[torch.Tensor, dict]:
    """Run ``model`` on ``ids`` up to ``block`` and return the block's hidden-state input and keyword
    arguments (position embeddings, mask, ...)."""
    got: dict = {}

    def pre(module, args, kwargs):
        kwargs = dict(kwargs)
        got["x"] = args[0] if args else kwargs.pop("hidden_states")
        got["args"] = args[1:]
        got["kwargs"] = kwargs
        raise _Stop

    handle = block.register_forward_pre_hook(pre, with_kwargs=True)
    try:
        model(input_ids=ids, use_cache=False)
    except _Stop:
        pass
    finally:
        handle.remove()
    if "x" not in got:
        raise ValueError("gptq: the model's forward never reached its first decoder block")
    return got["x"], (got["args"], got["kwargs"])


@torch.no_grad()
def gptq_model(plugin: "QuantPlugin", model, tokenizer, settings: dict, *, progress: bool = False,
               ids: torch.Tensor | None = None) -> tuple[dict[str, "QuantLinear"], dict]:
    """Quantize every linear layer in the decoder blocks that ``plugin`` selects, with GPTQ.

    ``ids``: the calibration tokens when the caller drew them already (:func:`calibration_ids` of the settings).

    :return: (qualified name -> quantized module, a summary: settings, calibration tokens, seconds). The model
        is left as it was found (its weights are restored after each block).
    """
    from tqdm.auto import tqdm

    t0 = time.perf_counter()
    opts = GPTQOptions(**settings)
    prefix, blocks = decoder_blocks(model)
    device = next(model.parameters()).device
    if ids is None:
        ids = calibration_ids(tokenizer, opts.samples, opts.seq_len, opts.seed)
    ids = ids.to(device)
    batches = list(ids.split(opts.batch_size))
    xs, extras = [], []
    for b in batches:
        x, extra = _block_inputs(model, blocks[0], b)
        xs.append(x)
        extras.append(extra)
    order = None
    if opts.true_sequential:  # found once, on the first block's float inputs
        first = {n: m for n, m in blocks[0].named_modules() if isinstance(m, torch.nn.Linear)}
        order = _call_groups(blocks[0], first, xs[0], extras[0])
    prepared: dict[str, "QuantLinear"] = {}
    t_solve = 0.0
    for i, block in enumerate(tqdm(blocks, desc="gptq", unit="block", disable=not progress)):
        last = i + 1 == len(blocks)
        linears = {f"{prefix}.{i}.{n}": m for n, m in block.named_modules()
                   if isinstance(m, torch.nn.Linear) and plugin.wants(f"{prefix}.{i}.{n}", m)
                   and not plugin.in_int8(f"{prefix}.{i}.{n}", m)}
        groups = _block_groups(order, linears, f"{prefix}.{i}.") if order else [list(linears)]
        saved: dict[str, torch.Tensor] = {}
        try:
            for group in groups:
                stats = _LayerStats({name: linears[name] for name in group}, stop_after=group[-1])
                try:
                    for x, (args, kw) in zip(xs, extras):
                        with contextlib.suppress(_Stop):
                            block(x, *args, **kw)
                        stats.end_batch()
                finally:
                    stats.remove()
                t1 = time.perf_counter()
                for name in group:
                    m = linears[name]
                    q = plugin.gptq_layer(m.weight.detach(), None if m.bias is None else m.bias.detach(),
                                          stats.h.pop(name), opts)
                    prepared[name] = q
                    if opts.sequential or opts.true_sequential:  # later layers see this one quantized
                        saved[name] = m.weight.detach().clone()
                        m.weight.copy_(q.dequantize(m.weight.dtype))
                t_solve += time.perf_counter() - t1
            if not last:  # the next block's inputs: this block's outputs, quantized (sequential) or float
                if not opts.sequential:
                    for name, w in saved.items():
                        linears[name].weight.copy_(w)
                    saved.clear()
                xs = [_block_output(block(x, *args, **kw)) for x, (args, kw) in zip(xs, extras)]
        finally:
            for name, w in saved.items():
                linears[name].weight.copy_(w)
    summary = {"method": "gptq", **settings, "tokens": int(ids.numel()), "layers": len(prepared),
               "text": "pydoc_data.topics after the perplexity slice", "seconds": round(time.perf_counter() - t0, 1),
               "solve_seconds": round(t_solve, 1)}
    return prepared, summary


__all__ = ["calibration_ids", "decoder_blocks", "gptq_model"]
