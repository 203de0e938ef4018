"""The draft-depth planner: measured step cost x measured acceptance -> each sequence's draft depth."""
from __future__ import annotations

import pytest

from tokenmill.speculation.budget import Acceptance, DraftCost, StepCost, plan_depths


def cost_curve(points: dict[int, float]) -> StepCost:
    c = StepCost()
    for n, t in points.items():
        c.observe(n, t)
    return c


def test_step_cost_interpolates_never_falls_and_extrapolates_linearly():
    c = StepCost()
    assert c(8) is None  # nothing measured
    c = cost_curve({1: 0.020, 16: 0.030, 64: 0.080, 32: 0.025})  # 32 measured cheaper than 16: noise
    assert c(1) == pytest.approx(0.020) and c(0.5) == pytest.approx(0.010)  # below the smallest: proportional
    assert c(32) == pytest.approx(0.030)                  # the running maximum keeps the curve rising
    assert c(48) == pytest.approx(0.055)                  # halfway between 32 and 64
    assert c(128) == pytest.approx(0.160)                 # past the largest step: proportional to the tokens


def test_step_cost_follows_a_changing_machine():
    c = cost_curve({8: 0.1})
    for _ in range(20):
        c.observe(8, 0.2)
    assert c(8) == pytest.approx(0.2, rel=0.01)


def test_calibrated_curve_keeps_its_shape_and_decode_steps_set_its_level():
    """Build-time timings give the shape (an int8-like cliff past 8 rows); the engine's decode steps, slower
    with real contexts, scale the whole curve instead of flattening it around the plain steps' own size."""
    c = StepCost()
    for n, t in {1: 0.03, 8: 0.07, 12: 0.17, 16: 0.17, 64: 0.3}.items():
        c.calibrate(n, t)
    assert c(12) / c(8) == pytest.approx(0.17 / 0.07)
    for _ in range(30):
        c.observe(8, 0.14)            # real decode steps of 8 sequences: twice the scratch forward
    c.observe(2048, 9.0, decode=False)  # a prefill step says nothing about the level
    assert c(8) == pytest.approx(0.14, rel=0.01) and c(12) / c(8) == pytest.approx(0.17 / 0.07)
    assert c.buckets == {}  # with a calibrated curve the steps only set its level


def test_calibrated_curves_per_sequence_count_price_drafts_as_rows_of_the_same_sequences():
    """A draft adds tokens to sequences already in the step. Timed per sequence count, a lone sequence's extra
    tokens cost little (its attention over the context is paid once), so batch 1 drafts deep, while 8
    sequences whose extra rows cost as much as new ones draft nothing; decode steps set the level of the
    curve of their own sequence count's nearest calibrated one."""
    c = StepCost()
    for w in (1, 2, 3, 5, 9):
        c.calibrate(w, 0.030 + 0.002 * (w - 1), num_seqs=1)    # one sequence, 1 + draft tokens
        c.calibrate(8 * w, 0.030 * w, num_seqs=8)               # 8 sequences: every token a sequence's cost
    values = [[0.9 ** j for j in range(1, 9)]]
    assert plan_depths(values, [1] * 8, 1, c, 0.0) == [8]
    assert plan_depths(values * 8, [1] * 8, 8, c, 0.0) == [0] * 8
    assert c(5, num_seqs=1) == pytest.approx(0.038) and c(40, num_seqs=6) == pytest.approx(0.15)  # nearest: 8
    for _ in range(30):
        c.observe(8, 0.06, num_seqs=8)  # real 8-sequence decode steps: twice the scratch forward
    assert c(8, num_seqs=8) == pytest.approx(0.06, rel=0.01) and c(1, num_seqs=1) == pytest.approx(0.06, rel=0.01)


def test_draft_cost_extrapolates_up_in_the_batch_and_never_down():
    d = DraftCost()
    assert d(8) == 0.0  # unmeasured: drafting once measures it
    d.observe(2, 4, 0.008)  # 2 ms a depth at batch 2
    assert d(2) == pytest.approx(0.002)
    assert d(16) == pytest.approx(0.016)   # 8x the batch: 8x the cost until measured
    d.observe(16, 2, 0.010)
    assert d(16) == pytest.approx(0.005) and d(1) == pytest.approx(0.002)
    assert d(8) == pytest.approx(0.002 + 6 / 14 * 0.003)  # between two measured buckets: interpolated


def plan(alphas: list[float], widths: list[int], base_tokens: int, curve: StepCost, draft_cost: float) -> list[int]:
    """``plan_depths`` for sequences whose every position is accepted with probability alpha."""
    values = [[a ** j for j in range(1, len(widths) + 1)] for a in alphas]
    return plan_depths(values, widths, base_tokens, curve, draft_cost)


