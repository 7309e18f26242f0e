"""Times every garbage collection of a Python process, for BENCHMARKS.md's GC figures.

Put this folder on ``PYTHONPATH`` and set ``GC_PROBE_DIR``: every Python process started so
(``stagemesh up`` and each process it starts) counts its collections per generation, their total
and longest time, while the file ``$GC_PROBE_DIR/measuring`` exists, and writes them at exit to
``$GC_PROBE_DIR/gc.<program>.<pid>.json``. E.g.::

    mkdir -p /tmp/gc && PYTHONPATH=scripts/gc_probe GC_PROBE_DIR=/tmp/gc \\
        stagemesh up --model /tmp/tiny --pp 1 --insecure --port 50100 &
    touch /tmp/gc/measuring; stagemesh bench --addr 127.0.0.1:50100 ...; rm /tmp/gc/measuring
    kill %1   # then read /tmp/gc/gc.*.json

Nothing happens without ``GC_PROBE_DIR``.
"""

import os

_DIR = os.environ.get("GC_PROBE_DIR")

if _DIR:
    import atexit
    import gc
    import json
    import sys
    import time

    _flag = os.path.join(_DIR, "measuring")
    _seen = {gen: {"collections": 0, "total_s": 0.0, "max_s": 0.0} for gen in range(3)}
    _started = [0.0]

    def _timed(phase: str, info: dict) -> None:
        if phase == "start":
            _started[0] = time.perf_counter()
        elif os.path.exists(_flag):
            took, seen = time.perf_counter() - _started[0], _seen[info["generation"]]
            seen["collections"] += 1
            seen["total_s"] += took
            seen["max_s"] = max(seen["max_s"], took)

    def _write() -> None:
        program = "_".join(sys.orig_argv[1:3]).replace("/", "_").replace(" ", "_") or "python"
        with open(os.path.join(_DIR, f"gc.{program}.{os.getpid()}.json"), "w") as out:
            json.dump({"generations": _seen, "frozen": gc.get_freeze_count(), "cpu_s": time.process_time()}, out)

    gc.callbacks.append(_timed)
    atexit.register(_write)
