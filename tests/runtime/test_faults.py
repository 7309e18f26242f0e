"""``stagemesh.runtime.faults`` as pure objects: the fault seam (clock and sleep passed in), the
faults' validation and wire form, and the
stream-drop signal."""

from __future__ import annotations

import asyncio

import pytest

from stagemesh.errors import Internal, Unavailable
from stagemesh.runtime.faults import (
    ClearFaults,
    DropStreams,
    FailNext,
    FaultInjector,
    FaultSeam,
    OpenStreams,
    Stall,
    fault_from_pb,
    fault_to_pb,
    unless_dropped,
)
from stagemesh.v1 import admin_pb2

# --- the seam -------------------------------------------------------------------------------


class FakeTime:
    def __init__(self) -> None:
        self.now = 100.0
        self.slept: list[float] = []

    def clock(self) -> float:
        return self.now

    def sleep(self, seconds: float) -> None:
        self.slept.append(seconds)
        self.now += seconds


def test_fail_next_fails_exactly_that_many_steps_with_the_code():
    seam = FaultSeam("stage-c0-s1")
    seam.before_step()  # nothing armed
    seam.inject(FailNext(2, "INTERNAL"))
    for n in (1, 2):
        with pytest.raises(Internal, match=f"stage-c0-s1: injected fault: failing step/call {n} of 2"):
            seam.before_step()
    seam.before_step()
    assert seam.take() is None


def test_stall_holds_each_step_during_its_window_then_stops():
    t = FakeTime()
    seam = FaultSeam("expert-c0-e0", clock=t.clock, sleep=t.sleep)
    seam.inject(Stall(stall_s=2.0, for_s=5.0))  # until 105
    seam.before_step()  # at 100: stalls to 102
    seam.before_step()  # at 102: stalls to 104
    seam.before_step()  # at 104: stalls to 106
    seam.before_step()  # at 106: the window is over
    assert t.slept == [2.0, 2.0, 2.0]


def test_a_stall_and_a_failure_together_stall_then_fail_and_clear_forgets_both():
    t = FakeTime()
    seam = FaultSeam("w", clock=t.clock, sleep=t.sleep)
    seam.inject(Stall(1.0, 10.0))
    seam.inject(FailNext(5))
    with pytest.raises(Unavailable):
        seam.before_step()
    assert t.slept == [1.0]
    seam.clear()
    seam.before_step()
    assert t.slept == [1.0]


@pytest.mark.parametrize(("make", "match"), [
    (lambda: FailNext(0), "fail at least 1 step"),
    (lambda: FailNext(1, "NOPE"), "gRPC status code name"),
    (lambda: FailNext(1, "OK"), "gRPC status code name"),
    (lambda: Stall(0, 1), "must be > 0"),
    (lambda: Stall(1, -1), "must be > 0"),
])
def test_bad_faults_are_refused_naming_what_to_fix(make, match):
    with pytest.raises(ValueError, match=match):
        make()


@pytest.mark.parametrize("fault", [FailNext(3, "INTERNAL"), Stall(0.5, 2.0), DropStreams(), ClearFaults()])
def test_faults_cross_the_wire_unchanged(fault):
    assert fault_from_pb(admin_pb2.InjectFaultRequest.FromString(fault_to_pb(fault).SerializeToString())) == fault


def test_a_request_without_a_fault_or_a_code_reads_as_documented():
    with pytest.raises(ValueError, match="names no fault"):
        fault_from_pb(admin_pb2.InjectFaultRequest())
    assert fault_from_pb(admin_pb2.InjectFaultRequest(fail=admin_pb2.FailSteps(count=1))) == FailNext(1, "UNAVAILABLE")


# --- dropping streams -----------------------------------------------------------------------


class AbortingContext:
    def __init__(self) -> None:
        self.aborted: tuple | None = None

    async def abort(self, code, details):
        self.aborted = (code.name, details)
        raise RuntimeError("aborted")  # grpc.aio raises too


def test_unless_dropped_awaits_plainly_when_injection_is_off_and_aborts_on_a_drop():
    async def scenario():
        off = OpenStreams(enabled=False)
        assert off.open() is None
        assert await unless_dropped(asyncio.sleep(0, "x"), None, AbortingContext()) == "x"

        injector = FaultInjector("stage-c0-s0", enabled=True)
        dropped, context = injector.streams.open(), AbortingContext()
        pending = asyncio.get_running_loop().create_future()  # an answer still being computed
        waiting = asyncio.ensure_future(unless_dropped(pending, dropped, context))
        await asyncio.sleep(0.01)
        assert injector.apply(DropStreams()) == "dropped 1 open stream(s)"
        with pytest.raises(RuntimeError, match="aborted"):
            await waiting
        assert not pending.cancelled()  # its owner still settles it
        injector.streams.close(dropped)
        assert injector.apply(DropStreams()) == "dropped 0 open stream(s)"
        return context.aborted

    assert asyncio.run(scenario()) == ("UNAVAILABLE", "stage-c0-s0: injected fault: stream dropped")
