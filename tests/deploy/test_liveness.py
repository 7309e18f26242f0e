"""`stagemesh up`'s liveness probe (``stagemesh.deploy.liveness.Liveness``) against real gRPC health
servers in other processes: NOT_SERVING is alive, a frozen one (SIGSTOP) is silent once ``after_s``
has passed and alive again once it runs, silence counts from the latest readiness, and a check
never blocks its caller however many processes are frozen."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from contextlib import contextmanager

import pytest

from stagemesh.deploy.liveness import CALL_TIMEOUT_S, Liveness
from stagemesh.runtime.net import free_port

SERVE = """
import sys, time
from concurrent import futures
import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
servicer = health.HealthServicer()
servicer.set("", health_pb2.HealthCheckResponse.NOT_SERVING)  # alive, not ready (a stage waiting on its next)
server = grpc.server(futures.ThreadPoolExecutor(2))
health_pb2_grpc.add_HealthServicer_to_server(servicer, server)
server.add_insecure_port(sys.argv[1])
server.start()
print("serving", flush=True)
time.sleep(600)
"""
AFTER_S = 1.0


@contextmanager
def health_server():
    """(address, process) of a real gRPC health server that answers NOT_SERVING."""
    address = f"127.0.0.1:{free_port()}"
    proc = subprocess.Popen([sys.executable, "-c", SERVE, address], stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout.readline().strip() == "serving"
        yield address, proc
    finally:
        os.kill(proc.pid, signal.SIGCONT)
        proc.kill()
        proc.wait()


def _watch(liveness: Liveness, watched: dict[str, tuple[str, float]], seconds: float) -> list[tuple[float, list]]:
    """Call ``silent`` every 50 ms for ``seconds``, as the launcher's supervision does: (time, what it said)."""
    said, end = [], time.monotonic() + seconds
    while (now := time.monotonic()) < end:
        said.append((now, liveness.silent(watched, now)))
        time.sleep(0.05)
    return said


def test_a_not_serving_process_is_alive_and_a_frozen_one_is_silent_until_it_runs_again():
    liveness = Liveness(after_s=AFTER_S, every_s=0.2)
    with health_server() as (address, proc):
        watched = {"stage-c0-s1": (address, time.monotonic())}
        said = _watch(liveness, watched, 2 * AFTER_S)
        assert all(not silent for _, silent in said), "an answering process read silent"
        os.kill(proc.pid, signal.SIGSTOP)
        frozen = time.monotonic()
        said = _watch(liveness, watched, AFTER_S + 2 * CALL_TIMEOUT_S)
        first = next((t for t, silent in said if silent), None)
        assert first is not None, "a frozen process never read silent"
        assert first - frozen >= AFTER_S - 0.25, first - frozen  # its last answer came at most a check before
        names = {name for _, silent in said for name, _ in silent}
        assert names == {"stage-c0-s1"}
        os.kill(proc.pid, signal.SIGCONT)
        thawed, deadline = time.monotonic(), time.monotonic() + 2 * CALL_TIMEOUT_S + 1.0
        while liveness.silent(watched, time.monotonic()):
            assert time.monotonic() < deadline, "a process that runs again still read silent"
            time.sleep(0.05)
        print(f"alive again {time.monotonic() - thawed:.2f} s after SIGCONT")
    liveness.close()


def test_silence_counts_from_the_latest_readiness_and_a_restart_forgets_the_last_answer():
    liveness = Liveness(after_s=AFTER_S, every_s=0.2)
    nobody = f"127.0.0.1:{free_port()}"  # nothing listens: never answers
    ready = time.monotonic()
    said = _watch(liveness, {"gateway": (nobody, ready)}, AFTER_S + 0.5)
    first = next(t for t, silent in said if silent)
    assert first - ready >= AFTER_S
    # it exits and is started again: out of the watch while it restarts, back with a new readiness
    liveness.silent({}, time.monotonic())
    again = time.monotonic()
    assert liveness.silent({"gateway": (nobody, again)}, again) == []
    liveness.close()


def test_a_check_never_blocks_however_many_processes_are_frozen():
    liveness = Liveness(after_s=AFTER_S, every_s=0.1)
    with health_server() as (a, first), health_server() as (b, second):
        watched = {"frontend-0": (a, time.monotonic()), "frontend-1": (b, time.monotonic())}
        _watch(liveness, watched, 0.5)
        for proc in (first, second):
            os.kill(proc.pid, signal.SIGSTOP)
        longest = 0.0
        for _ in range(int(3 * CALL_TIMEOUT_S / 0.05)):
            t0 = time.monotonic()
            liveness.silent(watched, t0)
            longest = max(longest, time.monotonic() - t0)
            time.sleep(0.05)
        assert sorted(name for name, _ in liveness.silent(watched, time.monotonic())) == ["frontend-0", "frontend-1"]
    liveness.close()
    assert longest < CALL_TIMEOUT_S / 2, f"a check blocked the launcher's loop for {longest:.2f} s"


def test_a_wait_of_zero_or_less_is_refused():
    with pytest.raises(ValueError, match="positive wait"):
        Liveness(after_s=0)
