"""`stagemesh up`'s liveness probe: which children that served have since answered no health check
for ``after_s`` (frozen: SIGSTOP, a deadlock, a stuck event loop), so that the launcher kills
them and its supervision starts them again; ``Pinger`` does the same for the local Redis.

NOTE: a frozen process keeps its pid and its sockets, so nothing restarts it and the kernel does
not close its connections: on dp=1 a frozen stage holds its chain out of service until its
requests' failover wait runs out (UNAVAILABLE), and a frozen frontend or gateway holds its
clients' streams forever. Kubernetes kills such a container on its liveness probe
(``stagemesh.deploy.k8s_objects``); under `up` the launcher does, the same way: "alive" is any
answer to ``grpc.health.v1``, NOT_SERVING included (a stage waiting for its next stage, a gateway
with no chain in service), not only SERVING. A process is watched from the moment the launcher's
readiness probe saw it SERVING since its latest start (``Lifeline.ready_at``), never while it
loads. The checks are the blocking channel's futures, one kept channel per child (a fresh one
after a failed call: a channel to a restarted process may sit in reconnect backoff), sent every
``every_s`` and collected on the launcher's next supervision pass, so a frozen child never
blocks the loop and N of them cost one deadline, not N.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from stagemesh.runtime import tls as mesh_tls
from stagemesh.runtime.procs import LIVENESS_S
from stagemesh.runtime.tls import MeshTLS

CHECK_EVERY_S = 0.5
CALL_TIMEOUT_S = 1.0


class Liveness:
    """The health checks of the children `up` watches, and how long each has been silent."""

    def __init__(self, after_s: float = LIVENESS_S, tls: MeshTLS | None = None, every_s: float = CHECK_EVERY_S):
        if after_s <= 0:
            raise ValueError(f"after_s={after_s}: a liveness probe needs a positive wait (0 turns it off in `up`)")
        self.after_s = after_s
        self.tls = tls
        self.every_s = every_s
        self._channels: dict[str, grpc.Channel] = {}
        self._calls: dict[str, grpc.Future] = {}
        self._answered: dict[str, float] = {}
        self._next_check = 0.0

    def silent(self, watched: dict[str, tuple[str, float]], now: float) -> list[tuple[str, float]]:
        """``watched``: name -> (address, when it was first seen SERVING since its latest start) of
        each running child that served. The (name, seconds without an answer) of those silent for
        ``after_s`` or longer; meanwhile, collects the checks that ended and sends the next ones."""
        for name in (self._channels.keys() | self._answered.keys()) - watched.keys():  # exited, restarting
            self._forget(name)
        for name, call in list(self._calls.items()):
            if call.done():
                del self._calls[name]
                if call.exception() is None:
                    self._answered[name] = now
                else:  # no answer in time: a fresh channel for the next check
                    self._channels.pop(name).close()
        if now >= self._next_check:
            self._next_check = now + self.every_s
            for name, (address, _) in watched.items():
                if name not in self._calls:
                    self._calls[name] = self._check(name, address)
        quiet = ((name, now - max(ready_at, self._answered.get(name, ready_at)))
                 for name, (_, ready_at) in watched.items())
        return [(name, for_s) for name, for_s in quiet if for_s >= self.after_s]

    def _check(self, name: str, address: str) -> grpc.Future:
        channel = self._channels.get(name)
        if channel is None:
            channel = self._channels[name] = mesh_tls.channel(address, self.tls)
        stub = health_pb2_grpc.HealthStub(channel)
        return stub.Check.future(health_pb2.HealthCheckRequest(service=""), timeout=CALL_TIMEOUT_S)

    def _forget(self, name: str) -> None:
        call = self._calls.pop(name, None)
        if call is not None:
            call.cancel()
        self._answered.pop(name, None)
        channel = self._channels.pop(name, None)
        if channel is not None:
            channel.close()

    def close(self) -> None:
        for name in self._channels.keys() | self._calls.keys():
            self._forget(name)


class Pinger:
    """When ``answers()`` last returned True, asked every ``every_s`` on a daemon thread of its own.

    NOTE: the local Redis speaks no gRPC health: ``answers`` is a raw ``INFO`` with a 0.5 s timeout
    (``stagemesh.deploy.redis_server.server_pid``), which blocks for that long while Redis is
    frozen; on a thread of its own it never holds the launcher's supervision. A frozen Redis
    does not stop the streams, but every journal write, heartbeat and registration fails while it
    lasts; killed, it comes back from its append-only file in a second."""

    def __init__(self, answers: Callable[[], bool], every_s: float = CHECK_EVERY_S):
        self.last_answer = time.monotonic()
        self._answers = answers
        self._every_s = every_s
        self._stop = threading.Event()
        threading.Thread(target=self._run, name="liveness-ping", daemon=True).start()

    def _run(self) -> None:
        while not self._stop.is_set():
            if self._answers():
                self.last_answer = time.monotonic()
            self._stop.wait(self._every_s)

    def close(self) -> None:
        self._stop.set()