def test_acceptance_first_position_per_sequence_later_ones_per_depth():
    a = Acceptance(initial=0.5, prior=2.0, decay=1.0, overall_decay=1.0)
    assert a.rate(1) == pytest.approx(0.5) and a.continuation(2) == 0.5
    a.record(9, 4, 0, kind=7)  # another kind of draft (a short n-gram match, say) is learned apart
    assert a.rate(9, kind=7) < 0.5 and a.rate(9) == pytest.approx(0.5) and a.overall_rate() == pytest.approx(0.5)
    for _ in range(10):
        a.record(1, 4, 4)  # every draft of sequence 1 accepted whole
        a.record(2, 4, 0)  # sequence 2's first draft token always rejected
    assert a.rate(1) > 0.8 and a.rate(2) < 0.25
    assert a.rate(3) == pytest.approx(a.overall_rate())  # no history: the drafter's overall rate
    # positions 2..4 were tested only behind an accepted first one, and always held: the copy goes on
    assert all(a.continuation(j) > 0.9 for j in (2, 3, 4))
    values = a.path_values(1, 4)
    assert values[0] == pytest.approx(a.rate(1)) and values[3] == pytest.approx(
        a.rate(1) * a.continuation(2) * a.continuation(3) * a.continuation(4))
    a.record(4, 3, 1)  # the second position tested and rejected, the third never tested
    assert a.deeper[0][0][1] == pytest.approx(12.0) and a.deeper[0][1][1] == pytest.approx(11.0)
    # depths never tested take the deepest tested one's rate, not a fixed prior that would keep them untried
    assert a.continuation(7) == a.continuation(4) > 0.9
    a.forget(1)
    assert 1 not in a.counts
    with pytest.raises(AssertionError):
        a.record(1, 2, 3)


def test_steps_without_drafts_relax_estimates_back_toward_the_prior():
    """A drafter that stopped drafting after a bad stretch must look again later: with no new evidence the
    overall rate drifts back to ``initial`` and a sequence's own bad history fades."""
    a = Acceptance(initial=0.5)
    for _ in range(20):
        a.record(1, 4, 0)
    assert a.rate(1) < 0.2
    for _ in range(100):
        a.relax([1])
    assert a.overall_rate() == pytest.approx(0.5, abs=0.02) and a.rate(1) > 0.4


def test_cheap_verification_drafts_full_depth_and_nothing_measured_too():
    flat = cost_curve({1: 0.02, 64: 0.02})
    assert plan([0.6, 0.6], [1] * 4, 2, flat, 0.0) == [4, 4]
    assert plan([0.6], [1] * 4, 1, StepCost(), 0.0) == [4]  # nothing measured: as without planning


def test_only_drafted_steps_measured_stops_drafting_once_to_measure_the_plain_step():
    """A drafter that always drafted has seen only steps of 1 + k tokens: the plain step is unknown, taken as
    proportionally cheaper, so the plan drafts nothing once; that step measures it."""
    only_drafted = cost_curve({6: 0.054, 400: 0.6})
    assert plan([0.5], [3, 2], 1, only_drafted, 0.0) == [0]
    only_drafted.observe(1, 0.030)  # the plain step, measured: the first tree level (3 tokens) costs 1.48x
    assert plan([0.3], [3, 2], 1, only_drafted, 0.0) == [0]
    assert plan([0.95], [3, 2], 1, only_drafted, 0.0) == [2]


def test_compute_bound_steps_draft_nothing():
    """When every forwarded token costs as much as a sequence's own (a large batch), a draft worth alpha < 1
    tokens never pays: the plan drafts nothing."""
    linear = cost_curve({n: 0.001 * n for n in (8, 16, 32, 64, 128, 256)})
    assert plan([0.8] * 64, [1] * 4, 64, linear, 0.0) == [0] * 64


def test_a_sequence_whose_drafts_fail_stops_drafting_and_a_good_one_goes_deeper():
    # a verify token costs a tenth of a step: worth it at alpha 0.9, not at 0.05
    curve = cost_curve({n: 0.1 + 0.01 * n for n in (1, 2, 4, 8, 16, 32)})
    depths = plan([0.9, 0.05], [1] * 8, 2, curve, 0.0)
    assert depths[1] == 0 and depths[0] >= 4


def test_drafter_cost_counts_against_drafting():
    flat = cost_curve({1: 0.02, 64: 0.02})
    assert plan([0.3], [1] * 4, 1, flat, 0.0) == [4]
    assert plan([0.3], [1] * 4, 1, flat, 0.02) == [0]  # a draft position costs a whole step


def test_tree_widths_count_per_level():
    # a tree of 3 nodes at depth 1 and 2 at depth 2; each token costs a tenth of a step
    curve = cost_curve({n: 0.1 + 0.01 * n for n in (1, 2, 4, 8, 16)})
    assert plan([0.7], [3, 2], 1, curve, 0.0) == [2]
    assert plan([0.7], [3, 2], 1, cost_curve({n: 0.1 * n for n in (1, 2, 4, 8)}), 0.0) == [0]


def test_a_copy_in_hand_pays_only_its_verification():
    """A draft already found (an n-gram copy) costs nothing to make: it is planned without the drafter's cost,
    which only the sequences that need the drafter carry."""
    flat = cost_curve({1: 0.02, 64: 0.02})
    assert plan([0.6, 0.6], [1] * 4, 2, flat, 0.02) == [0, 0]  # a draft position costs a whole step
    values = [[0.6 ** j for j in range(1, 5)]] * 2
    assert plan_depths(values, [1] * 4, 2, flat, 0.02, costly=[False, True]) == [4, 0]
