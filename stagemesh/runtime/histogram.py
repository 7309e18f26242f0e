"""A step-latency histogram the stage publishes with its heartbeat, for Prometheus.

NOTE: why the stage keeps the buckets. The gateway exports ``stagemesh_stage_step_latency_seconds``
from what the stage publishes in Redis. The ``busy_intervals`` figure holds only the last 256
steps, so a gateway that rebuilt the histogram from them would miss steps whenever a stage
runs more than 256 between two reads. The stage counts every step into fixed buckets instead
(cumulative since it started, like a Prometheus counter) and the gateway relays them as they
are: exact, and with no state in the gateway.
"""

from __future__ import annotations

import bisect
from typing import Any

STEP_LATENCY_BOUNDS_S = (
    0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
)
"""Upper bounds (seconds) of the buckets; one more bucket, +Inf, takes the rest."""


class LatencyHistogram:
    """Counts of observed durations per bucket, their sum and count. Not thread-safe: the
    caller holds its own lock."""

    def __init__(self, bounds: tuple[float, ...] = STEP_LATENCY_BOUNDS_S):
        self.bounds = bounds
        self.counts = [0] * (len(bounds) + 1)
        """Per bucket (not cumulative); the last one is +Inf."""
        self.sum = 0.0

    def observe(self, seconds: float) -> None:
        self.counts[bisect.bisect_left(self.bounds, seconds)] += 1
        self.sum += seconds

    def figure(self) -> dict[str, Any]:
        """The JSON figure: ``{"bounds": [...], "counts": [... one more than bounds], "sum": s}``."""
        return {"bounds": list(self.bounds), "counts": list(self.counts), "sum": self.sum}
