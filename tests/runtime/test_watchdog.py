"""A serving process whose event loop stands still for ``--liveness-s`` ends itself with every
thread's stack in its log, so that `stagemesh up`, compose or Kubernetes restarts it
(``stagemesh.runtime.watchdog``). Real processes running ``stagemesh.runtime.server.run``."""

from __future__ import annotations

import signal
import subprocess
import sys
import time

import pytest

from stagemesh.runtime.net import free_port
from stagemesh.runtime.watchdog import LoopWatchdog


@pytest.fixture
def start():
    """Starts tests/runtime/watched_server.py and returns it once it serves; kills what is left after the test."""
    procs = []

    def start(liveness_s: float, stall_after_s: float | None = None) -> subprocess.Popen:
        args = [str(free_port()), str(liveness_s), *([] if stall_after_s is None else [str(stall_after_s)])]
        proc = subprocess.Popen([sys.executable, "-m", "tests.runtime.watched_server", *args],
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        procs.append(proc)
        assert proc.stdout.readline().strip() == "serving", proc.communicate(timeout=30)
        return proc

    yield start
    for proc in procs:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()


def ended(proc: subprocess.Popen, within_s: float) -> tuple[int | None, str]:
    """(exit code, stderr) once it ended, or (None, "") if it still runs after ``within_s``."""
    try:
        _, err = proc.communicate(timeout=within_s)
    except subprocess.TimeoutExpired:
        return None, ""
    return proc.returncode, err


def stop(proc: subprocess.Popen) -> tuple[int, str]:
    """SIGTERM, then its exit code and stderr."""
    proc.send_signal(signal.SIGTERM)
    code, err = ended(proc, 30)
    assert code is not None, "it did not stop on SIGTERM"
    return code, err


def test_a_loop_stuck_for_the_liveness_wait_ends_the_process_with_the_stuck_stack_in_its_log(start):
    proc = start(liveness_s=1.0, stall_after_s=0.3)
    began = time.monotonic()
    code, err = ended(proc, within_s=30)
    took = time.monotonic() - began
    assert code == 1, (code, err)
    assert "Timeout" in err and "stuck_forever" in err, err  # faulthandler's dump: what was stuck
    assert 1.0 <= took < 10, took


def test_a_loop_that_runs_keeps_its_process_however_long_it_serves(start):
    proc = start(liveness_s=1.0)
    assert ended(proc, within_s=4) == (None, "")  # four liveness waits
    code, err = stop(proc)
    assert code == 0 and "Timeout" not in err, err  # disarmed before the drain


def test_liveness_0_never_ends_a_stuck_process(start):
    proc = start(liveness_s=0, stall_after_s=0.1)
    assert ended(proc, within_s=3) == (None, "")


def test_a_process_stopped_for_less_than_the_wait_serves_on(start):
    proc = start(liveness_s=1.0)
    proc.send_signal(signal.SIGSTOP)
    time.sleep(0.5)
    proc.send_signal(signal.SIGCONT)
    assert ended(proc, within_s=3) == (None, "")
    assert stop(proc)[0] == 0


@pytest.mark.parametrize("module", ["gateway", "frontend", "stage_worker", "expert_worker"])
def test_a_negative_wait_is_refused_before_anything_starts(module):
    proc = subprocess.run([sys.executable, "-m", module, "--liveness-s", "-1"], capture_output=True, text=True,
                          timeout=60)
    assert proc.returncode == 2, proc.stderr
    assert "argument --liveness-s: -1: give how long the event loop may stand still, or 0: never" in proc.stderr
    with pytest.raises(ValueError, match="--liveness-s -1: give how long the event loop may stand still, or 0"):
        LoopWatchdog(-1)
