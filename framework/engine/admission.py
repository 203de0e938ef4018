"""What a request must satisfy to be queued: its tokens fit the model and the KV pool, its token ids are in
the vocabulary, and the plugins accept its ``plugin_args`` (``request_args`` / ``check_request``)."""
from __future__ import annotations

import warnings

from tokenmill.errors import RequestError
from tokenmill.hooktypes import SchedulerLimits
from tokenmill.host import blame, call_each
from tokenmill.params import SamplingParams
from tokenmill.sequence import Sequence, SeqStatus


def check_tokens(ids: list[int], params: SamplingParams, *, vocab_size: int, limits: SchedulerLimits,
                 kv_capacity: int) -> None:
    """Raise :class:`RequestError` unless the prompt and ``params``' token ids fit the model and the pool."""
    if not ids:
        raise RequestError("the prompt is empty: give at least one token of text")
    if any((not isinstance(t, int)) or t < 0 or t >= vocab_size for t in ids):
        raise RequestError(f"prompt token ids must be integers in [0, {vocab_size})")
    total = len(ids) + params.max_tokens
    if total > limits.max_model_len:
        raise RequestError(
            f"prompt ({len(ids)} tokens) + max_tokens ({params.max_tokens}) = {total} exceeds the pipeline's "
            f"max_model_len of {limits.max_model_len}; shorten the prompt or lower max_tokens")
    if total > kv_capacity:
        raise RequestError(f"prompt + max_tokens = {total} tokens exceeds the whole KV cache ({kv_capacity} "
                           "token slots); enlarge the KV pool or shorten the request")
    for what, named in (("stop_token_ids", params.stop_token_ids), ("logit_bias", params.logit_bias),
                        ("bad_words_ids", [t for w in params.bad_words_ids for t in w])):
        bad = [t for t in named if t >= vocab_size]
        if bad:
            raise RequestError(f"{what} names token id {bad[0]}, outside this model's vocabulary [0, {vocab_size})",
                               field=what)


def declared_args(pm) -> dict[str, str]:
    """Every ``plugin_args`` key the pipeline's plugins declare (``request_args``), with its description."""
    out: dict[str, str] = {}
    for declared in pm.hook.request_args():
        out.update(declared)
    return out


def check_plugin_args(pm, seq: Sequence, declared: dict[str, str]) -> None:
    """Refuse plugin arguments no plugin declared, then let the plugins check theirs (``check_request``). A
    refused request is marked finished and ``request_finished`` is called, so plugins drop what they prepared."""
    unknown = sorted(set(seq.params.plugin_args) - set(declared))
    if unknown:
        known = ", ".join(f"'{k}' ({d})" for k, d in sorted(declared.items())) or "none"
        raise RequestError(f"plugin_args names {', '.join(map(repr, unknown))}, which no plugin of this pipeline "
                           f"reads; the plugin arguments it accepts: {known}", field="plugin_args")
    if not pm.hook.check_request.get_hookimpls():
        return
    try:
        pm.hook.check_request(seq=seq)
    except Exception as exc:
        failure = blame(exc, "check_request")
        seq.status, seq.finish_reason = SeqStatus.FINISHED, "error"
        for other in call_each(pm, "request_finished", seq=seq):
            warnings.warn(f"{other}; it may keep state for a refused request", RuntimeWarning, stacklevel=3)
        who = f"plugin '{failure.plugin}'" if failure.plugin else "a plugin"
        if isinstance(exc, ValueError):
            raise RequestError(f"{who} refused the request: {exc}", field=getattr(exc, "field", None) or "plugin_args",
                               plugin=failure.plugin) from None
        raise RequestError(str(failure), field="plugin_args", plugin=failure.plugin) from None
