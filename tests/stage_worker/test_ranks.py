"""How rank 0 watches its TP ranks' processes (``stage_worker.ranks.RankProcesses``), with real
processes standing in for them: one that dies reads dead; one stopped (SIGSTOP) for the limit is
SIGKILLed and reads dead; one stopped for less, or with no limit, is left alone."""

from __future__ import annotations

import os
import signal
import sys
import time

from stage_worker.ranks import RankProcesses
from stagemesh.runtime.procs import stopped

SLEEPER = [sys.executable, "-c", "import time; time.sleep(600)"]
LIMIT_S = 0.5


def _ranks(limit_s: float) -> RankProcesses:
    return RankProcesses([SLEEPER, SLEEPER], stopped_limit_s=limit_s)


def test_a_rank_stopped_for_the_limit_is_killed_and_reads_dead():
    ranks = _ranks(LIMIT_S)
    try:
        assert ranks.first_dead() is None
        os.kill(ranks.pids[2], signal.SIGSTOP)
        t_stop = time.monotonic()
        while not stopped(ranks.pids[2]):  # the kernel stops it asynchronously
            time.sleep(0.005)
        while (dead := ranks.first_dead()) is None:
            assert time.monotonic() - t_stop < LIMIT_S + 5.0, "a stopped rank was never killed"
            time.sleep(0.02)
        took = time.monotonic() - t_stop
        assert dead == (2, -signal.SIGKILL)
        assert took >= LIMIT_S, took
        assert ranks.procs[1].poll() is None  # the running one is left alone
    finally:
        ranks.kill()


def test_a_rank_stopped_for_less_than_the_limit_or_with_no_limit_is_left_alone():
    for limit_s, stopped_for in ((LIMIT_S * 4, LIMIT_S), (0.0, LIMIT_S * 2)):
        ranks = _ranks(limit_s)
        try:
            os.kill(ranks.pids[1], signal.SIGSTOP)
            end = time.monotonic() + stopped_for
            while time.monotonic() < end:
                assert ranks.first_dead() is None
                time.sleep(0.02)
            os.kill(ranks.pids[1], signal.SIGCONT)
            time.sleep(0.05)
            assert ranks.first_dead() is None and not stopped(ranks.pids[1])
        finally:
            ranks.kill()


def test_a_rank_that_dies_reads_dead_with_its_exit_code():
    ranks = _ranks(LIMIT_S)
    try:
        os.kill(ranks.pids[1], signal.SIGTERM)
        assert ranks.wait_dead(5.0) == (1, -signal.SIGTERM)
    finally:
        ranks.kill()
