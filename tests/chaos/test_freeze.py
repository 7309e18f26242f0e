"""Freezes that health checks cannot see are fenced within seconds: SIGSTOP for ``FREEZE_S`` of
a TP rank > 0, of an expert worker (2 replicas) and of a stage worker, mid-generation of 16
greedy streams on dp=2, each time with every stream ending with the tokens of a fault-free run.

One real `stagemesh up` (Mixtral, tp=2 over gloo, ep=2 with 2 replicas, dp=2) serves all three.
A frozen process keeps its sockets open; the deadlines that follow the measured step time
(``gateway.chain_client``) and expert-call time (``stage_worker.remote_experts``) find it, the
chain's requests move to the other chain (or the batch's rows to the other expert replica),
and the fenced chain stays out of service until the process runs again (no flapping).

Each scenario prints the longest gap a client saw between two tokens (an upper bound on any
micro-batch's wait on the frozen process, failover included) and the waits the logs name.
``STAGEMESH_FREEZE_S=30`` runs the 30 s freezes by hand.
"""

from __future__ import annotations

import asyncio
import os
import re
import signal
import threading
import time
from pathlib import Path

import pytest

from stagemesh.runtime.faults import FailNext, inject_fault
from tests.chaos.chaos_helpers import greedy_requests, same_tokens, status, timed_streams, wait_whole
from tests.checkpoints import make_hf_checkpoint
from tests.integration.mesh_helpers import admin_tls, children, stagemesh_up

pytestmark = pytest.mark.slow

FREEZE_S = float(os.environ.get("STAGEMESH_FREEZE_S", "8"))
STREAMS, MAX_NEW = 16, 24
FREEZE_AFTER = STREAMS * 4
"""Tokens received in all before the SIGSTOP: every stream is generating."""
LONGEST_GAP_S = 15.0
"""What the test asserts of the longest gap a client saw between two tokens. NOTE: measured on
the 2-core CI VM over five runs (8 s and 30 s freezes): 2.3-2.5 s for a TP rank or a stage
worker (the 2.2-2.4 s step deadline, then the re-prefill on the other chain), 1.1-1.3 s for an
expert worker (its 1.1-1.3 s deadline, then the re-send); 3.9 s once while other tests loaded
the cores. The bound leaves room for a loaded host; the figures are printed for the record."""
DEADLINE_S = 5.0
"""Every deadline that fires on the frozen process: the issue's "no micro-batch waits longer
than 5 s on the frozen process". It follows the measured step time (2 s + 3 × p99), which
would have to pass a p99 of 1 s on this VM to break it (measured: 0.03-0.62 s)."""
RECOVERY_S = 30.0


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> Path:
    return make_hf_checkpoint("mixtral", tmp_path_factory.mktemp("mixtral"), num_layers=2)


@pytest.fixture(scope="module")
def mesh(model_dir, tmp_path_factory):
    logs = tmp_path_factory.mktemp("logs")
    # --liveness-s 0: the freezes are the gateway's and the stages' to fence, and end in SIGCONT; the
    # launcher's kill of a frozen process is tests/chaos/test_launcher.py's
    args = ("--tp", "2", "--ep", "2", "--expert-replicas", "2", "--dp", "2", "--fault-injection", "--liveness-s", "0")
    with stagemesh_up(model_dir, logs, *args) as (addr, _, proc):
        yield addr, proc, logs


@pytest.fixture(scope="module")
def fault_free(mesh):
    """The streams without a fault; this run also warms up every deadline."""
    requests = greedy_requests(STREAMS, seed=11, max_new=MAX_NEW)
    tokens, _ = asyncio.run(timed_streams(mesh[0], requests))
    return requests, tokens


class Freeze:
    """SIGSTOP ``pid`` when called, SIGCONT it ``FREEZE_S`` later (or on ``end``); meanwhile
    records whether chain ``chain`` read healthy after it had been fenced."""

    def __init__(self, addr: str, pid: int, chain: int):
        self.addr, self.pid, self.chain = addr, pid, chain
        self.stopped_at: float | None = None
        self.flapped = False
        self._done = threading.Event()
        self._watch = threading.Thread(target=self._follow, daemon=True)

    def __call__(self) -> None:
        os.kill(self.pid, signal.SIGSTOP)
        self.stopped_at = time.monotonic()
        self._watch.start()

    def _follow(self) -> None:
        fenced = False
        while not self._done.wait(0.25) and time.monotonic() - self.stopped_at < FREEZE_S:
            try:
                healthy = next(c["healthy"] for c in status(self.addr)["chains"] if c["id"] == self.chain)
            except Exception:  # noqa: BLE001 - a slow answer is no verdict; ask again
                continue
            fenced |= not healthy
            self.flapped |= fenced and healthy
        self.end()

    def end(self) -> None:
        """SIGCONT (at once when the freeze is not over yet)."""
        self._done.set()
        if self.stopped_at is not None:
            os.kill(self.pid, signal.SIGCONT)

    def wait(self) -> None:
        if self._watch.is_alive():
            self._watch.join()


