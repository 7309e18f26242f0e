"""Per-stage figures the status document derives from the stages' ``busy_intervals``.

Pure functions over the heartbeat figures (no Redis, no clock of their own: ``now`` is passed in).

NOTE: the pipeline bubble of a stage is the share of the recent window (``BUBBLE_WINDOW_S``,
cut to the time every stage's kept intervals still cover) in which its chain was working (some
stage of the chain ran a step) while this stage sat idle::

    bubble(s) = 1 - busy(s) / active,   active = |union of every stage's step intervals|

With M micro-batches keeping every stage busy it tends to 0; with one micro-batch walking
through P stages it tends to 1 - 1/P. An idle chain (active = 0) has no bubble: 0. The chain's
bubble is the mean over its stages, as ``stagemesh bench`` reports it over a whole run.
"""

from __future__ import annotations

import math
from typing import Any, Iterable, Sequence

BUBBLE_WINDOW_S = 10.0
FULL_INTERVALS = 256
"""A stage keeps its last 256 intervals: a full list may not reach back over the whole window."""

Interval = Sequence[float]
"""``[t0, t1]`` wall-clock seconds of one step."""


def percentile(values: Sequence[float], q: float) -> float:
    """The ``q``-quantile (0..1) by nearest rank; 0.0 for no values."""
    if not values:
        return 0.0
    ordered = sorted(values)
    rank = min(len(ordered), max(1, math.ceil(q * len(ordered))))
    return ordered[rank - 1]


def step_latency_quantiles(intervals: Iterable[Interval]) -> tuple[float, float]:
    """(p50, p99) of the step durations of the kept intervals (the stage's last 256 steps)."""
    durations = [t1 - t0 for t0, t1 in _valid(intervals)]
    return percentile(durations, 0.50), percentile(durations, 0.99)


def bubble_fractions(intervals_by_stage: dict[Any, list[Interval]], now: float,
                     window_s: float = BUBBLE_WINDOW_S) -> dict[Any, float]:
    """Each stage's bubble over ``[start, now]``, the stages being those of one chain."""
    stages = {key: list(_valid(iv)) for key, iv in intervals_by_stage.items()}
    start = now - window_s
    for iv in stages.values():
        if len(iv) >= FULL_INTERVALS:
            start = max(start, iv[0][0])
    clipped = {key: _clip(iv, start, now) for key, iv in stages.items()}
    active = _covered(sorted(pair for iv in clipped.values() for pair in iv))
    if active <= 0:
        return {key: 0.0 for key in stages}
    return {key: max(0.0, 1.0 - _covered(sorted(iv)) / active) for key, iv in clipped.items()}


def _valid(intervals: Iterable[Interval] | None) -> Iterable[tuple[float, float]]:
    for pair in intervals or ():
        if len(pair) == 2 and pair[1] >= pair[0]:
            yield float(pair[0]), float(pair[1])


def _clip(intervals: list[tuple[float, float]], start: float, end: float) -> list[tuple[float, float]]:
    return [(max(t0, start), min(t1, end)) for t0, t1 in intervals if t1 > start and t0 < end]


def _covered(ordered: list[tuple[float, float]]) -> float:
    """Length of the union of intervals sorted by start."""
    total, reach = 0.0, float("-inf")
    for t0, t1 in ordered:
        if t1 > reach:
            total += t1 - max(t0, reach)
            reach = t1
    return total
