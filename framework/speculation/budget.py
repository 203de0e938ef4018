"""How deep to draft, per sequence, at this batch: the measured cost of a step against the measured acceptance.

Speculation pays while verifying a few more tokens costs little (a memory-bound decode step) and loses once
the batch is large enough for every extra row to cost compute. Rather than switching on a guess, a drafter
keeps three measurements and plans each step from them:

- :class:`StepCost`: seconds a forward of ``n`` tokens takes: a curve timed at build whose level follows the
  engine's decode steps, or (where nothing could be timed at build) learned from every step the engine ran;
- :class:`DraftCost`: seconds the drafter itself spends per draft position, per batch size;
- :class:`Acceptance`: how likely a draft is to be accepted through each depth: the first position per
  sequence (its recent drafts, pulled toward the drafter's overall rate), the later ones per depth.

:func:`plan_depths` then gives every sequence the draft depth that maximises the step's expected tokens per
second. Where a cost was never measured it is extrapolated pessimistically (linearly past the largest step
seen, linearly in the batch for the drafter), so an unknown regime is not speculated into blindly.
"""
from __future__ import annotations

import bisect
import math
from typing import Sequence as Seq

PER_OCTAVE = 4  # StepCost buckets: four per doubling of the token count


class StepCost:
    """Seconds a forward of ``n`` tokens over ``b`` sequences takes.

    Two sources: curves timed at build (:meth:`calibrate`: per sequence count, seconds by token count), whose
    shape holds what extra tokens cost on this machine, and the engine's own steps (:meth:`observe`). A draft
    adds tokens to a sequence already in the step, not sequences: with a curve per sequence count, the
    marginal cost of drafts is that of more rows for the same sequences (their attention over the context is
    paid once), which one curve over sequences of one token each would overstate. With calibrated curves,
    decode steps set only their level (a moving average of measured over calibrated seconds: real contexts
    and batches cost more than the scratch forwards, and more as sequences grow). Without them, every step
    goes into moving averages per token-count bucket, interpolated.
    """

    def __init__(self, alpha: float = 0.3) -> None:
        self.alpha = alpha
        self.buckets: dict[int, list[float]] = {}  # observed: bucket -> [mean tokens, mean seconds]
        self.calibrated: dict[int, dict[int, list[float]]] = {}  # timed at build: seqs -> bucket -> [tokens, s]
        self.level: float | None = None  # measured / calibrated seconds of decode steps, moving average
        self._curves: dict[int, tuple[list[float], list[float]]] = {}  # seqs -> monotone(calibrated), cached

    @staticmethod
    def bucket(num_tokens: float) -> int:
        return round(math.log2(num_tokens) * PER_OCTAVE)

    def calibrate(self, num_tokens: int, seconds: float, num_seqs: int = 1) -> None:
        """A forward of ``num_tokens`` tokens spread evenly over ``num_seqs`` sequences, timed at build."""
        if num_tokens > 0 and seconds > 0 and num_seqs > 0:
            self.calibrated.setdefault(num_seqs, {})[self.bucket(num_tokens)] = [float(num_tokens), seconds]
            self._curves = {}

    def _calibrated_curve(self, num_seqs: int) -> tuple[list[float], list[float]]:
        """The unscaled curve of the calibrated sequence count nearest ``num_seqs`` (log scale; ties: larger)."""
        seqs = min(self.calibrated, key=lambda b: (abs(math.log2(b) - math.log2(max(num_seqs, 1))), -b))
        if seqs not in self._curves:
            self._curves[seqs] = monotone(self.calibrated[seqs].values())
        return self._curves[seqs]

    def observe(self, num_tokens: int, seconds: float, *, decode: bool = True, num_seqs: int = 1) -> None:
        """A step's forward over ``num_seqs`` sequences: ``decode`` when it ran no prefill tokens (only those
        set a calibrated level)."""
        if num_tokens <= 0 or seconds <= 0:
            return
        if self.calibrated:
            if decode:
                ns, ts = self._calibrated_curve(num_seqs)
                r = seconds / interpolate(ns, ts, bisect.bisect_right(ns, num_tokens), num_tokens)
                self.level = r if self.level is None else self.level + self.alpha * (r - self.level)
            return
        b = self.bucket(num_tokens)
        cur = self.buckets.get(b)
        if cur is None:
            self.buckets[b] = [float(num_tokens), seconds]
        else:
            cur[0] += self.alpha * (num_tokens - cur[0])
            cur[1] += self.alpha * (seconds - cur[1])

    def points(self, num_seqs: int = 1) -> tuple[list[float], list[float]]:
        """Token counts and seconds at ``num_seqs`` sequences, both ascending: a cost never falls as tokens
        grow (running maximum)."""
        if self.calibrated:
            ns, ts = self._calibrated_curve(num_seqs)
            level = self.level or 1.0
            return ns, [t * level for t in ts]
        return monotone(self.buckets.values())

    def __call__(self, num_tokens: float, num_seqs: int = 1) -> float | None:
        """The expected seconds; None while nothing was measured. Outside the measured range the cost is taken
        as proportional to the tokens (from the nearest measured step): pessimistic for drafts past the largest
        step, and below the smallest it makes a step without drafts look cheap, so a drafter that has only ever
        run with drafts stops once and measures the plain step instead of assuming its drafts are free."""
        ns, ts = self.points(num_seqs)
        return interpolate(ns, ts, bisect.bisect_right(ns, num_tokens), num_tokens) if ns else None


