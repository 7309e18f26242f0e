"""Faults injected through the Admin service of real workers cost no token: a stage worker made
to fail its next steps, to drop its open streams, or to stall past the step deadline, each
mid-generation of 16 greedy streams on dp=2 x pp=2, every stream ending with the tokens of a
fault-free run.

The workers serve ``Admin.InjectFault`` because the mesh is started with
`stagemesh up --fault-injection` (off by default: refused FAILED_PRECONDITION).
"""

from __future__ import annotations

import asyncio
import os
import signal
import time

import pytest

from gateway.journal import DEFAULT_FLUSH_INTERVAL_S
from stagemesh.runtime.faults import DropStreams, FailNext, Fault, Stall, inject_fault
from stagemesh.runtime.tls import MeshTLS
from tests.chaos.chaos_helpers import greedy_requests, same_tokens, status, streams, wait_whole
from tests.checkpoints import make_hf_checkpoint
from tests.integration.mesh_helpers import admin_tls, stagemesh_up

pytestmark = pytest.mark.slow

STREAMS, MAX_NEW = 16, 24
INJECT_AFTER = STREAMS * 4
"""Tokens received in all before the fault: every stream is generating."""
RECOVERY_S = 30.0


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return make_hf_checkpoint("llama", tmp_path_factory.mktemp("llama4"), num_layers=4)


@pytest.fixture(scope="module")
def mesh(model_dir, tmp_path_factory):
    logs = tmp_path_factory.mktemp("logs")
    # --liveness-s 0: the freeze below is the gateway's to fence; the launcher's kill is tests/chaos/test_launcher.py's
    args = ("--pp", "2", "--dp", "2", "--fault-injection", "--liveness-s", "0")
    with stagemesh_up(model_dir, logs, *args) as (addr, _, up):
        yield addr, logs, admin_tls(up)  # the workers' Admin service takes mesh certificates only


@pytest.fixture(scope="module")
def fault_free(mesh):
    """The streams without a fault; this run also warms up the step deadlines."""
    requests = greedy_requests(STREAMS, seed=21, max_new=MAX_NEW)
    return requests, asyncio.run(streams(mesh[0], requests))


def _address(addr: str, chain: int, stage: int) -> str:
    doc = status(addr)
    return next(w["address"] for w in doc["workers"] if (w["role"], w["chain"], w["stage"]) == ("stage", chain, stage))


def _with_fault(addr: str, requests: list[dict], target: str, fault: Fault,
                tls: MeshTLS | None) -> tuple[list[list[int]], list[str]]:
    """The streams, with ``fault`` injected into the worker at ``target`` mid-generation."""
    told: list[str] = []

    def inject(total: int) -> None:
        if total == INJECT_AFTER:
            told.append(inject_fault(target, fault, tls=tls))

    got = asyncio.run(streams(addr, requests, inject))
    assert told, "the fault was never injected: the streams ended first"
    wait_whole(addr, 4, time.monotonic(), RECOVERY_S)
    return got, told


def test_a_stage_failing_its_next_steps_costs_no_token(mesh, model_dir, fault_free):
    addr, _, tls = mesh
    requests, expected = fault_free
    got, told = _with_fault(addr, requests, _address(addr, 0, 1), FailNext(3), tls)
    assert told == ["stage-c0-s1: will fail its next 3 step(s)/call(s) with UNAVAILABLE"]
    same_tokens(model_dir, requests, expected, got)


def test_a_stage_dropping_its_streams_costs_no_token(mesh, model_dir, fault_free):
    addr, _, tls = mesh
    requests, expected = fault_free
    got, told = _with_fault(addr, requests, _address(addr, 1, 0), DropStreams(), tls)
    assert told == ["stage-c1-s0: dropped 1 open stream(s)"]  # the gateway's stream into chain 1
    same_tokens(model_dir, requests, expected, got)


def test_a_stage_stalling_past_the_step_deadline_is_fenced_and_costs_no_token(mesh, model_dir, fault_free):
    addr, logs, tls = mesh
    requests, expected = fault_free
    got, _ = _with_fault(addr, requests, _address(addr, 0, 1), Stall(stall_s=6.0, for_s=1.0), tls)
    same_tokens(model_dir, requests, expected, got)
    fired = [line for line in (logs / "gateway.log").read_text().splitlines() if "did not answer step" in line]
    assert fired, "the step deadline never fired"


def test_a_gateway_killed_while_a_chain_is_frozen_comes_back_with_the_other_and_costs_no_token(mesh, model_dir,
                                                                                              fault_free):
    """The new gateway takes the open requests over on the chain that serves: it does not wait
    for the frozen one (which joins once it answers again). The gateway dies two journal windows
    after the freeze: a gateway killed before its journal's first flush leaves nothing there to
    take over, and one that restarts with nothing to take over waits up to 30 s for every chain
    (``gateway.gateway.LATE_CHAIN_WAIT_S``) before its frontends can resubmit their requests."""
    addr, logs, _ = mesh
    requests, expected = fault_free
    doc = status(addr)
    frozen = next(w["pid"] for w in doc["workers"] if (w["role"], w["chain"], w["stage"]) == ("stage", 1, 0))
    gateway = doc["gateway"]["pid"]
    done: list[float] = []

    def kill() -> None:
        os.kill(gateway, signal.SIGKILL)
        done.append(time.monotonic())

    def freeze_and_kill(total: int) -> None:
        if total == INJECT_AFTER:
            os.kill(frozen, signal.SIGSTOP)
            asyncio.get_running_loop().call_later(2 * DEFAULT_FLUSH_INTERVAL_S, kill)

    try:
        got = asyncio.run(streams(addr, requests, freeze_and_kill))
        took = time.monotonic() - done[0]
    finally:
        os.kill(frozen, signal.SIGCONT)
    same_tokens(model_dir, requests, expected, got)
    logged = (logs / "gateway.log").read_text()
    assert "serving with 1 of 2 chain(s)" in logged and "took over" in logged  # from the journal
    wait_whole(addr, 4, time.monotonic(), RECOVERY_S)  # the thawed chain joins the new gateway
    print(f"gateway SIGKILL with chain 1 frozen: {len(requests)} streams whole {took:.1f} s after the kill")
