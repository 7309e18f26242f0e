"""The life of one server process of the mesh (stage worker, expert worker, gateway), written once.

``run(server, role)``::

    SIGTERM/SIGINT caught → role.load: bind (health NOT_SERVING), weights, peers
      → role.serve: health SERVING, heartbeats → the garbage collector settled (``gc_policy``)
      → the loop watched (``watchdog``: a loop stuck for --liveness-s ends the process)
      → until a stop signal (or role.broken → role.fail)
      → health NOT_SERVING → role.drain → server.stop(grace) → role.close

The health service answers both the overall name "" and the role's service name. A stop
signal while loading skips straight to the drain. What each role does at each step is its
``Role`` subclass; this module knows nothing of stages, experts or chains.
"""

from __future__ import annotations

import asyncio
import logging
import signal
from collections.abc import Awaitable, Callable
from typing import TypeVar

import grpc.aio
from grpc_health.v1 import health, health_pb2_grpc

from stagemesh.runtime import gc_policy
from stagemesh.runtime.decode_guard import DecodeGuard
from stagemesh.runtime.health import NOT_SERVING, SERVING
from stagemesh.runtime.startup import StartupError
from stagemesh.runtime.tls import MeshTLS
from stagemesh.runtime.watchdog import LoopWatchdog
from stagemesh.wire.streams import MESSAGE_OPTIONS

log = logging.getLogger(__name__)

T = TypeVar("T")

EXCLUSIVE_PORT = ("grpc.so_reuseport", 0)
"""A port another process holds is an error at start (``StartupError``), never a port shared with
it: gRPC's default (SO_REUSEPORT) lets two processes of one user listen on one port, and the
kernel then spreads the connections between them, silently."""
CALL_OPTIONS = (
    *MESSAGE_OPTIONS,
    # Callers keep one stream open for hours and ping it (keepalive) while it idles: allow that.
    ("grpc.http2.min_ping_interval_without_data_ms", 10_000),
    ("grpc.http2.max_ping_strikes", 0),
)
"""What every server of the mesh takes of its calls: activation-sized messages, keepalive pings on idle streams."""
SERVER_OPTIONS = (*CALL_OPTIONS, EXCLUSIVE_PORT)
"""A mesh server's options: ``CALL_OPTIONS`` on a port of its own."""

AddServicer = Callable[[grpc.aio.Server], None]
"""Adds one servicer to a server, e.g. ``partial(add_StageServicer_to_server, servicer)``."""


