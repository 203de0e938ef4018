"""``structured_output``: per-request grammars (JSON schema, any JSON object, regex, choice, EBNF) that mask the
logits, draft rows included, so a constrained request only ever emits what its grammar allows."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from tokenmill.hooktypes import PipelineContext, VerifyInput
from tokenmill.plugin import Plugin, hookimpl
from tokenmill.plugins.structured.closing import MAX_PLAN, SLACK, Closer
from tokenmill.plugins.structured.grammars import GrammarCache
from tokenmill.plugins.structured.masks import Bitmasks, pack, unpack
from tokenmill.plugins.structured.spec import DESCRIPTION, KEY, parse_spec
from tokenmill.sequence import Sequence


@dataclass(slots=True)
class RequestGrammar:
    """One request's matcher: it has accepted the request's first ``consumed`` output tokens; ``done`` once it
    accepted a stop token (from then on only stop tokens are allowed). ``budget`` is the request's
    ``max_tokens``; ``plan_len`` the length of the completion found at its newest row when ``plan_at`` tokens
    were left (0: none searched yet)."""

    matcher: Any
    budget: int
    json: bool = False  # JSON output: tokens with raw control characters are banned too
    consumed: int = 0
    done: bool = False
    plan_len: int = 0
    plan_at: int = 0


class StructuredOutput(Plugin):
    """Constrains requests that carry ``plugin_args["structured_output"]`` (see :data:`spec.FORMS`) with
    xgrammar. Specs are checked and compiled at submit (``check_request``; compiled grammars are cached by spec);
    each step every constrained row's bitmask is filled by the request's matcher and all of them are applied in
    one kernel call. When the grammar is complete only the EOS tokens are allowed, so the request ends with
    finish_reason "stop"; near ``max_tokens`` only tokens after which it can still be completed in time are
    (:mod:`closing`). Requests without the argument cost nothing. Registered by default, ``trylast``."""

    name = KEY

    @dataclass(slots=True)
    class Options:
        cache_size: int = 64  # compiled grammars kept (least recently used dropped first)

        def __post_init__(self) -> None:
            if not isinstance(self.cache_size, int) or self.cache_size < 1:
                raise ValueError(f"cache_size must be an integer >= 1, got {self.cache_size!r}")

    def __init__(self, options: Any = None) -> None:
        super().__init__(options)
        self.grammars: GrammarCache | None = None
        self.masks: Bitmasks | None = None
        self.closer: Closer | None = None
        self.states: dict[int, RequestGrammar] = {}  # seq_id -> matcher of a constrained request
        self.tokenizer = None
        self.vocab = 0
        self.stop_ids: frozenset[int] = frozenset()

    @hookimpl(trylast=True)
    def configure(self, context: PipelineContext) -> None:
        config = getattr(context.model, "config", None)
        vocab = getattr(config, "vocab_size", None) or len(context.tokenizer)
        eos = sorted(context.eos_token_ids) or [context.tokenizer.eos_token_id]
        self.tokenizer, self.stop_ids = context.tokenizer, frozenset(eos)
        self.grammars = GrammarCache(context.tokenizer, vocab, eos, self.options.cache_size)
        self.vocab = vocab

    @hookimpl(trylast=True)
    def request_args(self) -> dict[str, str]:
        return {KEY: DESCRIPTION}

    @hookimpl(trylast=True)
    def check_request(self, seq: Sequence) -> None:
        value = seq.params.plugin_args.get(KEY)
        if value is None:
            return
        spec = parse_spec(value)
        if seq.params.min_tokens:
            raise ValueError(f"{KEY} cannot be combined with min_tokens ({seq.params.min_tokens}): once the grammar "
                             "is complete only EOS is allowed, which min_tokens bans; drop min_tokens (bound the "
                             "output's size in the grammar, e.g. minLength / minItems)")
        if self.grammars is None:
            raise ValueError(f"{KEY} is unavailable: the pipeline was not configured")
        compiled = self.grammars.get(spec)
        if self.masks is None:
            self.masks = Bitmasks(self.grammars.xgr, self.vocab, sorted(self.stop_ids))
            self.closer = Closer(self.grammars.info.decoded_vocab, self.vocab, min(self.stop_ids), self.masks.words)
        self.states[seq.seq_id] = RequestGrammar(self.grammars.matcher(compiled), seq.params.max_tokens,
                                                 spec.kind.startswith("json"))

    @hookimpl(trylast=True)
    def request_finished(self, seq: Sequence) -> None:
        self.states.pop(seq.seq_id, None)

    @hookimpl(trylast=True)
    def shutdown(self) -> None:
        self.states.clear()

    @hookimpl(trylast=True)
    def process_logits(self, batch: VerifyInput) -> None:
        if not self.states:
            return
        work = [(i, st) for i, seq in enumerate(batch.seqs) if (st := self.states.get(seq.seq_id)) is not None]
        if not work:
            return
        masks = self.masks.rows(batch.logits.shape[0])
        rows: list[int] = []  # logits rows whose mask row is filled
        json_rows: list[int] = []
        for i, st in work:
            self._catch_up(st, batch.seqs[i])
            n = len(rows)
            self._fill(st, batch, i, masks, rows)
            if st.json:
                json_rows += rows[n:]
        if json_rows:
            index = torch.tensor(json_rows)
            masks[index] = masks[index] & self.grammars.json_safe
        if rows:
            self.masks.apply(batch.logits, masks, rows)

    def _catch_up(self, st: RequestGrammar, seq: Sequence) -> None:
        """Advance the matcher over the output tokens the engine appended since the last step."""
        if st.consumed > seq.num_output_tokens:  # tokens were taken back: start again from the prompt
            st.matcher.reset()
            st.consumed, st.done = 0, False
        for tok in seq.token_ids[seq.prompt_len + st.consumed:]:
            if st.done:
                ok = tok in self.stop_ids
            else:
                ok = st.matcher.accept_token(tok)
                st.done = ok and st.matcher.is_terminated()
            if not ok:
                text = self.tokenizer.decode([tok]) if self.tokenizer is not None else "?"
                raise RuntimeError(f"request '{seq.request_id}' emitted token {tok} ({text!r}) at output position "
                                   f"{st.consumed}, which its {KEY} grammar does not allow (its logits were not "
                                   "masked, or a later processor unbanned it)")
            st.consumed += 1

    def _fill(self, st: RequestGrammar, batch: VerifyInput, i: int, masks: torch.Tensor, rows: list[int]) -> None:
        """Fill the bitmask of each reachable row of sequence ``i`` (appending to ``rows``): the matcher walks to
        the row along ``batch.follows(i, k)`` from where the last row left it. Rows after a draft token the
        grammar refuses cannot be reached (verification rejects that token) and stay as they are."""
        m, start, chain = st.matcher, batch.row_start[i], batch.tree(i) is None
        path: list[int] = []  # draft tokens walked beyond the request's tokens
        fed: list[bool] = []  # whether the matcher accepted path[j] (False: a stop token after the end)
        try:
            for k in range(1 + len(batch.drafts[i])):
                want = batch.follows(i, k) if k else []
                same = 0
                while same < min(len(path), len(want)) and path[same] == want[same]:
                    same += 1
                if same < len(path):
                    self._rollback(m, sum(fed[same:]))
                    del path[same:], fed[same:]
                if not self._walk(st, want[same:], path, fed):
                    if chain:
                        break  # every later row of a chain comes after the refused token
                    continue
                if st.done or m.is_terminated():
                    masks[start + k] = self.masks.stop_only
                elif not m.fill_next_token_bitmask(masks, start + k):
                    continue  # every token is allowed here
                else:
                    self._close_in_time(st, batch.logits[start + k], masks, start + k, len(path))
                rows.append(start + k)
        finally:  # the matcher is left where the request's own tokens put it
            self._rollback(m, sum(fed))

    def _close_in_time(self, st: RequestGrammar, row: torch.Tensor, masks: torch.Tensor, r: int, depth: int) -> None:
        """Near the end of the budget, narrow mask row ``r`` (``depth`` draft tokens past the request's own) to
        the tokens after which the grammar can still be completed in the tokens left (:mod:`closing`). A
        completion is searched for only where it might not fit: one token lengthens it by at most ``SLACK``."""
        left = st.budget - st.consumed - depth  # tokens that may still be emitted, this row's included
        if left <= 0:
            return
        if st.plan_at and st.plan_len + SLACK * (st.plan_at - left + 1) < left:
            return
        safe = self.grammars.json_safe if st.json else None
        plan = self.closer.plan(st.matcher, safe)
        if not depth:
            st.plan_len, st.plan_at = (MAX_PLAN if plan is None else len(plan)), left
        if plan is None or len(plan) + SLACK < left:
            return
        words = masks[r] if safe is None else masks[r] & safe
        keep = self.closer.narrow(st.matcher, row, unpack(words), left, plan, safe, self.stop_ids)
        masks[r] = pack(keep)

    def _walk(self, st: RequestGrammar, tokens: list[int], path: list[int], fed: list[bool]) -> bool:
        """Advance along draft ``tokens`` (extending ``path`` / ``fed``); False at the first one the grammar refuses."""
        m = st.matcher
        for tok in tokens:
            if st.done or m.is_terminated():  # past the end: stop tokens only, and the matcher takes none
                accepted, fed_now = tok in self.stop_ids, False
            else:
                accepted = fed_now = m.accept_token(tok)
            if not accepted:
                return False
            path.append(tok)
            fed.append(fed_now)
        return True

    @staticmethod
    def _rollback(matcher, n: int) -> None:
        if n:
            matcher.rollback(n)