def monotone(points) -> tuple[list[float], list[float]]:
    """``(tokens, seconds)`` pairs sorted by tokens, the seconds made non-decreasing (running maximum)."""
    ns, ts = [], []
    for n, t in sorted(points):
        ns.append(n)
        ts.append(max(t, ts[-1]) if ts else t)
    return ns, ts


def interpolate(ns: list[float], ts: list[float], i: int, n: float) -> float:
    """The cost of ``n`` tokens on the curve ``(ns, ts)``, ``i`` being ``bisect_right(ns, n)``: linear between
    measured points, proportional to the tokens outside them."""
    if i == 0:
        return ts[0] * n / ns[0]
    if i == len(ns):
        return ts[-1] * n / ns[-1]
    return ts[i - 1] + (n - ns[i - 1]) / (ns[i] - ns[i - 1]) * (ts[i] - ts[i - 1])


class DraftCost:
    """Seconds the drafter spends per draft position, per batch-size bucket (powers of two)."""

    def __init__(self, alpha: float = 0.3) -> None:
        self.alpha = alpha
        self.per_depth: dict[int, float] = {}

    @staticmethod
    def bucket(batch: int) -> int:
        return 1 << max(0, math.ceil(math.log2(max(batch, 1))))

    def observe(self, batch: int, depth: int, seconds: float) -> None:
        if depth <= 0 or seconds < 0:
            return
        b, s = self.bucket(batch), seconds / depth
        self.per_depth[b] = s if b not in self.per_depth else self.per_depth[b] + self.alpha * (s - self.per_depth[b])

    def __call__(self, batch: int) -> float:
        """Seconds per draft position at ``batch``: measured; between two measured buckets, interpolated; past
        the largest, scaled up linearly in the batch; below the smallest, the smallest's; 0 while nothing was
        measured (drafting once measures it)."""
        b = self.bucket(batch)
        if b in self.per_depth:
            return self.per_depth[b]
        smaller = [k for k in self.per_depth if k < b]
        larger = [k for k in self.per_depth if k > b]
        if smaller and larger:
            lo, hi = max(smaller), min(larger)
            return self.per_depth[lo] + (b - lo) / (hi - lo) * (self.per_depth[hi] - self.per_depth[lo])
        if smaller:
            return self.per_depth[max(smaller)] * b / max(smaller)
        return self.per_depth[min(larger)] if larger else 0.0


class Acceptance:
    """How likely each draft position is to be accepted: per sequence for the first position, per depth for the
    positions after it, each per kind of draft (:attr:`Draft.kind`).

    Whether a sequence's first draft token lands depends on the text (a copy that runs on, a chat answer that
    wanders), so it is counted per sequence; whether the next ones land once the first did is counted per depth
    over all sequences (a prompt-lookup copy that started right mostly goes on: a single geometric rate would
    undervalue depth). A draft of depth ``d`` with ``a`` accepted tests positions ``1 .. min(a + 1, d)`` and
    accepts ``1 .. a``. Counts decay with every draft so the estimates follow the text; ``prior``
    pseudo-drafts at the kind's overall first-position rate stand in for a sequence's own history until it has
    one. Steps without drafts :meth:`relax` the estimates back toward ``initial``, so a drafter switched off by
    a bad stretch looks again later instead of never.
    """

    def __init__(self, *, initial: float = 0.5, prior: float = 2.0, decay: float = 0.8,
                 overall_decay: float = 0.97) -> None:
        self.initial, self.prior, self.decay, self.overall_decay = initial, prior, decay, overall_decay
        self.first: dict[int, list[float]] = {}  # kind -> decayed (accepted, tested) of first positions
        self.deeper: dict[int, list[list[float]]] = {}  # kind -> [depth - 2] -> (accepted, tested) given the last
        self.counts: dict[int, dict[int, list[float]]] = {}  # seq_id -> kind -> its first positions' counts

    def _first(self, kind: int) -> list[float]:
        return self.first.setdefault(kind, [2 * self.initial, 2.0])

    def record(self, seq_id: int, depth: int, accepted: int, kind: int = 0) -> None:
        assert 0 <= accepted <= depth and depth >= 1
        hit = float(accepted >= 1)
        own = self.counts.setdefault(seq_id, {}).setdefault(kind, [0.0, 0.0])
        for c, decay in ((own, self.decay), (self._first(kind), self.overall_decay)):
            c[0] = c[0] * decay + hit
            c[1] = c[1] * decay + 1
        deeper = self.deeper.setdefault(kind, [])
        for j in range(2, min(accepted + 1, depth) + 1):
            while len(deeper) < j - 1:  # a depth tested for the first time starts from the one before it
                deeper.append([self.continuation(len(deeper) + 2, kind), 1.0])
            c = deeper[j - 2]
            c[0] = c[0] * self.overall_decay + (accepted >= j)
            c[1] = c[1] * self.overall_decay + 1

    def relax(self, seq_ids, rate: float = 0.05) -> None:
        """A step in which these sequences did not draft: their own history and the overall first-position rates
        fade by ``rate`` toward the prior (the overall rates toward ``initial``, their evidence kept)."""
        for seq_id in seq_ids:
            for c in self.counts.get(seq_id, {}).values():
                c[0] *= 1 - rate
                c[1] *= 1 - rate
        for c in self.first.values():
            c[0] = (1 - rate) * c[0] + rate * self.initial * c[1]

    def overall_rate(self, kind: int = 0) -> float:
        """The first position's acceptance over all sequences, for drafts of ``kind``."""
        a, n = self._first(kind)
        return a / n

    def rate(self, seq_id: int, kind: int = 0) -> float:
        """The chance that this sequence's next first draft token of ``kind`` is accepted."""
        a, n = self.counts.get(seq_id, {}).get(kind, (0.0, 0.0))
        return (a + self.prior * self.overall_rate(kind)) / (n + self.prior)

    def continuation(self, depth: int, kind: int = 0) -> float:
        """The chance that draft position ``depth`` (>= 2) is accepted given that the one before it was. A depth
        never tested takes the deepest tested one's (none tested: the first position's overall rate): drafts
        that kept landing are worth trying deeper, where a fixed prior would hold the planner at the depths it
        already knows."""
        deeper = self.deeper.get(kind, [])
        if not deeper:
            return self.overall_rate(kind)
        a, n = deeper[min(depth, len(deeper) + 1) - 2]
        return a / n

    def path_values(self, seq_id: int, depth: int, kind: int = 0) -> list[float]:
        """For depths 1..``depth``: the chance that this sequence's draft is accepted through that depth."""
        out, v = [], self.rate(seq_id, kind)
        for j in range(1, depth + 1):
            if j > 1:
                v *= self.continuation(j, kind)
            out.append(v)
        return out

    def forget(self, seq_id: int) -> None:
        self.counts.pop(seq_id, None)