def freeze(addr: str, pid: int, chain: int, requests: list[dict]) -> tuple[list[list[int]], float, Freeze]:
    """The streams with ``pid`` frozen mid-generation for FREEZE_S; SIGCONT whatever happens."""
    frozen = Freeze(addr, pid, chain)
    try:
        tokens, gap = asyncio.run(timed_streams(addr, requests, frozen, FREEZE_AFTER))
        frozen.wait()
    finally:
        frozen.end()
    return tokens, gap, frozen


def chain_outages(addr: str, chain: int) -> int:
    return next(c["outages"] for c in status(addr)["gateway"]["chains"] if c["id"] == chain)


def logged_waits(log: Path, pattern: str) -> list[float]:
    """Every ``within X s`` a log names in lines matching ``pattern`` (the deadlines that fired:
    one line each, where the stream was reset)."""
    return [float(m) for line in log.read_text().splitlines() if re.search(pattern, line)
            for m in re.findall(r"within ([\d.]+) s", line)]


def _stage_pid(addr: str, chain: int) -> int:
    return next(w["pid"] for w in status(addr)["workers"] if (w["role"], w["chain"], w["stage"]) == ("stage", chain, 0))


def _report(what: str, gap: float, waits: list[float], frozen: Freeze) -> None:
    print(f"SIGSTOP {FREEZE_S:g} s of {what}: longest gap a client saw {gap:.2f} s; deadlines that fired "
          f"{sorted(waits)}; fenced chain flapped back while frozen: {frozen.flapped}")


def test_a_frozen_tp_rank_is_fenced_within_seconds_and_costs_no_token(mesh, model_dir, fault_free):
    addr, _, logs = mesh
    requests, expected = fault_free
    (rank1,) = children(_stage_pid(addr, 0), "stage_worker.tp_rank")
    before = chain_outages(addr, 0)
    got, gap, frozen = freeze(addr, rank1, 0, requests)
    same_tokens(model_dir, requests, expected, got)
    wait_whole(addr, 2, time.monotonic(), RECOVERY_S)
    waits = logged_waits(logs / "gateway.log", r"stage c0-s0 .* did not answer step .* failing")
    _report("TP rank 1 of c0-s0", gap, waits, frozen)
    assert waits and max(waits) < DEADLINE_S, waits  # the step deadline fenced it: health checks cannot
    assert chain_outages(addr, 0) == before + 1 and not frozen.flapped
    assert gap < LONGEST_GAP_S, gap


def test_a_frozen_expert_worker_costs_its_batch_a_resend_and_no_token(mesh, model_dir, fault_free):
    addr, _, logs = mesh
    requests, expected = fault_free
    expert = next(w for w in status(addr)["workers"] if (w["role"], w["chain"]) == ("expert", 0))
    got, gap, frozen = freeze(addr, expert["pid"], 0, requests)
    same_tokens(model_dir, requests, expected, got)
    wait_whole(addr, 2, time.monotonic(), RECOVERY_S)
    waits = logged_waits(logs / "stage-c0-s0.log", r"did not answer a batch .* failing")
    _report(f"expert worker at {expert['address']}", gap, waits, frozen)
    assert max(waits, default=0) < DEADLINE_S, waits  # none when the placement marked it down first
    assert gap < LONGEST_GAP_S, gap


def test_a_frozen_stage_worker_is_fenced_within_seconds_and_costs_no_token(mesh, model_dir, fault_free):
    addr, _, logs = mesh
    requests, expected = fault_free
    before = chain_outages(addr, 1)
    got, gap, frozen = freeze(addr, _stage_pid(addr, 1), 1, requests)
    same_tokens(model_dir, requests, expected, got)
    wait_whole(addr, 2, time.monotonic(), RECOVERY_S)
    waits = logged_waits(logs / "gateway.log", r"stage c1-s0 .* did not answer step .* failing")
    _report("stage worker c1-s0", gap, waits, frozen)
    assert max(waits, default=0) < DEADLINE_S, waits  # none when its missed heartbeats fenced it first
    assert chain_outages(addr, 1) == before + 1 and not frozen.flapped
    assert gap < LONGEST_GAP_S, gap


def test_every_replica_failing_mid_step_on_a_tp_stage_costs_no_token_and_leaves_the_ranks_in_step(mesh, model_dir,
                                                                                                  fault_free):
    """Both replicas of chain 0's experts fail their next calls: rank 0's step fails mid-layer
    while rank 1 goes on to the all-reduce. The step's error waits for its end
    (``stage_worker.stage.DeferredExpertErrors``), so the ranks stay in step, the chain comes back,
    and the streams move on (before, the group hung for good: a SIGSTOPped rank 0 that woke up to
    both replicas' deadlines passed did it)."""
    addr, up, _ = mesh
    requests, expected = fault_free
    experts = [w["address"] for w in status(addr)["workers"] if (w["role"], w["chain"]) == ("expert", 0)]
    assert len(experts) == 2

    def fail_both() -> None:
        for address in experts:
            inject_fault(address, FailNext(2), tls=admin_tls(up))

    got, _ = asyncio.run(timed_streams(addr, requests, fail_both, FREEZE_AFTER))
    same_tokens(model_dir, requests, expected, got)
    wait_whole(addr, 2, time.monotonic(), RECOVERY_S)
    again = greedy_requests(4, seed=12, max_new=8)
    assert all(len(t) == 8 for t in asyncio.run(timed_streams(addr, again))[0])  # chain 0 steps again
