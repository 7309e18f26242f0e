"""When a silent peer counts as frozen: ``Deadline``, a limit that follows the measured answer
times. Pure (the caller measures with its own clock); torch-free.

NOTE: deadlines that follow the measured time. A frozen process (SIGSTOP, a stuck driver, a
TP rank stuck in a collective) keeps its sockets open, so nothing breaks: only a deadline
finds it. A fixed one must cover the slowest healthy answer anywhere (a long prefill chunk on
a busy host), so it was 120 s per gateway step and 30 s per expert call, and a freeze held a
micro-batch that long. ``Deadline`` instead allows

    floor_s + multiple × (recent high percentile of the answer time) × max(1, size / largest recent size)

where *size* is what the request carries (tokens of a step, rows of an expert batch): a prefill
chunk bigger than any measured lately gets proportionally more time, so it is not mistaken for
a freeze. The percentile leaves out the window's slowest answer, however few are measured.
Until ``min_samples`` answers are measured the limit is ``first_s`` (the first steps include
warm-up: allocator growth, first-call kernel selection); it is never above ``ceiling_s``.
The numbers of each use sit with its policy (``gateway.chain_client``, ``stage_worker.remote_experts``).
"""

from __future__ import annotations

import math
from bisect import bisect_left, insort
from collections import deque
from dataclasses import dataclass


@dataclass(frozen=True)
class DeadlinePolicy:
    """How long a peer may take to answer one request before it counts as frozen (see the NOTE)."""

    floor_s: float
    """Always allowed on top of the measured time: a GC pause, a preempted core, a slow log write."""
    multiple: float
    """Times the recent high percentile of the answer time that is allowed."""
    first_s: float
    """The limit until ``min_samples`` answers are measured (the first ones include warm-up)."""
    ceiling_s: float
    """The limit never exceeds this."""
    quantile: float = 0.99
    """The high percentile of the recent answer times, as a fraction."""
    window: int = 256
    """How many recent answers are kept."""
    min_samples: int = 8
    """Answers measured before the limit follows them."""
    outliers: int = 1
    """The slowest answers of the window the limit ignores, however few are measured: with
    fewer than 100 answers the 99th percentile would be the slowest, and one slow answer (a
    batch re-sent after a frozen expert worker, a GC pause) would set the limit for the next
    hundred. A freeze is still found: its answer never comes."""

    def __post_init__(self) -> None:
        if not 0 < self.floor_s <= self.ceiling_s or not 0 < self.first_s <= self.ceiling_s:
            raise ValueError(f"{self}: need 0 < floor_s <= ceiling_s and 0 < first_s <= ceiling_s")
        if self.multiple < 1 or not 0 < self.quantile <= 1 or not self.outliers < self.min_samples <= self.window:
            raise ValueError(f"{self}: need multiple >= 1, 0 < quantile <= 1, outliers < min_samples <= window")


class Deadline:
    """The limit for a peer's next answer, from its recent answer times. A pure object: the
    caller measures (with its own clock) and reports each answer to ``observe``."""

    def __init__(self, policy: DeadlinePolicy):
        self.policy = policy
        self._seconds: deque[float] = deque()
        self._sizes: deque[int] = deque()
        """The window's answers, oldest first: their seconds and their sizes."""
        self._times: list[float] = []
        """The same seconds, sorted: kept so, one insertion per answer (a gateway observes one
        per step; sorting the window each time cost it ~50 µs a step)."""
        self._largest: int | None = None
        """The largest size of the window; None when it must be worked out again."""

    def observe(self, seconds: float, size: int) -> None:
        """A healthy answer took ``seconds`` for a request of ``size`` (tokens, rows)."""
        if len(self._sizes) == self.policy.window:
            old_seconds, old_size = self._seconds.popleft(), self._sizes.popleft()
            del self._times[bisect_left(self._times, old_seconds)]
            if old_size == self._largest and size < old_size:
                self._largest = None
        self._seconds.append(seconds)
        self._sizes.append(size)
        insort(self._times, seconds)
        if self._largest is not None and size > self._largest:
            self._largest = size

    def limit(self, size: int) -> float:
        """Seconds the next request of ``size`` may take before its peer counts as frozen."""
        p = self.policy
        if len(self._sizes) < p.min_samples:
            return p.first_s
        high, largest = self._high_and_largest()
        scale = max(1.0, size / max(largest, 1))
        return min(p.ceiling_s, p.floor_s + p.multiple * high * scale)

    @property
    def measured(self) -> int:
        """Answers in the window."""
        return len(self._sizes)

    def describe(self) -> str:
        """For log lines, e.g. ``p99 0.041 s over 256 answers``."""
        if len(self._sizes) < self.policy.min_samples:
            return f"{len(self._sizes)} answers measured, the first-answer allowance applies"
        high, _ = self._high_and_largest()
        return f"p{self.policy.quantile * 100:g} {high:.3f} s over {len(self._sizes)} answers"

    def _high_and_largest(self) -> tuple[float, int]:
        times = self._times
        rank = math.ceil(self.policy.quantile * len(times)) - 1
        rank = max(0, min(rank, len(times) - 1 - self.policy.outliers))
        if self._largest is None:
            self._largest = max(self._sizes)
        return times[rank], self._largest
