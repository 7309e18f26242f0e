"""Python's cyclic garbage collector, set once a mesh process serves: its startup heap frozen out
of every later collection, and a youngest generation large enough for a step's short-lived objects.

NOTE: why. The front door makes and drops several objects per streamed token (token events,
per-row lists, protobuf wrappers), and Python's defaults collect the youngest generation every
700 net allocations and, every 100 of those, the whole heap — every module, protobuf descriptor
and gRPC object the process loaded (~65,000 objects in a gateway or frontend). Timed with
``gc.callbacks`` over four runs of the 128-stream load at pp=1 (65,536 tokens; BENCHMARKS.md,
"Session 15"): 0.35 s of the gateway's and 0.38 s of the frontend's CPU went to collections
(~5 µs a token each), and each paused twice for ~88 ms, stalling every stream it serves; with
the startup heap frozen and a 10,000-object youngest generation: none in the gateway, one of
16 ms in the frontend. vLLM's engine freezes its startup heap the same way. Freezing stops only the
cycle collector: a frozen object still goes when its last reference does; one in a reference
cycle that turns to garbage later is never reclaimed. What is frozen is what the process holds
for its whole life (modules, the loaded model's Python objects, servers) plus, in a gateway that
took over open requests, those requests' objects: a bounded, one-time cost. What the process
allocates afterwards is collected as before, in larger batches. ``STAGEMESH_GC=python`` keeps
Python's defaults (to rule this out while debugging).
"""

from __future__ import annotations

import gc
import logging

from stagemesh.runtime.startup import env_choice

log = logging.getLogger(__name__)

GC_ENV = "STAGEMESH_GC"
"""``tuned`` (the default) or ``python`` (Python's own thresholds, nothing frozen)."""
CHOICES = ("tuned", "python")

YOUNGEST_THRESHOLD = 10_000
"""Net container allocations between two collections of the youngest generation (Python: 700)."""


def wanted() -> str:
    """The policy the environment asks for; a StartupError naming the choices for anything else."""
    return env_choice(GC_ENV, CHOICES)


def settle(policy: str) -> None:
    """Once a process has loaded and serves, under ``policy`` (``wanted()``): collect what startup
    left, freeze the rest, and raise the youngest generation's threshold (the older ones keep
    Python's ratios)."""
    if policy == "python":
        return
    gc.collect()
    gc.freeze()
    _, middle, oldest = gc.get_threshold()
    gc.set_threshold(YOUNGEST_THRESHOLD, middle, oldest)
    log.debug("gc: %d startup objects frozen, youngest threshold %d", gc.get_freeze_count(), YOUNGEST_THRESHOLD)
