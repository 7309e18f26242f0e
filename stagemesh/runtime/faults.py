"""Faults injected on purpose through the ``stagemesh.v1.Admin`` service (``FaultInjector``,
``inject_fault``), for chaos tests and drills. Torch-free. (When a silent peer counts as
frozen is ``stagemesh.runtime.deadline``.)

NOTE: fault injection. A worker started with ``--enable-fault-injection`` (``stagemesh up
--fault-injection`` passes it to every worker; or ``STAGEMESH_FAULT_INJECTION=1`` in the
worker's environment) serves ``Admin.InjectFault``: fail its next N steps/calls with a status code,
stall every step/call for S seconds during the next D seconds, or drop its open streams.
Without it the RPC answers FAILED_PRECONDITION saying how to turn it on. Faults act at one
seam per worker: ``FaultSeam.before_step`` at the top of each step/call on its compute thread,
and ``unless_dropped`` around each await of a served stream.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import threading
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import TypeVar

import grpc

from stagemesh.errors import StagemeshError, error_for
from stagemesh.runtime import tls as mesh_tls
from stagemesh.runtime.tls import MeshTLS
from stagemesh.v1 import admin_pb2, admin_pb2_grpc

log = logging.getLogger(__name__)

T = TypeVar("T")

# --- faults ---------------------------------------------------------------------------------

FAULT_INJECTION_ENV = "STAGEMESH_FAULT_INJECTION"
"""Set to 1 to turn fault injection on in every worker that inherits the environment."""
_CODES = frozenset(c.name for c in grpc.StatusCode if c is not grpc.StatusCode.OK)


def enabled_by_env() -> bool:
    """Whether ``STAGEMESH_FAULT_INJECTION`` turns fault injection on (1, true, yes, on)."""
    return os.environ.get(FAULT_INJECTION_ENV, "").strip().lower() in ("1", "true", "yes", "on")


@dataclass(frozen=True)
class FailNext:
    """The next ``count`` steps/calls are answered with ``code`` instead of running."""

    count: int
    code: str = "UNAVAILABLE"
    """A gRPC status code name. UNAVAILABLE is what a dead peer gives: callers retry elsewhere."""

    def __post_init__(self) -> None:
        if self.count < 1:
            raise ValueError(f"fail count={self.count}: fail at least 1 step")
        if self.code not in _CODES:
            raise ValueError(f"fail code={self.code!r}: use a gRPC status code name such as UNAVAILABLE")


@dataclass(frozen=True)
class Stall:
    """Every step/call that starts in the next ``for_s`` seconds first waits ``stall_s`` seconds."""

    stall_s: float
    for_s: float

    def __post_init__(self) -> None:
        if not (self.stall_s > 0 and self.for_s > 0):
            raise ValueError(f"stall_s={self.stall_s}, for_s={self.for_s}: both must be > 0")


@dataclass(frozen=True)
class DropStreams:
    """Abort every stream the worker serves now (UNAVAILABLE)."""


@dataclass(frozen=True)
class ClearFaults:
    """Forget the failures and stalls not used up yet."""


Fault = FailNext | Stall | DropStreams | ClearFaults


@dataclass(frozen=True)
class Injected:
    """What the seam does to one step/call: stall first, then fail with ``error`` (when set)."""

    stall_s: float = 0.0
    error: StagemeshError | None = None


class FaultSeam:
    """The faults a worker's steps/calls have yet to suffer; ``before_step`` runs at the top of
    each one, on the compute thread. Thread-safe: the Admin RPC injects on the event loop."""

    def __init__(self, name: str, clock: Callable[[], float] = time.monotonic,
                 sleep: Callable[[float], None] = time.sleep):
        self.name = name
        self._clock, self._sleep = clock, sleep
        self._lock = threading.Lock()
        self._fail: FailNext | None = None
        self._failed = 0
        self._stall: tuple[float, float] | None = None
        """(stall_s, until) on the clock."""

    def inject(self, fault: FailNext | Stall) -> None:
        """Arm ``fault``; it replaces an armed fault of its kind."""
        with self._lock:
            if isinstance(fault, FailNext):
                self._fail, self._failed = fault, 0
            else:
                self._stall = (fault.stall_s, self._clock() + fault.for_s)

    def clear(self) -> None:
        with self._lock:
            self._fail, self._stall = None, None

    def take(self) -> Injected | None:
        """What to do to the step/call about to run (used up as it goes), or None."""
        if self._fail is None and self._stall is None:
            return None  # the common case, without the lock
        with self._lock:
            stall_s = 0.0
            if self._stall is not None:
                stall_s, until = self._stall
                if self._clock() >= until:
                    self._stall, stall_s = None, 0.0
            error = None
            if self._fail is not None:
                self._failed += 1
                error = error_for(self._fail.code, f"{self.name}: injected fault: failing step/call "
                                                   f"{self._failed} of {self._fail.count}")
                if self._failed == self._fail.count:
                    self._fail = None
        return Injected(stall_s, error) if stall_s or error else None

    def before_step(self) -> None:
        """Stall and/or raise as injected; returns at once when nothing is."""
        injected = self.take()
        if injected is None:
            return
        if injected.stall_s:
            log.warning("%s: injected fault: stalling %.2f s", self.name, injected.stall_s)
            self._sleep(injected.stall_s)
        if injected.error is not None:
            raise injected.error


class OpenStreams:
    """The streams a worker serves, so that ``DropStreams`` can abort them (event loop only).
    With fault injection off nothing is tracked and ``unless_dropped`` is a plain await."""

    def __init__(self, enabled: bool):
        self.enabled = enabled
        self._open: set[asyncio.Future[str]] = set()

    def open(self) -> asyncio.Future[str] | None:
        """A new stream's drop signal: resolves with why when the stream is to be aborted."""
        if not self.enabled:
            return None
        dropped = asyncio.get_running_loop().create_future()
        self._open.add(dropped)
        return dropped

    def close(self, dropped: asyncio.Future[str] | None) -> None:
        self._open.discard(dropped)

    def drop(self, why: str) -> int:
        """Signal every open stream to abort; how many there were."""
        signalled = [f for f in self._open if not f.done()]
        for dropped in signalled:
            dropped.set_result(why)
        return len(signalled)


