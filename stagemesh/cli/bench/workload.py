"""The benchmark's load: seeded random requests, their arrival times, and what each system did with them.

Torch-free: the mesh side of a benchmark is a client and needs no model code.
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass, field


@dataclass(frozen=True)
class BenchRequest:
    """One benchmark request: a random prompt and the exact number of tokens it must generate."""

    token_ids: tuple[int, ...]
    output_len: int
    """Generated with ``ignore_eos``, so every system produces exactly this many tokens."""


@dataclass(frozen=True)
class LoadShape:
    """How many requests, how long, and how they arrive."""

    requests: int
    input_len: int
    output_len: int
    input_len_max: int | None = None
    """With it, prompt lengths are uniform in ``[input_len, input_len_max]``; without, all ``input_len``."""
    output_len_max: int | None = None
    """With it, output lengths are uniform in ``[output_len, output_len_max]``."""
    concurrency: int | None = None
    """At most this many requests in flight; None with ``rate`` None sends everything at once."""
    rate: float | None = None
    """Poisson arrivals at this many requests per second (exponential gaps); None: no pacing."""
    seed: int = 0

    def __post_init__(self) -> None:
        for name in ("requests", "input_len", "output_len"):
            if getattr(self, name) < 1:
                raise ValueError(f"--{name.replace('_', '-')}={getattr(self, name)} must be at least 1")
        for low, high in (("input_len", "input_len_max"), ("output_len", "output_len_max")):
            top = getattr(self, high)
            if top is not None and top < getattr(self, low):
                raise ValueError(f"--{high.replace('_', '-')}={top} must be at least --{low.replace('_', '-')}={getattr(self, low)}")
        if self.concurrency is not None and self.concurrency < 1:
            raise ValueError(f"--concurrency={self.concurrency} must be at least 1")
        if self.rate is not None and not self.rate > 0:
            raise ValueError(f"--rate={self.rate} must be a positive number of requests per second")
        if self.concurrency is not None and self.rate is not None:
            raise ValueError("give --concurrency or --rate, not both")


def make_requests(shape: LoadShape, vocab_size: int, reserved: tuple[int, ...] = ()) -> list[BenchRequest]:
    """``shape.requests`` prompts of random ids (never a ``reserved`` id such as BOS/EOS), seeded."""
    rng = random.Random(shape.seed)
    allowed = [t for t in range(vocab_size) if t not in set(reserved)]
    out = []
    for _ in range(shape.requests):
        n_in = rng.randint(shape.input_len, shape.input_len_max or shape.input_len)
        n_out = rng.randint(shape.output_len, shape.output_len_max or shape.output_len)
        out.append(BenchRequest(tuple(rng.choice(allowed) for _ in range(n_in)), n_out))
    return out


def arrival_offsets(shape: LoadShape) -> list[float]:
    """Seconds after the start at which each request is sent: all 0, or a seeded Poisson process."""
    if shape.rate is None:
        return [0.0] * shape.requests
    rng = random.Random(shape.seed + 1)
    t, out = 0.0, []
    for _ in range(shape.requests):
        out.append(t)
        t += rng.expovariate(shape.rate)
    return out


@dataclass
class Trace:
    """One request as the client saw it: wall-clock send time and the arrival time of each token."""

    sent: float
    token_times: list[float] = field(default_factory=list)
    token_ids: list[int] = field(default_factory=list)


@dataclass
class SystemRun:
    """What one system did with the whole load."""

    name: str
    wall_s: float
    """From the first request sent to the last token received."""
    output_tokens: int
    """Useful generated tokens: each request's own ``output_len`` (padding steps not counted)."""
    token_ids: list[list[int]]
    """Each request's generated ids, in request order."""
    steps: int | None = None
    """Forward passes (micro-batches) over the whole model, where the system lets us count them."""
    traces: list[Trace] | None = None
    """Per-token client timestamps (the mesh only)."""
    stages: list[dict] | None = None
    """Per-stage busy figures over the run window (the mesh only)."""
    cpu: dict | None = None
    """Where the CPU went over the run window (the mesh only; ``stagemesh.cli.bench.cpu``)."""
    note: str | None = None


def percentile(values: list[float], q: float) -> float | None:
    """The ``q``-th percentile (0-100) with linear interpolation between ranks; None when empty."""
    if not values:
        return None
    xs = sorted(values)
    pos = (len(xs) - 1) * q / 100.0
    lo, hi = math.floor(pos), math.ceil(pos)
    return xs[lo] + (xs[hi] - xs[lo]) * (pos - lo)


def summary(values: list[float]) -> dict[str, float | None]:
    """p50, p99 and mean of a list of seconds (None when it is empty)."""
    mean = sum(values) / len(values) if values else None
    return {"p50": percentile(values, 50), "p99": percentile(values, 99), "mean": mean}


def latency_figures(traces: list[Trace]) -> dict[str, dict]:
    """Time to first token (send -> first token) and inter-token latency (gaps between a
    request's consecutive tokens; tokens that arrive in one message count as a 0 s gap)."""
    ttft = [t.token_times[0] - t.sent for t in traces if t.token_times]
    itl = [b - a for t in traces for a, b in zip(t.token_times, t.token_times[1:])]
    return {"ttft_s": summary(ttft), "itl_s": summary(itl)}
