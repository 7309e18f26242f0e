"""The lifecycle every server process shares (``stagemesh.runtime.server.run``), on a real gRPC
server on an ephemeral port, stopped by a real SIGTERM to this process."""

from __future__ import annotations

import asyncio
import os
import signal
import socket

import grpc.aio
import pytest

from stagemesh.runtime.health import serving, status, status_name
from stagemesh.runtime.net import free_port
from stagemesh.runtime.server import Role, WorkerServer, run
from stagemesh.runtime.startup import StartupError

SERVICE = "test.Worker"


async def _health(address: str) -> tuple[str, str]:
    """The status of "" and of SERVICE, as the server answers them now."""
    async with grpc.aio.insecure_channel(address) as channel:
        return tuple([status_name(await status(channel, service=name)) for name in ("", SERVICE)])


class Recorder(Role):
    """A role that records each step of its life and the health the server showed at it."""

    def __init__(self, address: str, *, hang_in_load: bool = False, broken_with: Exception | None = None):
        self.address, self.hang_in_load, self.broken_with = address, hang_in_load, broken_with
        self.steps: list[str] = []
        self.health: dict[str, tuple[str, str]] = {}

    async def load(self, server: WorkerServer) -> None:
        await server.start(self.address, lambda grpc_server: None)
        self.health["load"] = await _health(self.address)
        self.steps.append("load")
        try:
            if self.hang_in_load:
                await asyncio.Event().wait()
        except asyncio.CancelledError:
            self.steps.append("load cancelled")
            raise

    async def serve(self, server: WorkerServer) -> None:
        await super().serve(server)
        self.health["serve"] = await _health(self.address)
        self.steps.append("serve")

    async def broken(self) -> Exception:
        return self.broken_with if self.broken_with is not None else await super().broken()

    async def fail(self, err: Exception) -> int:
        self.steps.append(f"fail: {err}")
        return 3

    async def drain(self) -> None:
        if "load" in self.steps:  # the server started
            self.health["drain"] = await _health(self.address)
        self.steps.append("drain")

    async def close(self) -> None:
        self.steps.append("close")


def _live(role: Recorder, *, sigterm_after: str | None) -> int:
    """``run`` with ``role``; SIGTERM to this process once ``role`` reached ``sigterm_after``."""

    async def main() -> int:
        life = asyncio.create_task(run(WorkerServer(SERVICE, grace_s=1.0), role))
        while sigterm_after is not None and sigterm_after not in role.steps:
            await asyncio.sleep(0.01)
        if sigterm_after is not None:
            os.kill(os.getpid(), signal.SIGTERM)
        return await life

    return asyncio.run(main())


@pytest.fixture(autouse=True)
def _gc_left_alone(monkeypatch):
    """``run`` here runs in pytest's own process: it must not freeze the suite's heap
    (tests/runtime/test_gc_policy.py runs the tuned policy through ``run`` in a process of its own)."""
    monkeypatch.setenv("STAGEMESH_GC", "python")


@pytest.fixture
def address() -> str:
    return f"127.0.0.1:{free_port()}"


def test_not_serving_while_loading_serving_after_and_not_serving_while_draining_on_sigterm(address):
    role = Recorder(address)
    assert _live(role, sigterm_after="serve") == 0
    assert role.steps == ["load", "serve", "drain", "close"]
    assert role.health == {
        "load": ("NOT_SERVING", "NOT_SERVING"),
        "serve": ("SERVING", "SERVING"),
        "drain": ("NOT_SERVING", "NOT_SERVING"),
    }
    assert asyncio.run(serving(address)) is False  # server.stop(grace) ran: nothing listens


def test_sigterm_while_loading_cancels_the_load_and_still_drains(address):
    role = Recorder(address, hang_in_load=True)
    assert _live(role, sigterm_after="load") == 0
    assert role.steps == ["load", "load cancelled", "drain", "close"]


def test_a_role_that_breaks_exits_with_the_code_its_fail_gives(address):
    role = Recorder(address, broken_with=RuntimeError("rank 1 died"))
    assert _live(role, sigterm_after=None) == 3
    assert role.steps == ["load", "serve", "fail: rank 1 died", "drain", "close"]


def test_a_port_in_use_is_a_startup_error(address):
    host, port = address.rsplit(":", 1)
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, int(port)))
        sock.listen()
        role = Recorder(address)
        with pytest.raises(StartupError, match=f"cannot listen on {address}"):
            _live(role, sigterm_after=None)
    assert role.steps == ["drain", "close"]


def test_a_port_that_another_process_shares_out_is_a_startup_error_not_a_shared_port(address):
    """A listener that lets others share its port (SO_REUSEPORT, as the frontends' client port
    does): a worker planned onto that port must fail to start, not take half its connections."""
    host, port = address.rsplit(":", 1)
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        sock.bind((host, int(port)))
        sock.listen()
        role = Recorder(address)
        with pytest.raises(StartupError, match=f"cannot listen on {address}"):
            _live(role, sigterm_after=None)