async def unless_dropped(aw: Awaitable[T], dropped: asyncio.Future[str] | None, context) -> T:
    """``await aw``, unless the stream's ``dropped`` signal comes first: then the RPC is aborted
    UNAVAILABLE with its reason (``context.abort`` raises). A task made here for ``aw`` is
    cancelled then (a receive must not take a request nobody will answer); a future given is
    left alone (its owner still settles it)."""
    if dropped is None:
        return await aw
    waiter = asyncio.ensure_future(aw)
    await asyncio.wait({waiter, dropped}, return_when=asyncio.FIRST_COMPLETED)
    if waiter.done():
        return waiter.result()
    if waiter is not aw:
        waiter.cancel()
    await context.abort(grpc.StatusCode.UNAVAILABLE, dropped.result())


class FaultInjector:
    """One worker's fault injection: the seam its steps consult and the streams it serves."""

    def __init__(self, name: str, enabled: bool, clock: Callable[[], float] = time.monotonic):
        self.name = name
        """The worker's id in messages, e.g. ``stage-c0-s1``."""
        self.enabled = enabled
        self.seam = FaultSeam(name, clock)
        self.streams = OpenStreams(enabled)

    def apply(self, fault: Fault) -> str:
        """Inject ``fault`` (fault injection must be on); what it does, in words."""
        if isinstance(fault, DropStreams):
            n = self.streams.drop(f"{self.name}: injected fault: stream dropped")
            detail = f"dropped {n} open stream(s)"
        elif isinstance(fault, ClearFaults):
            self.seam.clear()
            detail = "cleared the faults not used up yet"
        else:
            self.seam.inject(fault)
            detail = _promise(fault)
        log.warning("%s: fault injected: %s", self.name, detail)
        return detail

    def off_message(self) -> str:
        return (f"fault injection is off on {self.name}; start the worker with --enable-fault-injection "
                f"(or {FAULT_INJECTION_ENV}=1 in its environment) to use the Admin service")


def _promise(fault: FailNext | Stall) -> str:
    if isinstance(fault, FailNext):
        return f"will fail its next {fault.count} step(s)/call(s) with {fault.code}"
    return f"will stall every step/call {fault.stall_s:g} s for the next {fault.for_s:g} s"


