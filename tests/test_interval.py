"""Tests for the Young and Daly intervals and the IntervalPolicy, against hand-computed values."""

from __future__ import annotations

import math

import pytest

from cb_mobile.errors import CheckpointError
from cb_mobile.interval import IntervalPolicy, daly_interval, young_interval


def test_young_hand_value():
    # C = 2 s, MTBF = 3600 s: sqrt(2 * 2 * 3600) = sqrt(14400) = 120 s.
    assert young_interval(2.0, 1 / 3600) == pytest.approx(120.0, rel=1e-12)


def test_daly_small_cost():
    # C = 2, M = 3600: C / 2M = 1/3600, sqrt(C / 2M) = 1/60, sqrt(2 C M) = 120.
    # 120 * (1 + 1/180 + 1/32400) - 2 = 120 + 0.666667 + 0.003704 - 2 = 118.670370
    assert daly_interval(2.0, 1 / 3600) == pytest.approx(118.6703704, abs=1e-6)


def test_daly_large_cost():
    # C = 72, M = 3600: C / 2M = 0.01, sqrt = 0.1, sqrt(2 C M) = 720.
    # 720 * (1 + 0.1/3 + 0.01/9) - 72 = 720 + 24 + 0.8 - 72 = 672.8
    assert daly_interval(72.0, 1 / 3600) == pytest.approx(672.8, abs=1e-9)


def test_daly_cost_above_two_mtbf():
    # C = 8000 >= 2M = 7200, so tau = M = 3600.
    assert daly_interval(8000.0, 1 / 3600) == pytest.approx(3600.0)


def test_zero_hazard_is_infinite():
    assert math.isinf(young_interval(1.0, 0.0))
    assert math.isinf(daly_interval(1.0, 0.0))


@pytest.mark.parametrize("bad", [-1.0, math.nan, math.inf])
def test_interval_rejects_bad_cost(bad):
    with pytest.raises(CheckpointError, match="checkpoint_cost_s"):
        young_interval(bad, 0.1)


def test_policy_young_steps():
    # C/M = 2/3600 = 0.00056 <= 0.01, so Young: 120 s / 0.5 s per step = 240 steps.
    policy = IntervalPolicy(1 / 3600, max_steps=10_000)
    policy.observe_step(0.5)
    policy.observe_checkpoint(2.0)

    decision = policy.decide()

    assert decision.rule == "young"
    assert decision.steps == 240


def test_policy_daly_steps():
    # C/M = 72/3600 = 0.02 > 0.01, so Daly: 672.8 s / 2 s = 336.4 -> 337 steps.
    # The 0.1 budget would raise it to 72 / (0.1 * 2) = 360 steps, so it is disabled here.
    policy = IntervalPolicy(1 / 3600, max_steps=10_000, overhead_budget=None)
    policy.observe_step(2.0)
    policy.observe_checkpoint(72.0)

    decision = policy.decide()

    assert decision.rule == "daly"
    assert decision.steps == 337


def test_policy_forced_young():
    # Young on the same inputs: sqrt(2 * 72 * 3600) = 720 s / 2 s = 360 steps.
    policy = IntervalPolicy(1 / 3600, max_steps=10_000, overhead_budget=None, formula="young")
    policy.observe_step(2.0)
    policy.observe_checkpoint(72.0)

    assert policy.interval_steps() == 360


def test_policy_overhead_budget_raises():
    # Young: sqrt(2 * 2 * 50) = 14.14 s / 1 s -> 15 steps.
    # Budget 0.1: 2 / (0.1 * 1) = 20 steps, which wins.
    policy = IntervalPolicy(1 / 50, formula="young")
    policy.observe_step(1.0)
    policy.observe_checkpoint(2.0)

    decision = policy.decide()

    assert decision.rule == "overhead budget"
    assert decision.steps == 20


def test_policy_budget_overhead_bound():
    policy = IntervalPolicy(1 / 50, formula="young", overhead_budget=0.1)
    policy.observe_step(1.0)
    policy.observe_checkpoint(2.0)

    steps = policy.interval_steps()

    assert 2.0 / (steps * 1.0) <= 0.1


def test_policy_max_steps_clamp():
    # Young: 120 s / 0.01 s = 12000 steps, clamped to 1000.
    policy = IntervalPolicy(1 / 3600)
    policy.observe_step(0.01)
    policy.observe_checkpoint(2.0)

    decision = policy.decide()

    assert decision.rule == "max_steps"
    assert decision.steps == 1000


