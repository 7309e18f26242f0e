"""``stagemesh.runtime.deadline``: the limit that follows measured answer times, as a pure object."""

from __future__ import annotations

import math
import random

import pytest

from stagemesh.runtime.deadline import Deadline, DeadlinePolicy

POLICY = DeadlinePolicy(floor_s=1.0, multiple=4.0, first_s=60.0, ceiling_s=120.0, quantile=0.9, window=10,
                        min_samples=4)


def test_the_first_answers_get_the_warm_up_allowance():
    deadline = Deadline(POLICY)
    assert deadline.limit(1) == 60.0
    for _ in range(3):
        deadline.observe(0.05, 8)
    assert deadline.limit(1) == 60.0  # 3 < min_samples
    deadline.observe(0.05, 8)
    assert deadline.limit(1) == pytest.approx(1.0 + 4 * 0.05)


def test_the_limit_follows_the_high_percentile_not_the_odd_outlier():
    deadline = Deadline(POLICY)
    for _ in range(9):
        deadline.observe(0.1, 8)
    deadline.observe(5.0, 8)  # one slow answer in 10: above the 90th percentile
    assert deadline.limit(8) == pytest.approx(1.0 + 4 * 0.1)
    deadline.observe(5.0, 8)  # two in 10: the 90th percentile is one of them
    assert deadline.limit(8) == pytest.approx(1.0 + 4 * 5.0)


def test_the_single_slowest_answer_is_left_out_even_among_few():
    deadline = Deadline(POLICY)
    for seconds in (0.1, 3.0, 0.1, 0.1):  # a re-send after a frozen expert worker, among 4
        deadline.observe(seconds, 8)
    assert deadline.limit(8) == pytest.approx(1.4)


def test_the_window_forgets_old_answers():
    deadline = Deadline(POLICY)
    for _ in range(10):
        deadline.observe(2.0, 8)
    for _ in range(10):
        deadline.observe(0.1, 8)
    assert deadline.limit(8) == pytest.approx(1.4)
    assert deadline.measured == 10


def test_a_request_bigger_than_any_measured_gets_time_in_proportion():
    # 8-token decode steps measured; a 256-token prefill chunk is 32 times as big
    deadline = Deadline(POLICY)
    for _ in range(10):
        deadline.observe(0.1, 8)
    assert deadline.limit(4) == deadline.limit(8) == pytest.approx(1.4)
    assert deadline.limit(256) == pytest.approx(1.0 + 4 * 0.1 * 32)
    assert deadline.limit(100_000) == 120.0  # the ceiling


def test_describe_names_the_percentile_or_the_warm_up():
    deadline = Deadline(POLICY)
    assert "first-answer allowance" in deadline.describe()
    for _ in range(4):
        deadline.observe(0.25, 1)
    assert deadline.describe() == "p90 0.250 s over 4 answers"


@pytest.mark.parametrize("bad", [dict(floor_s=0), dict(first_s=200), dict(multiple=0.5), dict(quantile=1.5),
                                 dict(min_samples=11), dict(outliers=4)])
def test_a_bad_policy_is_refused_naming_the_constraint(bad):
    values = dict(floor_s=1.0, multiple=4.0, first_s=60.0, ceiling_s=120.0, window=10, min_samples=4) | bad
    with pytest.raises(ValueError, match="need"):
        DeadlinePolicy(**values)


def test_the_kept_figures_equal_the_window_worked_out_afresh_after_every_answer():
    policy = DeadlinePolicy(floor_s=0.01, multiple=3.0, first_s=5.0, ceiling_s=60.0, quantile=0.9, window=16,
                            min_samples=4, outliers=1)
    deadline, rng, seen = Deadline(policy), random.Random(7), []
    for _ in range(400):
        # few distinct values: ties (the same seconds or size leaving and arriving) are the common case
        seconds, size = rng.choice([0.01, 0.02, 0.02, 0.05, 0.3]), rng.choice([1, 4, 4, 32, 128])
        deadline.observe(seconds, size)
        seen.append((seconds, size))
        window = seen[-policy.window:]
        if len(window) < policy.min_samples:
            continue
        times = sorted(s for s, _ in window)
        rank = max(0, min(math.ceil(policy.quantile * len(times)) - 1, len(times) - 1 - policy.outliers))
        largest = max(n for _, n in window)
        for asked in (1, 64, 512):
            want = min(policy.ceiling_s, policy.floor_s + policy.multiple * times[rank] * max(1.0, asked / largest))
            assert deadline.limit(asked) == pytest.approx(want)