class AdminServicer(admin_pb2_grpc.AdminServicer):
    """``stagemesh.v1.Admin`` of one worker: a thin shell over its ``FaultInjector``."""

    def __init__(self, injector: FaultInjector):
        self.injector = injector

    async def InjectFault(self, request: admin_pb2.InjectFaultRequest, context) -> admin_pb2.InjectFaultResponse:
        """Inject one fault; FAILED_PRECONDITION when fault injection is off, INVALID_ARGUMENT for a bad fault."""
        if not self.injector.enabled:
            await context.abort(grpc.StatusCode.FAILED_PRECONDITION, self.injector.off_message())
        try:
            fault = fault_from_pb(request)
        except ValueError as err:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, f"{self.injector.name}: {err}")
        return admin_pb2.InjectFaultResponse(worker=self.injector.name, detail=self.injector.apply(fault))


def add_admin(server: grpc.aio.Server, injector: FaultInjector) -> None:
    """Serve ``stagemesh.v1.Admin`` for ``injector`` on ``server``."""
    admin_pb2_grpc.add_AdminServicer_to_server(AdminServicer(injector), server)


# --- the wire, and the client helper --------------------------------------------------------


def fault_to_pb(fault: Fault) -> admin_pb2.InjectFaultRequest:
    if isinstance(fault, FailNext):
        return admin_pb2.InjectFaultRequest(fail=admin_pb2.FailSteps(count=fault.count, code=fault.code))
    if isinstance(fault, Stall):
        return admin_pb2.InjectFaultRequest(stall=admin_pb2.StallSteps(stall_s=fault.stall_s, for_s=fault.for_s))
    if isinstance(fault, DropStreams):
        return admin_pb2.InjectFaultRequest(drop=admin_pb2.DropStreams())
    return admin_pb2.InjectFaultRequest(clear=admin_pb2.ClearFaults())


def fault_from_pb(msg: admin_pb2.InjectFaultRequest) -> Fault:
    """The fault a request asks for; ValueError naming what is wrong."""
    kind = msg.WhichOneof("fault")
    if kind == "fail":
        return FailNext(msg.fail.count, msg.fail.code or "UNAVAILABLE")
    if kind == "stall":
        return Stall(msg.stall.stall_s, msg.stall.for_s)
    if kind == "drop":
        return DropStreams()
    if kind == "clear":
        return ClearFaults()
    raise ValueError("InjectFaultRequest names no fault: set one of fail, stall, drop, clear")


def inject_fault(address: str, fault: Fault, timeout_s: float = 5.0, tls: MeshTLS | None = None) -> str:
    """Inject ``fault`` into the worker at ``address`` (over the mesh's mTLS with ``tls``, e.g. an admin
    certificate); what it will do, in words. A refusal (fault injection off, a bad fault, the worker
    unreachable) raises ``StagemeshError``."""
    with mesh_tls.channel(address, tls) as channel:
        try:
            reply = admin_pb2_grpc.AdminStub(channel).InjectFault(fault_to_pb(fault), timeout=timeout_s)
        except grpc.RpcError as err:
            raise error_for(err.code().name, f"{address}: {err.details()}") from None
    return f"{reply.worker}: {reply.detail}"


def main(argv: list[str] | None = None) -> int:
    """``python -m stagemesh.runtime.faults ADDRESS fail|stall|drop|clear ...``: inject one fault."""
    p = argparse.ArgumentParser(prog="python -m stagemesh.runtime.faults",
                                description="Inject one fault into a stage or expert worker (stagemesh.v1.Admin).")
    p.add_argument("address", help="HOST:PORT of a stage or expert worker started with --enable-fault-injection")
    mesh_tls.add_tls_args(p, role=True)
    kinds = p.add_subparsers(dest="kind", required=True)
    fail = kinds.add_parser("fail", help="fail its next N steps/calls")
    fail.add_argument("--count", type=int, default=1)
    fail.add_argument("--code", default="UNAVAILABLE", help="gRPC status code name")
    stall = kinds.add_parser("stall", help="stall each step/call STALL_S seconds for the next FOR_S seconds")
    stall.add_argument("--stall-s", type=float, required=True)
    stall.add_argument("--for-s", type=float, required=True)
    kinds.add_parser("drop", help="abort its open streams")
    kinds.add_parser("clear", help="forget the faults not used up yet")
    args = p.parse_args(argv)
    make = {"fail": lambda: FailNext(args.count, args.code), "stall": lambda: Stall(args.stall_s, args.for_s),
            "drop": DropStreams, "clear": ClearFaults}
    try:
        print(inject_fault(args.address, make[args.kind](), tls=mesh_tls.tls_from_args(args)))
    except (ValueError, StagemeshError) as err:
        print(f"error: {err}")
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
