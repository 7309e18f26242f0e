"""Each chain's time to first token and inter-token latency: taken per token, counted in bulk.

Two readers share the values: Prometheus (``stagemesh_time_to_first_token_seconds`` and
``stagemesh_inter_token_latency_seconds``, histograms labelled ``chain``) and the dashboard's
history, which takes the values since its last sample for its p50 / p99 charts
(``gateway.history``).

NOTE: why not prometheus-client's ``Histogram``. The gateway timed every streamed token on its
scheduling loop, and a ``Histogram.observe`` walks the buckets in Python and takes a lock for
each value: with the dashboard's copy of the value, 2.4 µs a token (128 trackers, one core,
``timeit``), 7% of the gateway's busy py-spy samples at 128 streams. Here a token appends one
float to its chain's list (0.35–0.6 µs a token, the folds included); the lists are folded —
each value into its bucket (``bisect``), the sum, and the values the dashboard has not taken
yet — when ``/metrics`` is scraped (``collect``), when the history samples (``take``), and
whenever a list reaches ``FOLD_AT`` values. A scrape reads what prometheus-client's own
histograms would (a test feeds both the same values); BENCHMARKS.md, "Session 14".
"""

from __future__ import annotations

import math
from bisect import bisect_left
from collections import deque
from collections.abc import Iterator
from itertools import accumulate

from prometheus_client.core import HistogramMetricFamily
from prometheus_client.utils import floatToGoString

TTFT_BUCKETS_S = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
ITL_BUCKETS_S = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0)
KINDS = {
    "ttft": ("stagemesh_time_to_first_token_seconds", "From the gateway receiving a request to its first token.",
             TTFT_BUCKETS_S),
    "itl": ("stagemesh_inter_token_latency_seconds", "Between two consecutive tokens of one request.",
            ITL_BUCKETS_S),
}
"""kind -> (metric name, help, bucket upper bounds in seconds)."""
FOLD_AT = 4096
"""Values a chain's list holds before they are folded without waiting for a reader."""
RECENT_KEPT = 4096
"""Values kept per chain between two history samples; past that the oldest go (the quantiles
of a busy sample are then those of its last 4096 tokens)."""


class Series:
    """One chain's values of one kind: those not yet folded, then the histogram and the recent ones."""

    __slots__ = ("bounds", "pending", "counts", "total", "recent")

    def __init__(self, bounds: tuple[float, ...]):
        self.bounds = bounds
        self.pending: list[float] = []
        """Appended per token by ``gateway.metrics.RequestTracker`` (which keeps this very list)."""
        self.counts = [0] * (len(bounds) + 1)
        """Values per bucket, not cumulative; the last one is +Inf's."""
        self.total = 0.0
        self.recent: deque[float] = deque(maxlen=RECENT_KEPT)

    def fold(self) -> None:
        values = self.pending[:]
        self.pending.clear()  # in place: trackers append to this list
        bounds, counts = self.bounds, self.counts
        for value in values:
            counts[bisect_left(bounds, value)] += 1  # le: a value on a bound counts in that bucket
        self.total += math.fsum(values)
        self.recent.extend(values)

    def buckets(self) -> list[tuple[str, int]]:
        """Cumulative counts by upper bound, as the exposition format writes them."""
        les = [floatToGoString(b) for b in self.bounds] + ["+Inf"]
        return list(zip(les, accumulate(self.counts)))


class TokenLatencies:
    """Every chain's TTFT and ITL series; a Prometheus collector and the history's source."""

    def __init__(self) -> None:
        self._series: dict[tuple[str, str], Series] = {}

    def series(self, chain: str, kind: str) -> Series:
        """The series of ``kind`` ("ttft" or "itl") of the chain labelled ``chain``."""
        series = self._series.get((chain, kind))
        if series is None:
            series = self._series[(chain, kind)] = Series(KINDS[kind][2])
        return series

    def add(self, chain: str, kind: str, seconds: float) -> None:
        """One value (a tracker appends to ``series(...).pending`` itself)."""
        self.series(chain, kind).pending.append(seconds)

    def take(self, chain: str, kind: str) -> list[float]:
        """The values since the last take (the latest ``RECENT_KEPT``), forgotten here."""
        series = self._series.get((chain, kind))
        if series is None:
            return []
        series.fold()
        values = list(series.recent)
        series.recent.clear()
        return values

    def collect(self) -> Iterator[HistogramMetricFamily]:
        for kind, (name, doc, _) in KINDS.items():
            family = HistogramMetricFamily(name, doc, labels=("chain",))
            for (chain, of_kind), series in sorted(self._series.items()):
                if of_kind == kind:
                    series.fold()
                    family.add_metric([chain], series.buckets(), series.total)
            yield family
