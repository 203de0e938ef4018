"""The logits phase of a step: ``process_logits`` (each request's failure its own) and token log-probabilities."""
from __future__ import annotations

from typing import Callable

import torch

from tokenmill.engine.outputs import TokenLogprob
from tokenmill.hooktypes import VerifyInput
from tokenmill.host import blame


def raw_rows(batch: VerifyInput) -> dict[int, torch.Tensor]:
    """Copies of the logits rows of the sequences that asked for logprobs, before any processor edits them."""
    out = {}
    for i, seq in enumerate(batch.seqs):
        if seq.params.logprobs is not None:
            start = batch.row_start[i]
            out[i] = batch.logits[start:start + 1 + len(batch.drafts[i])].clone()
    return out


def process_logits(hook, batch: VerifyInput, fail: Callable[[int, str], None]) -> None:
    """Run every ``process_logits`` implementation over ``batch.logits`` (in place). If one raises, redo the
    step's requests one at a time on their original rows, so only those it fails for fail (``fail(i, error)``)."""
    if not hook.process_logits.get_hookimpls():
        return
    original = batch.logits.clone()
    try:
        with torch.inference_mode():
            hook.process_logits(batch=batch)
        return
    except Exception:
        pass
    for i, seq in enumerate(batch.seqs):
        start, n = batch.row_start[i], 1 + len(batch.drafts[i])
        rows = original[start:start + n].clone()
        one = VerifyInput([seq], rows, [0], [batch.drafts[i]], [batch.tree(i)] if batch.parents else [])
        try:
            with torch.inference_mode():
                hook.process_logits(batch=one)
        except Exception as exc:
            fail(i, str(blame(exc, "process_logits")))
        with torch.inference_mode():
            batch.logits[start:start + n] = one.logits


def token_logprobs(rows: torch.Tensor, row_of: list[int], tokens: list[int], top: int) -> list[TokenLogprob]:
    """The log-probability of ``tokens[j]`` under ``log_softmax(rows[row_of[j]])`` and the ``top`` most likely
    tokens of that row with theirs (float32, the model's raw distribution)."""
    lp = torch.log_softmax(rows[row_of].float(), dim=-1)
    chosen = lp.gather(1, torch.tensor(tokens).unsqueeze(1)).squeeze(1).tolist()
    if top:
        values, ids = lp.topk(top, dim=-1)
        alts = [list(zip(i, v)) for i, v in zip(ids.tolist(), values.tolist())]
    else:
        alts = [[] for _ in tokens]
    return [TokenLogprob(t, c, a) for t, c, a in zip(tokens, chosen, alts)]