class WorkerServer:
    """One gRPC server with ``grpc.health.v1`` for "" and ``service``, and the stop signal that ends it."""

    def __init__(self, service: str, grace_s: float, options: tuple = SERVER_OPTIONS,
                 interceptors: tuple[grpc.aio.ServerInterceptor, ...] = (), *, tls: MeshTLS | None = None,
                 liveness_s: float = 0.0):
        self.service = service
        """Full name of the served service, e.g. ``stagemesh.v1.Stage`` (its health name)."""
        self.grace_s = grace_s
        """On stop, how long in-flight calls may finish (``server.stop(grace)``)."""
        self.options = options
        self.interceptors = interceptors
        """Run before every call's handler (a frontend's API-key check: ``frontend.auth``)."""
        self.tls = tls
        """This process's mesh identity: its ports take only the mesh CA's client certificates and each
        caller's role is checked (``stagemesh.runtime.tls``); None: plaintext (an ``--insecure`` mesh)."""
        self.watchdog = LoopWatchdog(liveness_s)
        """Once serving: the process ends when its event loop stands still ``liveness_s`` (0: never)."""
        self.health = health.aio.HealthServicer()
        self.server: grpc.aio.Server | None = None
        self.stopping = asyncio.Event()
        """Set by SIGTERM / SIGINT (``catch_signals``)."""

    def catch_signals(self) -> None:
        """SIGTERM and SIGINT set ``stopping`` instead of killing the process."""
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, self.stopping.set)

    async def start(self, bind: str, add_servicer: AddServicer, *, also: tuple[str, ...] = (),
                    public: bool = False, public_credentials: grpc.ServerCredentials | None = None) -> None:
        """Serve ``add_servicer``'s service and health (NOT_SERVING) on ``bind`` (and on each
        address in ``also``), with the mesh's mTLS when ``tls`` is set; StartupError when it cannot listen.

        ``public``: ``bind`` is a client-facing port (a frontend's), served with ``public_credentials``
        (server-side TLS) or plaintext, never the mesh's mTLS; ``also`` stays a mesh port."""
        mesh_checks = self.tls.interceptors() if self.tls is not None else ()
        self.server = grpc.aio.server(options=self.options, interceptors=(*self.interceptors, *mesh_checks))
        guarded = DecodeGuard(self.server)  # undecodable requests: INVALID_ARGUMENT (runtime.decode_guard)
        add_servicer(guarded)
        health_pb2_grpc.add_HealthServicer_to_server(self.health, guarded)
        await self.set_serving(False)
        mesh = self.tls.server_credentials() if self.tls is not None else None
        for address in (bind, *also):
            credentials = public_credentials if public and address == bind else mesh
            try:
                if _add_port(self.server, address, credentials) == 0:
                    raise RuntimeError("port unavailable")
            except RuntimeError as err:
                raise StartupError(f"cannot listen on {address} ({err}); is another process using the port?") from err
        await self.server.start()
        log.info("listening on %s", ", ".join((bind, *also)))

    async def set_serving(self, serving: bool) -> None:
        """Health of both names: SERVING or NOT_SERVING (ignored once the drain began)."""
        for name in ("", self.service):
            await self.health.set(name, SERVING if serving else NOT_SERVING)

    async def until_stopped(self, work: Awaitable[T]) -> asyncio.Future[T] | None:
        """``work``'s finished future (its exception raised here), or None when a stop signal came
        first (``work`` is then cancelled)."""
        task = asyncio.ensure_future(work)
        waiter = asyncio.ensure_future(self.stopping.wait())
        await asyncio.wait({task, waiter}, return_when=asyncio.FIRST_COMPLETED)
        waiter.cancel()
        if task.done():
            task.result()
            return task
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
        return None

    async def shutdown(self, role: Role) -> None:
        """NOT_SERVING for good, ``role.drain``, ``server.stop(grace)``, ``role.close``."""
        await self.health.enter_graceful_shutdown()
        await role.drain()
        if self.server is not None:
            await self.server.stop(self.grace_s)
        await role.close()


def _add_port(server: grpc.aio.Server, address: str, credentials: grpc.ServerCredentials | None) -> int:
    """The port bound (0: none), over TLS with ``credentials``, else plaintext."""
    if credentials is None:
        return server.add_insecure_port(address)
    return server.add_secure_port(address, credentials)


class Role:
    """What one kind of server process does at each step of ``run``; the defaults do nothing."""

    async def load(self, server: WorkerServer) -> None:
        """Start ``server`` and get ready to serve (weights, peers); StartupError when it cannot."""
        raise NotImplementedError

    async def serve(self, server: WorkerServer) -> None:
        """Loaded: turn SERVING and start the heartbeats (returns at once)."""
        await server.set_serving(True)

    async def broken(self) -> Exception:
        """Returns (the reason) once this process can never serve again; by default never."""
        return await asyncio.get_running_loop().create_future()

    async def fail(self, err: Exception) -> int:
        """After ``broken``: what is left to do; the exit code."""
        log.error("cannot serve any more: %s", err)
        return 1

    async def drain(self) -> None:
        """Health is NOT_SERVING: leave the registry, refuse new work (before ``server.stop``)."""

    async def close(self) -> None:
        """The server stopped: release what is left."""


async def run(server: WorkerServer, role: Role) -> int:
    """One server process's life, from the signal handlers to the drain (module docstring); its exit code."""
    gc_wanted = gc_policy.wanted()  # a bad value fails before anything loads
    server.catch_signals()
    try:
        if await server.until_stopped(role.load(server)) is None:
            log.info("stop requested while loading")
            return 0
        await role.serve(server)
        gc_policy.settle(gc_wanted)
        server.watchdog.start()
        broken = await server.until_stopped(role.broken())
        return 0 if broken is None else await role.fail(broken.result())
    finally:
        server.watchdog.stop()
        await server.shutdown(role)