def plan_depths(values: Seq[Seq[float]], widths: Seq[int], base_tokens: int, step_cost: StepCost,
                draft_cost: float, *, costly: Seq[bool] | None = None, min_value: float = 1e-3) -> list[int]:
    """The draft depth for each sequence that maximises expected emitted tokens per second of the step.

    :param values: per producing sequence, ``values[s][j - 1]``: the chance that its draft is accepted through
        depth ``j`` (the expected tokens that depth adds; :meth:`Acceptance.path_values`), non-increasing in j.
    :param widths: draft tokens at depth 1, 2, ... (1 each for a chain; a tree's node counts per level);
        ``len(widths)`` is the deepest draft allowed.
    :param base_tokens: tokens the step forwards without any draft (prefill chunks included).
    :param step_cost: the forward's cost curves (the one for ``len(values)`` sequences is used); nothing
        measured yet: every sequence drafts to full depth.
    :param draft_cost: the drafter's seconds per draft position at this batch.
    :param costly: per sequence, whether its draft costs ``draft_cost`` to make (default: every one); a draft
        already in hand (a copy found by lookup) costs only its verification.

    Depth ``j`` of sequence ``s`` is worth ``values[s][j - 1]`` expected tokens and costs ``widths[j - 1]``
    forward tokens. For each cap on the depth the drafter must make (0: only drafts in hand), candidates are
    taken best first (a sequence's deeper positions are never worth more than its shallower ones, so each takes
    a prefix) and the best prefix of that order is kept, the drafter's cost counted at the cap; the best over
    all caps wins.
    """
    n_seqs = len(values)
    if step_cost(base_tokens, n_seqs) is None:
        return [len(widths)] * n_seqs
    is_costly = [True] * n_seqs if costly is None else list(costly)
    candidates = sorted((-v[j - 1], j, s) for s, v in enumerate(values) for j in range(1, len(widths) + 1)
                        if v[j - 1] >= min_value)
    best, best_cap, best_m = n_seqs / step_cost(base_tokens, n_seqs), 0, 0
    ns, ts = step_cost.points(n_seqs)
    for cap in [0] + sorted({j for _, j, s in candidates if is_costly[s]}):
        value, tokens, overhead = float(n_seqs), base_tokens, draft_cost * cap
        i = bisect.bisect_right(ns, tokens)  # tokens only grow along a pass: walk the curve instead of searching
        for m, (neg, j, s) in enumerate(candidates, 1):
            if is_costly[s] and j > cap:
                continue
            value -= neg
            tokens += widths[j - 1]
            while i < len(ns) and ns[i] <= tokens:
                i += 1
            rate = value / (interpolate(ns, ts, i, tokens) + overhead)
            if rate > best:
                best, best_cap, best_m = rate, cap, m
    depths = [0] * n_seqs
    for _, j, s in candidates[:best_m]:
        if not (is_costly[s] and j > best_cap):
            depths[s] = max(depths[s], j)
    return depths
