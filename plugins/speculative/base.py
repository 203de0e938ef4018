"""Shared behaviour of drafter plugins: options, how deep each sequence drafts this step, statistics."""
from __future__ import annotations

import time
from dataclasses import dataclass

from tokenmill.hooktypes import KVHandle, PipelineContext, StepStats
from tokenmill.plugin import Plugin, hookimpl
from tokenmill.sequence import Sequence
from tokenmill.speculation import Draft
from tokenmill.speculation.budget import Acceptance, DraftCost, StepCost, plan_depths


# forwards timed at build: sequences x new tokens per sequence (1 + a draft's tokens), up to CALIBRATION_TOKENS
CALIBRATION_SEQS = (1, 2, 4, 8, 16, 32, 64)
CALIBRATION_WIDTHS = (1, 2, 3, 5, 9, 17)
CALIBRATION_TOKENS = 256


def as_draft(d) -> Draft:
    return d if isinstance(d, Draft) else Draft(list(d))


class DrafterPlugin(Plugin):
    """Subclasses implement :meth:`draft`; this class decides how deep each sequence drafts (0: not at all).

    With ``adaptive`` (the default) the depth comes from :func:`tokenmill.speculation.budget.plan_depths`: the
    step-cost curve (timed at build, its level following the engine's decode steps), this drafter's measured
    cost, and each sequence's measured acceptance, so a large batch drafts little or nothing and a sequence
    whose drafts keep failing stops drafting. Without it every sequence drafts ``num_speculative_tokens`` deep.
    """

    @dataclass(slots=True)
    class Options:
        num_speculative_tokens: int = 4
        adaptive: bool = True                   # plan each sequence's draft depth from measured costs and acceptance
        max_batch_size: int | None = None       # never speculate above this many producing sequences

        def __post_init__(self) -> None:
            if not 1 <= self.num_speculative_tokens <= 16:
                raise ValueError(f"num_speculative_tokens must be in 1..16, got {self.num_speculative_tokens}")
            if self.max_batch_size is not None and self.max_batch_size < 1:
                raise ValueError(f"max_batch_size must be >= 1, got {self.max_batch_size}")

    def __init__(self, options=None) -> None:
        super().__init__(options)
        self.batch_limit = self.options.max_batch_size  # a drafter may lower it where its fast path ends
        self.step_cost = StepCost()
        self.draft_cost = DraftCost()
        self.acceptance = Acceptance()
        self._drafted: dict[int, tuple[Sequence, int, int, int]] = {}  # seq_id -> (seq, tokens then, depth, kind)
        self.steps_on = 0
        self.steps_off = 0

    def draft(self, seqs: list[Sequence], depth: int, *, hidden: list, kv: KVHandle) -> list:
        """Drafts for ``seqs``, at most ``depth`` deep (deeper ones are cut): a list parallel to ``seqs`` of
        :class:`Draft` or token lists. ``hidden`` and ``kv`` are ``propose_tokens``' (``hidden`` narrowed to
        ``seqs``): the target's hidden state per sequence, and the KV handle to reserve the slots a draft model
        writes. Its time is measured as the drafter's cost."""
        raise NotImplementedError

    def cheap_drafts(self, seqs: list[Sequence]) -> list:
        """Drafts that cost nothing to make, found before planning (a copy by n-gram lookup): per sequence a
        :class:`Draft` or token list (empty: no draft), or None where :meth:`draft` has to make it."""
        return [None] * len(seqs)

    def draft_widths(self) -> list[int]:
        """Draft tokens at depth 1, 2, ...: a chain of ``num_speculative_tokens`` by default."""
        return [1] * self.options.num_speculative_tokens

    def calibrate(self, context: PipelineContext) -> None:
        """With ``adaptive``: time forwards of as many sequences (``CALIBRATION_SEQS``, up to ``max_num_seqs``) of
        as many tokens each (``CALIBRATION_WIDTHS``, up to one plus a full draft; at most ``CALIBRATION_TOKENS``
        in all, and always one token each) as drafting steps verify, into the step-cost curves, so the first
        plans rest on measured costs; the engine's own steps set their level from then on."""
        if not self.options.adaptive or context.time_forward is None:
            return
        widest = 1 + sum(self.draft_widths())
        seqs = [b for b in CALIBRATION_SEQS if b < context.limits.max_num_seqs] + [context.limits.max_num_seqs]
        for b in seqs:
            for w in CALIBRATION_WIDTHS:
                if w == 1 or (w <= widest and b * w <= CALIBRATION_TOKENS):
                    seconds = context.time_forward(b, w)
                    if seconds is not None:
                        self.step_cost.calibrate(b * w, seconds, num_seqs=b)

    @hookimpl
    def configure(self, context: PipelineContext) -> None:
        self.calibrate(context)

    def ready(self) -> bool:
        """Whether the drafter can draft yet (one preparing in the background is not: no speculation then)."""
        return True

    @hookimpl
    def propose_tokens(self, seqs: list[Sequence], num_tokens: int, hidden: list, kv: KVHandle):
        self._learn(seqs)
        too_many = self.batch_limit is not None and len(seqs) > self.batch_limit
        # a step that also computes prompt tokens drafts nothing: priced against such a step's own rate, set by its
        # prompt tokens, a draft row looks nearly free, while a token accepted there saves the batch only a row of a
        # later decode step (at 64 requests every draft fell in these steps, and they cost time; docs/benchmarks.md)
        prefilling = num_tokens > len(seqs)
        if not self.ready() or too_many or prefilling or not any(s.num_output_tokens > 0 for s in seqs):
            self.steps_off += 1
            return None
        cheap = [None if d is None else as_draft(d) for d in self.cheap_drafts(seqs)]
        costly = [d is None for d in cheap]
        depths = self._plan(seqs, cheap, costly, num_tokens)
        chosen = [i for i, d in enumerate(depths) if d]
        self.acceptance.relax([s.seq_id for s, d in zip(seqs, depths) if not d])
        made = [i for i in chosen if costly[i]]
        if made:
            deepest = max(depths[i] for i in made)
            t0 = time.perf_counter()
            drafts = self.draft([seqs[i] for i in made], deepest, hidden=[hidden[i] for i in made], kv=kv)
            for i, d in zip(made, drafts):
                cheap[i] = as_draft(d)
            self.draft_cost.observe(len(made), deepest, time.perf_counter() - t0)
        out = [Draft([]) for _ in seqs]
        for i in chosen:
            d = out[i] = cheap[i].cut(depths[i])
            if d.tokens:
                self._drafted[seqs[i].seq_id] = (seqs[i], seqs[i].num_tokens, max(d.depths()), d.kind)
        if not any(d.tokens for d in out):
            self.steps_off += 1
            return None
        self.steps_on += 1
        return out

    def _plan(self, seqs: list[Sequence], cheap: list[Draft | None], costly: list[bool], num_tokens: int) -> list[int]:
        """Each sequence's draft depth this step: planned with ``adaptive``, else the full depth."""
        widths = self.draft_widths()
        if not self.options.adaptive:
            return [len(widths)] * len(seqs)
        values = [self.acceptance.path_values(s.seq_id, len(widths), 0 if d is None else d.kind)
                  for s, d in zip(seqs, cheap)]
        made_depth = min(len(widths), self.options.num_speculative_tokens)  # how deep draft() goes
        for v, d in zip(values, cheap):  # no value past what a draft can hold: a copy's length, draft()'s depth
            n = made_depth if d is None else len(d.tokens)
            v[n:] = [0.0] * (len(v) - n)
        return plan_depths(values, widths, num_tokens, self.step_cost, self.draft_cost(sum(costly)), costly=costly)

    def _learn(self, seqs: list[Sequence]) -> None:
        """Count what the last drafts of these sequences earned: the tokens they gained since, less the
        target's own one; forget sequences that finished."""
        for s in seqs:
            seen = self._drafted.pop(s.seq_id, None)
            if seen is not None and s.num_tokens > seen[1]:
                _, before, depth, kind = seen
                self.acceptance.record(s.seq_id, depth, min(s.num_tokens - before - 1, depth), kind)
        for seq_id in [k for k, seen in self._drafted.items() if seen[0].is_finished]:
            del self._drafted[seq_id]
        if len(self.acceptance.counts) > 2 * len(seqs) + 64:  # sequences that finished stop being asked about
            live = {s.seq_id for s in seqs} | set(self._drafted)
            for seq_id in [k for k in self.acceptance.counts if k not in live]:
                self.acceptance.forget(seq_id)

    @hookimpl
    def step_end(self, stats: StepStats) -> None:
        self.step_cost.observe(stats.num_forward_tokens, stats.forward_s, decode=stats.num_prefill_tokens == 0,
                               num_seqs=stats.num_seqs)

    def budget_snapshot(self) -> dict:
        """What the planner has measured: step seconds by sequences and forwarded tokens (sequences 0: learned
        from the engine's steps, nothing calibrated), drafter seconds per depth by batch, the first position's
        acceptance over all sequences and each later one's given the one before."""
        cost = self.step_cost
        acc = self.acceptance
        curves = {b: cost.points(b) for b in sorted(cost.calibrated)} or {0: cost.points()}
        return {"step_s_by_seqs_and_tokens": {b: {round(n): round(t, 4) for n, t in zip(*curve)}
                                              for b, curve in curves.items()},
                "draft_s_per_depth_by_batch": {b: round(s, 5) for b, s in sorted(self.draft_cost.per_depth.items())},
                "acceptance_first_by_kind": {k: round(acc.overall_rate(k), 3) for k in sorted(acc.first)},
                "acceptance_given_previous_by_kind": {k: [round(acc.continuation(j, k), 3)
                                                          for j in range(2, len(d) + 2)]
                                                      for k, d in sorted(acc.deeper.items())}}
