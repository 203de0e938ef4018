"""Sampling math shared by plugins: logits processing (temperature, top-k, top-p) and draws.

Per-request generators make sampling reproducible for a request whatever else runs in its batch.
"""
from __future__ import annotations

import torch

from tokenmill.params import SamplingParams


def filtered_probs(logits: torch.Tensor, params: SamplingParams) -> torch.Tensor:
    """The distribution ``params`` samples from: softmax(logits / T) restricted by top-k and top-p.

    :param logits: ``[..., vocab]`` raw logits.
    :return: float32 probabilities, renormalised, zero outside the kept set. For ``temperature == 0``
        a one-hot of the argmax.
    """
    logits = logits.float()
    if params.greedy:
        return torch.nn.functional.one_hot(logits.argmax(-1), logits.shape[-1]).float()
    logits = logits / params.temperature
    if params.top_k and params.top_k < logits.shape[-1]:
        kth = torch.topk(logits, params.top_k, dim=-1).values[..., -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    probs = torch.softmax(logits, dim=-1)
    if params.top_p < 1.0:
        sorted_p, idx = torch.sort(probs, dim=-1, descending=True)
        cum = torch.cumsum(sorted_p, dim=-1)
        drop_sorted = (cum - sorted_p) >= params.top_p  # keep the smallest prefix reaching top_p
        drop = torch.zeros_like(drop_sorted).scatter(-1, idx, drop_sorted)
        probs = probs.masked_fill(drop, 0.0)
        probs = probs / probs.sum(-1, keepdim=True)
    return probs


def draw(probs: torch.Tensor, generator: torch.Generator | None) -> int:
    """One token id from a 1-D distribution."""
    return int(torch.multinomial(probs, 1, generator=generator).item())


def sample_next(logits: torch.Tensor, params_list: list[SamplingParams],
                generators: list[torch.Generator | None]) -> list[int]:
    """Sample one token per row of ``logits`` (``[rows, vocab]``), greedy rows in one argmax."""
    out = logits.argmax(-1).tolist()
    for row, (params, gen) in enumerate(zip(params_list, generators)):
        if not params.greedy:
            out[row] = draw(filtered_probs(logits[row], params), gen)
    return out


def residual(target: torch.Tensor, draft: torch.Tensor) -> torch.Tensor:
    """The distribution to resample from after a rejected draft: norm(max(0, target - draft))."""
    r = (target - draft).clamp_min(0.0)
    total = r.sum()
    return r / total if total > 0 else target


def verify_drafts(logits: torch.Tensor, drafts: list[int], draft_probs: torch.Tensor | None,
                  params: SamplingParams, generator: torch.Generator | None) -> list[int]:
    """Accept a prefix of ``drafts`` and append one token from the target, keeping the target's law exactly.

    :param logits: ``[len(drafts) + 1, vocab]`` target logits, row ``i`` predicting the token after draft
        ``i - 1`` (row 0 after the last accepted token).
    :param draft_probs: ``[len(drafts), vocab]`` distributions the drafts were drawn from (after the same
        temperature / top-k / top-p), or None for deterministic drafts (one-hot).
    :return: accepted drafts followed by one target token. Greedy: the longest prefix equal to the target's
        argmax, then the target's argmax. Sampling (Leviathan et al.): accept draft ``x`` with probability
        ``min(1, p(x) / q(x))``; on rejection draw from ``norm(max(0, p - q))``; if all are accepted draw a
        bonus token from the last target row.
    """
    if params.greedy:
        best = logits.argmax(-1).tolist()
        out = []
        for i, tok in enumerate(drafts):
            if tok != best[i]:
                break
            out.append(tok)
        out.append(best[len(out)])
        return out
    out = []
    for i, tok in enumerate(drafts):
        p = filtered_probs(logits[i], params)
        q = draft_probs[i] if draft_probs is not None else None
        q_tok = float(q[tok]) if q is not None else 1.0
        u = float(torch.rand((), generator=generator))
        if q_tok > 0 and u < min(1.0, float(p[tok]) / q_tok):
            out.append(tok)
            continue
        onehot = q if q is not None else torch.nn.functional.one_hot(torch.tensor(tok), p.shape[-1]).float()
        out.append(draw(residual(p, onehot), generator))
        return out
    out.append(draw(filtered_probs(logits[len(drafts)], params), generator))
    return out


def tree_children(parents: list[int]) -> dict[int, list[int]]:
    """``parents[i]`` (``-1``: the root, i.e. the last accepted token) -> children lists, in draft order."""
    children: dict[int, list[int]] = {}
    for i, p in enumerate(parents):
        children.setdefault(p, []).append(i)
    return children


def tree_path(drafts: list[int], parents: list[int], accepted: list[int]) -> list[int]:
    """The draft indices along the tree path that ``accepted`` (accepted drafts + one target token) took."""
    children = tree_children(parents)
    node, path = -1, []
    for tok in accepted[:-1]:
        node = next(c for c in children.get(node, []) if drafts[c] == tok)
        path.append(node)
    return path


def verify_tree(logits: torch.Tensor, drafts: list[int], parents: list[int], params: SamplingParams,
                generator: torch.Generator | None) -> list[int]:
    """Accept a path of a draft *tree* (deterministic drafts) and append one target token, exactly.

    :param logits: ``[len(drafts) + 1, vocab]``: row 0 after the last accepted token, row ``i + 1`` after
        draft ``i`` (which followed its ancestors).
    :param parents: parent index of each draft (``-1`` = the root); siblings carry distinct tokens.
    :return: the tokens along the accepted path, then one token from the target. At each node the target's
        token is chosen (argmax, or a draw from the filtered distribution) and the walk goes on into the
        child holding that token, if any: every emitted token is the target's own choice, so the law is the
        target's exactly.
    """
    children = tree_children(parents)
    node, out = -1, []
    while True:
        row = logits[node + 1]
        tok = int(row.argmax()) if params.greedy else draw(filtered_probs(row, params), generator)
        out.append(tok)
        nxt = next((c for c in children.get(node, []) if drafts[c] == tok), None)
        if nxt is None:
            return out
        node = nxt
