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

from gateway.gateway import LATE_CHAIN_WAIT_S
from gateway.journal import DEFAULT_FLUSH_INTERVAL_S
from stagemesh.mesh.store import Store
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
    with stagemesh_up(model_dir, logs, *args) as (addr, redis_url, up):
        yield addr, logs, admin_tls(up), redis_url  # the workers' Admin service takes mesh certificates only


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
    addr, _, tls, _ = mesh
    requests, expected = fault_free
    got, told = _with_fault(addr, requests, _address(addr, 0, 1), FailNext(3), tls)
    assert told == ["stage-c0-s1: will fail its next 3 step(s)/call(s) with UNAVAILABLE"]
    same_tokens(model_dir, requests, expected, got)


def test_a_stage_dropping_its_streams_costs_no_token(mesh, model_dir, fault_free):
    addr, _, tls, _ = mesh
    requests, expected = fault_free
    got, told = _with_fault(addr, requests, _address(addr, 1, 0), DropStreams(), tls)
    assert told == ["stage-c1-s0: dropped 1 open stream(s)"]  # the gateway's stream into chain 1
    same_tokens(model_dir, requests, expected, got)


def test_a_stage_stalling_past_the_step_deadline_is_fenced_and_costs_no_token(mesh, model_dir, fault_free):
    addr, logs, tls, _ = mesh
    requests, expected = fault_free
    got, _ = _with_fault(addr, requests, _address(addr, 0, 1), Stall(stall_s=6.0, for_s=1.0), tls)
    same_tokens(model_dir, requests, expected, got)
    fired = [line for line in (logs / "gateway.log").read_text().splitlines() if "did not answer step" in line]
    assert fired, "the step deadline never fired"


@pytest.mark.parametrize("journal_lost", [False, True], ids=["journaled", "journal-lost"])
def test_a_gateway_killed_while_a_chain_is_frozen_comes_back_with_the_other_and_costs_no_token(mesh, model_dir,
                                                                                              fault_free, journal_lost):
    """The new gateway serves on the chain that serves: it does not wait for the frozen one (which
    joins once it answers again). The gateway dies two journal windows after the freeze, so its
    requests are in the journal and the new one takes them over; or their journal entries are
    lost with it (Redis lost them, or it died before its first flush), so only the frontends hold
    them, and resubmit them once the new one serves: it must not wait for every chain as at a
    first start (``LATE_CHAIN_WAIT_S``, the 30 s this took before ``Gateway._mesh_served``)."""
    addr, logs, _, redis_url = mesh
    requests, expected = fault_free
    doc = status(addr)
    frozen = next(w["pid"] for w in doc["workers"] if (w["role"], w["chain"], w["stage"]) == ("stage", 1, 0))
    gateway = doc["gateway"]["pid"]
    before = (logs / "gateway.log").read_text()
    done: list[float] = []
    forgetting: list[asyncio.Task] = []

    def kill() -> None:
        os.kill(gateway, signal.SIGKILL)
        done.append(time.monotonic())
        if journal_lost:  # gone before the new gateway, a new interpreter, can read it
            forgetting.append(asyncio.get_running_loop().create_task(_forget_journal(redis_url)))

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
    assert logged.count("serving with 1 of 2 chain(s)") == before.count("serving with 1 of 2 chain(s)") + 1
    assert took < LATE_CHAIN_WAIT_S, took  # it did not wait for the frozen chain
    took_over = logged.count("took over") > before.count("took over")
    assert took_over != journal_lost  # from the journal, or nothing there to take over
    assert forgetting and forgetting[0].result() > 0 if journal_lost else not forgetting
    wait_whole(addr, 4, time.monotonic(), RECOVERY_S)  # the thawed chain joins the new gateway
    print(f"gateway SIGKILL with chain 1 frozen{', its journal lost' if journal_lost else ''}: {len(requests)} "
          f"streams whole {took:.1f} s after the kill")


async def _forget_journal(redis_url: str) -> int:
    """Close every open request's journal entry (what a Redis that lost them holds); how many there were."""
    store = await Store.connect(redis_url)
    try:
        ids = [rid for chain in (0, 1) for rid in await store.journal_by_chain(chain)]
        await store.journal_close_many(ids)
        return len(ids)
    finally:
        await store.close()
