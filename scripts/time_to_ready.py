"""How long `stagemesh up` takes to print its ready line, and the CPU it spends getting there.

    python scripts/time_to_ready.py --model /tmp/tiny [--pp 1,2,4] [--runs 3] [--tree DIR] [--port 50710]

Each run starts ``stagemesh up --model MODEL --pp P --insecure`` from the tree ``--tree`` (the
checkout this script is in by default: two trees give a before/after pair), waits for the ready
line, SIGTERMs it, and prints the seconds from the start to the ready line and the CPU-seconds
that `up` and every process it started used from the start until all of them had exited.
Start-up is mostly each process's Python and torch imports and each stage's load; what is left
is the waits between them (a stage for its next stage, the gateway for its stages, a frontend
for the gateway, the launcher for its frontends).
"""

from __future__ import annotations

import argparse
import os
import resource
import signal
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _children_cpu_s() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def time_to_ready(tree: Path, model: str, pp: int, port: int, timeout_s: float = 120.0) -> tuple[float, float]:
    """(seconds to the ready line, CPU-seconds of the whole run) of one `stagemesh up`."""
    env = dict(os.environ, PYTHONPATH=str(tree))
    command = [sys.executable, "-m", "stagemesh.cli", "up", "--model", model, "--pp", str(pp), "--insecure",
               "--port", str(port)]
    cpu0, t0 = _children_cpu_s(), time.monotonic()
    proc = subprocess.Popen(command, cwd=tree, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True)
    ready = None
    try:
        for line in proc.stdout:
            if line.startswith("stagemesh ready"):
                ready = time.monotonic() - t0
                break
            if time.monotonic() - t0 > timeout_s:
                break
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(60)
    if ready is None:
        raise SystemExit(f"no ready line from {' '.join(command)} (exit code {proc.returncode})")
    return ready, _children_cpu_s() - cpu0


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", required=True)
    parser.add_argument("--pp", default="1,2,4", help="layouts, comma-separated")
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--tree", type=Path, default=ROOT, help="the checkout whose code runs")
    parser.add_argument("--port", type=int, default=50710)
    args = parser.parse_args()
    for pp in (int(p) for p in args.pp.split(",")):
        for _ in range(args.runs):
            ready, cpu = time_to_ready(args.tree.resolve(), args.model, pp, args.port)
            print(f"{args.tree.resolve().name} pp={pp}: ready in {ready:.2f} s, {cpu:.2f} CPU-s", flush=True)
            time.sleep(1.0)  # the ports and the cores settle


if __name__ == "__main__":
    main()
