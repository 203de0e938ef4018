"""Default ``process_logits``: the request's ``SamplingParams`` penalties, biases and bans.

The names and formulas are HF's processors and OpenAI's API, applied in this order:

- ``logit_bias``: added to the token's logit (HF ``SequenceBiasLogitsProcessor`` with one-token keys);
- ``repetition_penalty``: every token of the prompt and output so far, its logit divided by the penalty
  when positive and multiplied when negative (HF ``RepetitionPenaltyLogitsProcessor``);
- ``presence_penalty`` / ``frequency_penalty``: over the *generated* tokens, ``logit -= presence *
  (count > 0) + frequency * count`` (OpenAI, vLLM);
- ``bad_words`` / ``bad_words_ids``: a banned sequence's last token is -inf where the context ends with the
  tokens before it; a one-token sequence is banned always (HF ``NoBadWordsLogitsProcessor``);
- ``min_tokens``: EOS (unless ``ignore_eos``) and ``stop_token_ids`` are -inf until that many tokens are
  generated (HF ``MinNewTokensLengthLogitsProcessor``).

A draft row is processed with the drafts before it as context, so speculation stays exact. Requests that
ask for none of this are skipped before any tensor work; the others cost one indexed tensor operation per
kind of edit for the whole batch.
"""
from __future__ import annotations

import torch

from tokenmill.hooktypes import PipelineContext, VerifyInput
from tokenmill.plugin import Plugin, hookimpl
from tokenmill.plugins.sampling.processor_state import RequestState
from tokenmill.sequence import Sequence


class _Edits:
    """Index edits of one kind gathered over the batch's rows: per row, token ids and (unless the kind sets a
    constant) their values."""

    __slots__ = ("rows", "ids", "values")

    def __init__(self) -> None:
        self.rows: list[torch.Tensor] = []
        self.ids: list[torch.Tensor] = []
        self.values: list[torch.Tensor] = []

    def add(self, row: int, ids: torch.Tensor, values: torch.Tensor | None = None) -> None:
        if len(ids):
            self.rows.append(torch.full((len(ids),), row, dtype=torch.long))
            self.ids.append(ids)
            if values is not None:
                self.values.append(values)

    def index(self, device: torch.device) -> tuple[tuple[torch.Tensor, torch.Tensor], torch.Tensor | None] | None:
        """``((rows, ids), values)`` on ``device``, one entry per edit; None when there is none."""
        if not self.rows:
            return None
        values = torch.cat(self.values).to(device) if self.values else None
        return (torch.cat(self.rows).to(device), torch.cat(self.ids).to(device)), values


def _longs(values: list[int]) -> torch.Tensor:
    return torch.tensor(values, dtype=torch.long)


class LogitsProcessors(Plugin):
    """Applies each request's ``repetition_penalty``, ``presence_penalty``, ``frequency_penalty``,
    ``logit_bias``, ``min_tokens``, ``bad_words`` and ``bad_words_ids`` to its logits rows, draft rows
    included. Per-request state (bad words tokenized once, incremental token counts) lives from
    ``check_request`` to ``request_finished``. Registered ``trylast``: it runs after the processors a pipeline
    names and the autoload ones."""

    name = "logits_processors"

    def __init__(self, options=None) -> None:
        super().__init__(options)
        self.tokenizer = None
        self.eos_token_ids: frozenset[int] = frozenset()
        self.requests: dict[int, RequestState] = {}  # seq_id -> state, while the request lives

    @hookimpl(trylast=True)
    def configure(self, context: PipelineContext) -> None:
        self.tokenizer = context.tokenizer
        self.eos_token_ids = frozenset(context.eos_token_ids)

    @hookimpl(trylast=True)
    def check_request(self, seq: Sequence) -> None:
        if seq.params.processes_logits:
            self.requests[seq.seq_id] = RequestState.build(seq.params, self.tokenizer, self.eos_token_ids)

    @hookimpl(trylast=True)
    def request_finished(self, seq: Sequence) -> None:
        self.requests.pop(seq.seq_id, None)

    def state(self, seq: Sequence) -> RequestState:
        """``seq``'s state, brought up to its current tokens (built here for a request never checked)."""
        state = self.requests.get(seq.seq_id)
        if state is None:
            state = self.requests[seq.seq_id] = RequestState.build(seq.params, self.tokenizer, self.eos_token_ids)
        state.catch_up(seq)
        return state

    @hookimpl(trylast=True)
    def process_logits(self, batch: VerifyInput) -> None:
        work = [(i, seq) for i, seq in enumerate(batch.seqs) if seq.params.processes_logits]
        if not work:
            return
        bias, repeat, penalty, ban = _Edits(), _Edits(), _Edits(), _Edits()
        for i, seq in work:
            params, state = seq.params, self.state(seq)
            for k in range(1 + len(batch.drafts[i])):
                row = batch.row_start[i] + k
                follows = batch.follows(i, k)
                bias.add(row, state.bias_ids, state.bias_values)
                if params.repetition_penalty != 1.0:
                    extra = [t for t in dict.fromkeys(follows) if t not in state.context]
                    ids = torch.cat([state.context_ids, _longs(extra)]) if extra else state.context_ids
                    repeat.add(row, ids, torch.full((len(ids),), float(params.repetition_penalty)))
                if params.presence_penalty or params.frequency_penalty:
                    penalty.add(row, *state.penalties(params, follows))
                banned = state.bans.banned(seq.token_ids, follows) if state.bans is not None else []
                if seq.num_output_tokens + len(follows) < params.min_tokens:
                    banned += state.stop_ids
                ban.add(row, _longs(banned))
        self._apply(batch.logits, bias, repeat, penalty, ban)

    @staticmethod
    def _apply(logits: torch.Tensor, bias: _Edits, repeat: _Edits, penalty: _Edits, ban: _Edits) -> None:
        """Each kind in one indexed read-modify-write over the batch. A ``(row, token)`` occurs at most once in
        the bias, repetition and penalty edits (no accumulation, so the result is exact and deterministic and a
        draft row gets bit for bit what the same context gets without drafts); bans may repeat (-inf is -inf)."""
        dev = logits.device
        found = bias.index(dev)
        if found is not None:
            where, added = found
            logits[where] = logits[where] + added
        found = repeat.index(dev)
        if found is not None:
            where, factor = found
            scores = logits[where]
            logits[where] = torch.where(scores < 0, scores * factor, scores / factor)
        found = penalty.index(dev)
        if found is not None:
            where, subtracted = found
            logits[where] = logits[where] - subtracted
        found = ban.index(dev)
        if found is not None:
            logits[found[0]] = float("-inf")