def test_policy_min_steps_clamp():
    policy = IntervalPolicy(1.0, min_steps=5, overhead_budget=None)
    policy.observe_step(10.0)
    policy.observe_checkpoint(0.02)

    decision = policy.decide()

    assert decision.rule == "min_steps"
    assert decision.steps == 5


def test_policy_warm_up():
    policy = IntervalPolicy(1 / 3600, min_steps=3)

    assert policy.decide().rule == "warm-up"
    assert policy.interval_steps() == 3


def test_policy_initial_estimates():
    policy = IntervalPolicy(1 / 3600, checkpoint_cost_s=2.0, step_seconds=0.5, max_steps=10_000)

    assert policy.interval_steps() == 240


def test_policy_zero_hazard_max():
    policy = IntervalPolicy(0.0, max_steps=77)
    policy.observe_step(1.0)
    policy.observe_checkpoint(1.0)

    assert policy.interval_steps() == 77


def test_ewma_step_time():
    # smoothing 0.5: 1.0, then 0.5 * 1.0 + 0.5 * 3.0 = 2.0, then 0.5 * 2.0 + 0.5 * 4.0 = 3.0
    policy = IntervalPolicy(smoothing=0.5)
    policy.observe_step(1.0)
    policy.observe_step(3.0)
    policy.observe_step(4.0)

    assert policy.step_seconds == pytest.approx(3.0)


def test_ewma_checkpoint_cost():
    # smoothing 0.2: 10.0, then 0.8 * 10 + 0.2 * 20 = 12.0
    policy = IntervalPolicy(smoothing=0.2)
    policy.observe_checkpoint(10.0)
    policy.observe_checkpoint(20.0)

    assert policy.checkpoint_cost_s == pytest.approx(12.0)


def test_hazard_prior_only():
    policy = IntervalPolicy(prior_mtbf_s=3600.0)

    assert policy.hazard_rate == pytest.approx(1 / 3600)


def test_hazard_estimate_blends_failures():
    # (2 failures + 1 prior) / (600 + 1200 + 3600 s) = 3 / 5400 = 1 / 1800
    policy = IntervalPolicy(prior_mtbf_s=3600.0)
    policy.observe_failure(600.0)
    policy.observe_failure(1200.0)

    assert policy.hazard_rate == pytest.approx(1 / 1800)


def test_hazard_estimate_approaches_mle():
    # 100 failures over 100 * 60 s: (100 + 1) / (6000 + 3600) = 0.010521, near the MLE 1/60.
    policy = IntervalPolicy(prior_mtbf_s=3600.0)
    for _ in range(100):
        policy.observe_failure(60.0)

    assert policy.hazard_rate == pytest.approx(101 / 9600)


def test_explicit_hazard_wins():
    policy = IntervalPolicy(prior_mtbf_s=3600.0)
    policy.observe_failure(10.0)
    policy.set_hazard_rate(0.5)

    assert policy.hazard_rate == 0.5


def test_higher_hazard_shorter_interval():
    calm = IntervalPolicy(1 / 3600, max_steps=100_000, overhead_budget=None)
    stormy = IntervalPolicy(1 / 60, max_steps=100_000, overhead_budget=None)
    for policy in (calm, stormy):
        policy.observe_step(0.1)
        policy.observe_checkpoint(0.5)

    assert stormy.interval_steps() < calm.interval_steps()


def test_should_checkpoint_threshold():
    policy = IntervalPolicy(1 / 3600, max_steps=10_000, checkpoint_cost_s=2.0, step_seconds=0.5)

    assert not policy.should_checkpoint(239)
    assert policy.should_checkpoint(240)


@pytest.mark.parametrize(
    ("kwargs", "name"),
    [
        ({"min_steps": 0}, "min_steps"),
        ({"min_steps": 5, "max_steps": 4}, "max_steps"),
        ({"overhead_budget": 0.0}, "overhead_budget"),
        ({"smoothing": 0.0}, "smoothing"),
        ({"prior_mtbf_s": -1.0}, "prior_mtbf_s"),
        ({"formula": "other"}, "formula"),
        ({"hazard_rate": -0.1}, "hazard_rate"),
    ],
)
def test_policy_rejects_bad_config(kwargs, name):
    with pytest.raises(CheckpointError, match=name):
        IntervalPolicy(**kwargs)


def test_observe_step_rejects_nan():
    policy = IntervalPolicy()

    with pytest.raises(CheckpointError, match="step seconds"):
        policy.observe_step(math.nan)
