"""Mutual TLS on a real gRPC server on an ephemeral port (``stagemesh.runtime.tls`` through
``WorkerServer``): a worker's port serves the mesh's certificates only, and the gateway's
``Scheduling`` service only frontends (and admin)."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from functools import partial

import grpc
import grpc.aio
import pytest

from stagemesh.deploy.certs import make_secrets
from stagemesh.runtime import tls as mesh_tls
from stagemesh.runtime.faults import FailNext, FaultInjector, add_admin, fault_to_pb
from stagemesh.runtime.health import SERVING, serving, status
from stagemesh.runtime.net import free_port
from stagemesh.runtime.server import WorkerServer
from stagemesh.runtime.tls import ROLES, MeshTLS, ServingCert
from stagemesh.v1 import admin_pb2_grpc, scheduling_pb2_grpc


@pytest.fixture(scope="module")
def mesh_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("tls") / "mesh"
    make_secrets(path, redis=False)
    return path


@pytest.fixture(scope="module")
def stranger_dir(tmp_path_factory):
    """Certificates of another mesh: the same roles and names, another CA."""
    path = tmp_path_factory.mktemp("tls") / "stranger"
    make_secrets(path, redis=False)
    return path


class CountingInjector(FaultInjector):
    """The real fault injector, counting the faults that reached it."""

    applied = 0

    def apply(self, fault):
        self.applied += 1
        return super().apply(fault)


@contextlib.asynccontextmanager
async def _worker(tls: MeshTLS, add=None):
    """A stage worker's server as ``stage_worker.main`` builds it: mesh mTLS, its Admin service
    (fault injection on), and health SERVING; yields (address, its fault injector)."""
    injector = CountingInjector("stage-c0-s0", enabled=True)
    server = WorkerServer("stagemesh.v1.Stage", grace_s=0.1, tls=tls)
    address = f"127.0.0.1:{free_port()}"

    def add_services(grpc_server):
        add_admin(grpc_server, injector)
        if add is not None:
            add(grpc_server)

    await server.start(address, add_services)
    await server.set_serving(True)
    try:
        yield address, injector
    finally:
        await server.server.stop(0)


async def _inject(channel: grpc.aio.Channel) -> str:
    reply = await admin_pb2_grpc.AdminStub(channel).InjectFault(fault_to_pb(FailNext(1)), timeout=5)
    return reply.detail


def _refused(err: pytest.ExceptionInfo) -> tuple[grpc.StatusCode, str]:
    return err.value.code(), err.value.details()


def test_a_worker_takes_every_mesh_role_and_refuses_plaintext_and_another_meshs_certificates(mesh_dir, stranger_dir,
                                                                                            caplog):
    async def scenario():
        async with _worker(MeshTLS.load(mesh_dir, "stage")) as (address, injector):
            for role in ROLES:  # the admin certificate (operators, tests) and every process of the mesh
                async with mesh_tls.aio_channel(address, MeshTLS.load(mesh_dir, role)) as channel:
                    assert await _inject(channel) == "will fail its next 1 step(s)/call(s) with UNAVAILABLE"
                    assert await status(channel) == SERVING
            assert injector.applied == len(ROLES)

            refused = {}
            stranger = MeshTLS.load(stranger_dir, "admin")
            no_cert = grpc.ssl_channel_credentials(root_certificates=MeshTLS.load(mesh_dir, "admin").ca)
            for name, channel in (
                ("plaintext", grpc.aio.insecure_channel(address)),
                ("another mesh's CA", stranger.aio_channel(address)),
                ("no client certificate", grpc.aio.secure_channel(address, no_cert, stranger.channel_options())),
            ):
                async with channel:
                    with pytest.raises(grpc.RpcError) as err:
                        await _inject(channel)
                    refused[name] = _refused(err)
                    assert not await serving(address, timeout_s=2.0, tls=None)  # health neither
            assert injector.applied == len(ROLES)  # none of them reached the servicer
            return refused

    with caplog.at_level(logging.INFO):
        refused = asyncio.run(scenario())
    for name, (code, details) in refused.items():
        # NOTE: the TLS handshake refuses them, before any call: what the client learns is gRPC's own
        # "the connection closed"; the worker's log (gRPC core) says which check failed
        assert code == grpc.StatusCode.UNAVAILABLE, (name, code, details)
        assert "failed to connect" in details or "Socket closed" in details or "handshake" in details.lower(), details


def test_the_gateways_scheduling_service_takes_frontends_and_admin_alone(mesh_dir):
    async def scenario():
        gateway = MeshTLS.load(mesh_dir, "gateway")
        add = partial(scheduling_pb2_grpc.add_SchedulingServicer_to_server, scheduling_pb2_grpc.SchedulingServicer())
        async with _worker(gateway, add) as (address, _):
            answers = {}
            for role in ROLES:
                async with MeshTLS.load(mesh_dir, role).aio_channel(address) as channel:
                    call = scheduling_pb2_grpc.SchedulingStub(channel).Connect(iter(()), timeout=5)
                    try:
                        async for _ in call:
                            pass
                        answers[role] = ("OK", "")
                    except grpc.RpcError as err:
                        answers[role] = (err.code().name, err.details())
                    # the other services of the same port (health, Admin) take every mesh role
                    assert await status(channel) == SERVING
            return answers

    answers = asyncio.run(scenario())
    for role in ("stage", "expert", "gateway"):
        code, details = answers[role]
        assert code == "PERMISSION_DENIED", answers
        assert details == ("stagemesh.v1.Scheduling takes calls only from the roles admin, frontend; "
                           f"the caller's certificate is for role {role!r}")
    for role in ("frontend", "admin"):  # let through, to a servicer that implements nothing
        assert answers[role][0] == "UNIMPLEMENTED", answers


def test_a_call_without_a_mesh_certificate_is_unauthenticated_where_one_can_arrive(tmp_path, mesh_dir):
    """A frontend's client port is server-side TLS (or plaintext): a caller there has no mesh
    certificate, and a mesh-only service says what it lacks; the client-facing services let it in."""
    cert = ServingCert(mesh_dir / "frontend.pem", mesh_dir / "frontend.key")

    async def scenario():
        injector = FaultInjector("frontend-0", enabled=True)
        server = WorkerServer("stagemesh.v1.Gateway", grace_s=0.1, tls=MeshTLS.load(mesh_dir, "frontend"))
        client_port, own_port = f"127.0.0.1:{free_port()}", f"127.0.0.1:{free_port()}"
        await server.start(client_port, partial(add_admin, injector=injector), also=(own_port,), public=True,
                           public_credentials=cert.server_credentials())
        await server.set_serving(True)
        try:
            server_only = grpc.ssl_channel_credentials(root_certificates=(mesh_dir / "ca.pem").read_bytes())
            options = MeshTLS.load(mesh_dir, "admin").channel_options()
            async with grpc.aio.secure_channel(client_port, server_only, options) as channel:
                assert await status(channel) == SERVING  # health is open to clients
                with pytest.raises(grpc.RpcError) as err:
                    await _inject(channel)
            async with MeshTLS.load(mesh_dir, "admin").aio_channel(own_port) as channel:  # the own port: mesh mTLS
                assert await _inject(channel)
            return _refused(err)
        finally:
            await server.server.stop(0)

    code, details = asyncio.run(scenario())
    assert code == grpc.StatusCode.UNAUTHENTICATED
    assert details.startswith("stagemesh.v1.Admin takes calls only from the mesh's own processes: present a client "
                              "certificate of the mesh CA")
