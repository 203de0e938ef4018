"""The engine loop: schedule -> propose -> forward -> process logits -> verify -> update -> observe, all
through hooks."""
from __future__ import annotations

import itertools
import warnings
import time
from collections import deque

import torch

from tokenmill.engine.admission import check_plugin_args, check_tokens, declared_args
from tokenmill.engine.detokenizer import IncrementalDetokenizer
from tokenmill.engine.kv_handle import EngineKV
from tokenmill.engine.logits import process_logits, raw_rows, token_logprobs
from tokenmill.engine.outputs import RequestOutput, StreamChunk, TokenLogprob
from tokenmill.engine.stats import EngineStats
from tokenmill.errors import RequestError
from tokenmill.model import ModelRunner
from tokenmill.hooktypes import (ScheduledSeq, ScheduleInput, SchedulerLimits, SchedulerOutput, StepStats,
                                 VerifyInput)
from tokenmill.host import HookFailure, answered_by, blame, call_each
from tokenmill.params import SamplingParams
from tokenmill.speculation import Draft, compaction, tree_path
from tokenmill.sequence import Sequence, SeqStatus


class Engine:
    """Owns request state and runs steps. Not thread-safe: one thread drives it (the service has a loop)."""

    def __init__(self, pm, runner: ModelRunner, tokenizer, limits: SchedulerLimits, *, eos_token_ids: set[int],
                 seed: int = 0) -> None:
        self.pm = pm
        self.hook = pm.hook
        self.runner = runner
        self.tokenizer = tokenizer
        self.limits = limits
        self.eos_token_ids = eos_token_ids
        self.kv = EngineKV(self.hook, runner.pool.block_size)
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []
        self.requests: dict[str, Sequence] = {}
        self._ids = itertools.count()
        self._seed_rng = torch.Generator().manual_seed(seed)
        self.vocab_size = runner.config.vocab_size
        self.stats = EngineStats(limits.max_num_batched_tokens)
        self.step_count = 0
        self.idle = False  # the last step scheduled nothing
        self._outbox: dict[str, StreamChunk] = {}  # chunks of requests finished between steps (abort)
        # per running sequence: the final hidden state its last token was predicted from (propose_tokens' hidden)
        self._hidden: dict[int, torch.Tensor] = {}
        self.request_args = declared_args(pm)  # plugin_args keys the plugins declared -> description

    # ----------------------------------------------------------------- requests
    def add_request(self, prompt_token_ids: list[int], params: SamplingParams | None = None,
                    request_id: str | None = None) -> Sequence:
        """Queue a request. Invalid input raises :class:`RequestError` and leaves the engine untouched."""
        params = params or SamplingParams()
        ids = list(prompt_token_ids)
        check_tokens(ids, params, vocab_size=self.vocab_size, limits=self.limits,
                     kv_capacity=self.kv.capacity_tokens())
        rid = request_id if request_id is not None else f"req-{next(self._ids)}"
        if rid in self.requests:
            raise RequestError(f"request id '{rid}' is already in use")
        seed = params.seed if params.seed is not None else int(torch.randint(0, 2**62, (1,),
                                                                            generator=self._seed_rng))
        seq = Sequence(seq_id=next(self._ids), request_id=rid, prompt_token_ids=ids, params=params,
                       arrival_time=time.perf_counter(), seed=seed)
        check_plugin_args(self.pm, seq, self.request_args)
        seq.detok = IncrementalDetokenizer(self.tokenizer)
        self.requests[rid] = seq
        self.waiting.append(seq)
        self.stats.on_arrival()
        return seq

    def abort(self, request_id: str) -> bool:
        """Stop a request now and free its KV; False if it is unknown or already finished."""
        seq = self.requests.get(request_id)
        if seq is None or seq.is_finished:
            return False
        self._finish(seq, "abort")
        return True

    def pop_finished(self, request_id: str) -> RequestOutput:
        seq = self.requests.pop(request_id)
        assert seq.is_finished
        return RequestOutput.from_seq(seq)

    def has_unfinished(self) -> bool:
        return bool(self.waiting or self.running)

    # ----------------------------------------------------------------- the step
    def step(self) -> list[StreamChunk]:
        """Run one engine step; return the new output of every request that produced some or finished.

        The phases: schedule -> propose drafts -> forward -> process logits -> verify -> update -> observe.
        """
        t0 = time.perf_counter()
        chunks, self._outbox = self._outbox, {}
        plan = self._schedule(t0, chunks)
        if plan is None:
            return list(chunks.values())
        producing = [s for s in plan.scheduled if s.num_new_tokens == s.seq.num_uncomputed_tokens]
        # a decode runs one token of a sequence whose prompt is all computed (not a 1-token prefill chunk)
        num_decode = sum(1 for s in plan.scheduled
                         if s.num_new_tokens == 1 and s.seq.num_computed_tokens >= s.seq.prompt_len)
        drafts = self._propose([s.seq for s in producing], plan.num_scheduled_tokens)
        t_fwd = time.perf_counter()
        forwarded = self._forward(plan, producing, drafts, chunks)
        if forwarded is None:
            return list(chunks.values())
        verify, hidden = forwarded
        raw = raw_rows(verify)
        process_logits(self.hook, verify, lambda i, error: self._finish(verify.seqs[i], "error", error=error,
                                                                        chunks=chunks))
        accepted = self._verify(verify, chunks) if producing else []
        forward_s = time.perf_counter() - t_fwd
        counts = self._update(plan, verify, hidden, accepted, raw, chunks)
        self._observe(plan, num_decode, t0, forward_s, sum(len(d.tokens) for d in drafts), *counts)
        return list(chunks.values())

    def _schedule(self, t0: float, chunks: dict[str, StreamChunk]) -> SchedulerOutput | None:
        """Ask the scheduler; apply its rejections and preemptions; None when nothing runs this step."""
        shown = (tuple(self.waiting), tuple(self.running))
        try:
            plan = self.hook.schedule(state=ScheduleInput(*shown, self.limits, self.kv, t0))
            assert plan is not None, "no plugin answered schedule"
        except Exception as exc:  # whom it had scheduled is unknown: fail what it saw, free its KV, carry on
            error = str(blame(exc, "schedule"))
            for seq in shown[0] + shown[1]:
                self._finish(seq, "error", error=error, chunks=chunks)
            self.idle = False
            return None
        for seq, reason in plan.rejected:
            self._finish(seq, "error", error=reason, chunks=chunks)
        for seq in plan.preempted:
            self._preempt(seq)
        self.idle = not plan.scheduled
        if not plan.scheduled:  # a scheduler may hold back on purpose (e.g. a batching window)
            return None
        for item in plan.scheduled:
            seq = item.seq
            if seq.status is SeqStatus.WAITING:
                self.waiting.remove(seq)
                self.running.append(seq)
                seq.status = SeqStatus.RUNNING
                if seq.first_scheduled_time is None:
                    seq.first_scheduled_time = t0
        return plan

    def _forward(self, plan: SchedulerOutput, producing: list[ScheduledSeq], drafts: list[Draft],
                 chunks: dict[str, StreamChunk]) -> tuple[VerifyInput, torch.Tensor] | None:
        """Run the model over every scheduled token (drafts after their sequence's tokens); the producing rows'
        logits as a :class:`VerifyInput` and their hidden states. None if the forward failed (its requests fail)."""
        items, trees = [], {}
        draft_of = {s.seq.seq_id: d for s, d in zip(producing, drafts)}
        for s in plan.scheduled:
            seq = s.seq
            d = draft_of.get(seq.seq_id)
            c = seq.num_computed_tokens
            if d is not None and d.parents is not None:
                trees[len(items)] = d.parents
            items.append((seq.token_ids[c:c + s.num_new_tokens] + (d.tokens if d else []), c, seq.block_table,
                          0 if d is None else 1 + len(d.tokens)))
        try:
            out = self.runner.run(items, trees=trees)
            tree = any(d.parents is not None for d in drafts)
            verify = VerifyInput([s.seq for s in producing], out.logits, [], [d.tokens for d in drafts],
                                 [d.parents for d in drafts] if tree else [])
            row = 0
            for d in drafts:
                verify.row_start.append(row)
                row += 1 + len(d.tokens)
        except Exception as exc:  # a failing forward fails its step's requests, never the engine
            for s in plan.scheduled:
                self._finish(s.seq, "error", error=self._error(exc), chunks=chunks)
            return None
        return verify, out.hidden

    def _update(self, plan: SchedulerOutput, verify: VerifyInput, hidden: torch.Tensor, accepted: list[list[int]],
                raw: dict[int, torch.Tensor], chunks: dict[str, StreamChunk]) -> tuple[int, int, int]:
        """Advance every scheduled sequence by what it computed and emitted; (generated, drafted, accepted)."""
        index = {seq.seq_id: i for i, seq in enumerate(verify.seqs)}
        paths = self._tree_paths(verify, accepted, chunks) if verify.parents else {}
        generated = num_draft = num_accepted = 0
        for s in plan.scheduled:
            seq = s.seq
            if seq.is_finished:
                continue
            i = index.get(seq.seq_id)
            if i is None:  # a middle prefill chunk
                seq.num_computed_tokens += s.num_new_tokens
                continue
            toks, drafted, tree = accepted[i], verify.drafts[i], verify.tree(i)
            try:
                if not 1 <= len(toks) <= 1 + len(drafted):
                    raise RuntimeError(f"verify_tokens returned {len(toks)} tokens for {len(drafted)} drafts "
                                       "(allowed: 1 to drafts + 1)")
                rows = [0] + [j + 1 for j in paths[i]] if i in paths else list(range(len(toks)))
                self._hidden[seq.seq_id] = hidden[verify.row_start[i] + rows[-1]]
                seq.num_computed_tokens += s.num_new_tokens + len(toks) - 1
                if drafted:  # a tree counts the positions it speculated on (its depth)
                    depth = len(drafted) if tree is None else max(Draft(drafted, parents=tree).depths())
                    num_draft += depth
                    num_accepted += len(toks) - 1
                    self.stats.on_drafts(depth, len(toks) - 1)
                logprobs = None if i not in raw else token_logprobs(raw[i], rows, toks, seq.params.logprobs)
                generated += self._append(seq, toks, chunks, logprobs)
                if drafted and not seq.is_finished:
                    self.hook.trim_kv(seq=seq)
                    keep = -(-seq.num_computed_tokens // self.kv.block_size)
                    del seq.block_table[keep:]  # the blocks trim_kv released are not the sequence's any more
            except Exception as exc:
                self._finish(seq, "error", error=self._error(exc), chunks=chunks)
        return generated, num_draft, num_accepted

    def _observe(self, plan: SchedulerOutput, num_decode: int, t0: float, forward_s: float, draft_tokens: int,
                 generated: int, num_draft: int, num_accepted: int) -> None:
        self.step_count += 1
        stats = StepStats(self.step_count, len(plan.scheduled), plan.num_scheduled_tokens - num_decode,
                          num_decode, generated, self.limits.max_num_batched_tokens, time.perf_counter() - t0,
                          forward_s, len(plan.preempted), len(self.running), len(self.waiting), num_draft,
                          num_accepted, plan.num_scheduled_tokens + draft_tokens)
        self.stats.on_step(stats)
        for failure in call_each(self.pm, "step_end", stats=stats):  # an observer never breaks a step
            self._warn(failure, "its step_end is skipped for this step")

    def _verify(self, verify: VerifyInput, chunks: dict[str, StreamChunk]) -> list[list[int]]:
        """Run ``verify_tokens``; if it raises, retry sequence by sequence so only the culprit fails."""
        try:
            accepted = self.hook.verify_tokens(batch=verify)
            assert accepted is not None, "no plugin answered verify_tokens"
            return accepted
        except Exception:
            pass
        accepted = []
        for i, seq in enumerate(verify.seqs):
            n = 1 + len(verify.drafts[i])
            start = verify.row_start[i]
            one = VerifyInput([seq], verify.logits[start:start + n], [0], [verify.drafts[i]],
                              [verify.tree(i)] if verify.parents else [])
            try:
                accepted.append(self.hook.verify_tokens(batch=one)[0])
            except Exception as exc:
                self._finish(seq, "error", error=self._error(exc), chunks=chunks)
                accepted.append([])
        return accepted

    def _tree_paths(self, verify: VerifyInput, accepted: list[list[int]],
                    chunks: dict[str, StreamChunk]) -> dict[int, list[int]]:
        """For each tree draft: the accepted path's draft indices; its K/V moves to consecutive positions."""
        paths = {}
        for i, seq in enumerate(verify.seqs):
            parents = verify.tree(i)
            if parents is None or not accepted[i] or seq.is_finished:
                continue
            try:
                path = tree_path(verify.drafts[i], parents, accepted[i])
                start = seq.num_computed_tokens + seq.num_uncomputed_tokens  # the first draft's slot
                src, dst = compaction(path, start)
                if src:
                    self.runner.move_kv(seq.block_table, src, dst)
                paths[i] = path
            except Exception as exc:  # a verifier answering off the tree fails its request alone
                self._finish(seq, "error", error=f"verify_tokens left the draft tree: {type(exc).__name__}: {exc}",
                             chunks=chunks)
        return paths

    @staticmethod
    def _error(exc: Exception) -> str:
        """A failed request's error: ``plugin 'NAME' failed in HOOK: Type: message`` when a hook raised it."""
        failure = blame(exc, "")
        return str(failure) if failure.plugin is not None else f"{type(exc).__name__}: {exc}"

    @staticmethod
    def _warn(failure: HookFailure, consequence: str) -> None:
        """Report a hook failure that costs no request: a RuntimeWarning naming the plugin, every time (the
        warnings filters decide what is shown; by default each distinct message once)."""
        warnings.warn(f"{failure}; {consequence}", RuntimeWarning, stacklevel=3)

    # ----------------------------------------------------------------- helpers
    def _propose(self, seqs: list[Sequence], num_tokens: int) -> list[Draft]:
        """Ask the drafters; reserve KV for what they propose (dropping drafts that do not fit)."""
        if not seqs:
            return []
        try:
            proposals = self.hook.propose_tokens(seqs=seqs, num_tokens=num_tokens, kv=self.kv,
                                                 hidden=[self._hidden.get(s.seq_id) for s in seqs])
        except Exception as exc:  # a failing drafter costs speed, not requests
            self._warn(blame(exc, "propose_tokens"), "this step runs without drafts")
            proposals = None
        if proposals is None:
            return [Draft([]) for _ in seqs]
        out = []
        for seq, d in zip(seqs, proposals):
            d = d if isinstance(d, Draft) else Draft(list(d or []))
            room = max(0, min(seq.params.max_tokens - seq.num_output_tokens - 1,
                              self.limits.max_model_len - seq.num_tokens - 1))
            try:
                d = d.cut(room)
            except Exception as exc:  # a malformed draft costs speed, not the request
                self._warn(HookFailure(answered_by(self.pm, "propose_tokens"), "propose_tokens", exc),
                           "its draft is dropped for this step")
                d = Draft([])
            k = len(d.tokens)
            if k and not self.kv.allocate(seq, seq.num_uncomputed_tokens + k):
                d = Draft([])
            out.append(d)
        return out

    def _append(self, seq: Sequence, toks: list[int], chunks: dict[str, StreamChunk],
                logprobs: list[TokenLogprob] | None = None) -> int:
        now = time.perf_counter()
        if seq.first_token_time is None:
            seq.first_token_time = now
        chunk = chunks.setdefault(seq.request_id, StreamChunk(seq.request_id, ""))
        params = seq.params
        count = 0
        if logprobs is not None and chunk.logprobs is None:
            chunk.logprobs = []
        for j, tok in enumerate(toks):
            seq.token_ids.append(tok)
            chunk.token_ids.append(tok)
            if logprobs is not None:
                seq.logprobs.append(logprobs[j])
                chunk.logprobs.append(logprobs[j])
            count += 1
            seq.text += seq.detok.add(tok)
            if params.stop and self._cut_stop(seq):
                self._finish(seq, "stop", chunks=chunks, flush=False)
                break
            reason = None
            if (tok in self.eos_token_ids and not params.ignore_eos) or tok in params.stop_token_ids:
                reason = "stop"
            elif seq.num_output_tokens >= params.max_tokens or seq.num_tokens >= self.limits.max_model_len:
                reason = "length"
            if reason is not None:
                self._finish(seq, reason, chunks=chunks)
                break
        self.stats.on_tokens(count, first=seq.num_output_tokens == count)
        if not seq.is_finished:
            hold = max((len(s) for s in params.stop), default=1) - 1
            self._emit(seq, chunk, len(seq.text) - hold)
        return count

    @staticmethod
    def _cut_stop(seq: Sequence) -> bool:
        tail_from = max(0, seq.emitted_len - max(len(s) for s in seq.params.stop))
        hits = [i for i in (seq.text.find(s, tail_from) for s in seq.params.stop) if i >= 0]
        if hits:
            seq.text = seq.text[:min(hits)]
            return True
        return False

    @staticmethod
    def _emit(seq: Sequence, chunk: StreamChunk, upto: int) -> None:
        if upto > seq.emitted_len:
            chunk.text += seq.text[seq.emitted_len:upto]
            seq.emitted_len = upto

    def _free(self, seq: Sequence, reusable: bool = True) -> None:
        """Give ``seq``'s KV back through every ``free_kv`` implementation, even if one of them raises."""
        self._hidden.pop(seq.seq_id, None)
        for failure in call_each(self.pm, "free_kv", seq=seq, reusable=reusable):
            self._warn(failure, f"request '{seq.request_id}' may keep KV blocks it held")
        seq.block_table = []

    def _preempt(self, seq: Sequence) -> None:
        if seq.status is not SeqStatus.RUNNING:  # only running sequences can be preempted
            return
        self._free(seq)
        seq.num_computed_tokens = 0
        seq.num_preemptions += 1
        seq.status = SeqStatus.WAITING
        self.running.remove(seq)
        self.waiting.appendleft(seq)
        self.stats.preemptions += 1

    def _finish(self, seq: Sequence, reason: str, *, error: str | None = None,
                chunks: dict[str, StreamChunk] | None = None, flush: bool = True) -> None:
        if seq.is_finished:
            return
        if seq.status is SeqStatus.RUNNING:
            self.running.remove(seq)
        elif seq in self.waiting:
            self.waiting.remove(seq)
        self._free(seq, reusable=reason != "error")
        seq.finish_reason = reason
        for failure in call_each(self.pm, "request_finished", seq=seq):
            self._warn(failure, f"it may keep state for request '{seq.request_id}'")
        if flush:
            seq.text += seq.detok.flush()
        seq.status = SeqStatus.FINISHED
        seq.finish_reason = reason
        seq.error = error
        seq.finish_time = time.perf_counter()
        self.stats.on_finish(reason)
        chunk = (self._outbox if chunks is None else chunks).setdefault(seq.request_id,
                                                                       StreamChunk(seq.request_id, ""))
        self._emit(seq, chunk, len(seq.text))
        chunk.finished = True
        chunk.output = RequestOutput.from_seq(seq)
