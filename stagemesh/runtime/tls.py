"""Mutual TLS between the mesh's processes: each process's identity (``MeshTLS``), the channels it
dials with, its server credentials, and the check of who may call what (``PeerRoles``).

A mesh's certificates come from one CA (`stagemesh certs DIR`, or made by ``stagemesh up`` for
its run); each process holds the key and certificate of its role (``ROLES``) and trusts that CA
alone. A worker's or the gateway's port takes no connection without a certificate of the mesh
(the TLS handshake refuses it), and once connected, ``PeerRoles`` checks the caller's role per
service: the gateway's ``Scheduling`` service takes only frontends (and admin), everything
else any process of the mesh. A frontend's client port is another matter (API keys, optional
server-side TLS: ``ServingCert``); its own port (``--own-port``, where probes go) is mesh mTLS.

Callers dial through ``channel`` / ``aio_channel`` with a ``MeshTLS | None``: None is the
insecure mesh (``stagemesh up --insecure``), the same code either way.

NOTE: every certificate carries the same DNS name (``MESH_SERVER_NAME``), which clients check
with ``grpc.ssl_target_name_override`` whatever address they dial: a peer proves "signed by this
mesh's CA, for this role", not an address (see ``stagemesh.deploy.certs``).
"""

from __future__ import annotations

import argparse
import inspect
import os
import ssl
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import grpc
import grpc.aio

TLS_DIR_ENV = "STAGEMESH_TLS_DIR"
"""The environment's ``--tls-dir``: how `stagemesh up` hands its children the run's certificates."""
MESH_SERVER_NAME = "stagemesh-mesh"
"""The DNS name in every mesh certificate, which every client checks (``grpc.ssl_target_name_override``)."""
ORGANIZATION = "stagemesh"
"""The subject's O of the mesh's certificates (the role is the OU, the holder's name the CN)."""
ROLES = ("gateway", "frontend", "stage", "expert", "admin")
"""The roles a mesh certificate may carry; ``admin`` is for operators and tests reaching workers directly."""
OPEN_SERVICES = frozenset({"stagemesh.v1.Gateway", "inference.GRPCInferenceService", "grpc.health.v1.Health"})
"""Served to clients without a mesh certificate (on a frontend's client port); on a mesh port the
TLS handshake has already asked for one."""
SERVICE_ROLES = {"stagemesh.v1.Scheduling": frozenset({"frontend", "admin"})}
"""Services that only some roles may call; any other (Stage, Expert, Admin, ...) takes every mesh role."""

Options = Sequence[tuple[str, object]]


@dataclass(frozen=True)
class MeshTLS:
    """One process's mesh identity: the CA it trusts, its certificate and key (PEM bytes)."""

    tls_dir: Path
    """Where they were read (`stagemesh certs DIR`)."""
    role: str
    """Which of ``ROLES`` this process holds a certificate for."""
    ca: bytes = field(repr=False)
    cert: bytes = field(repr=False)
    key: bytes = field(repr=False)

    @classmethod
    def load(cls, tls_dir: str | os.PathLike, role: str) -> MeshTLS:
        """``ca.pem``, ``ROLE.pem`` and ``ROLE.key`` of ``tls_dir``; ValueError naming what is missing."""
        if role not in ROLES:
            raise ValueError(f"TLS role {role!r} is not one of {', '.join(ROLES)}")
        path = Path(tls_dir)
        try:
            ca, cert, key = ((path / name).read_bytes() for name in ("ca.pem", f"{role}.pem", f"{role}.key"))
        except OSError as err:
            raise ValueError(f"--tls-dir {path}: cannot read {err.filename} ({err.strerror}); make the mesh's "
                             f"certificates with `stagemesh certs {path}`") from None
        return cls(path, role, ca, cert, key)

    def server_credentials(self) -> grpc.ServerCredentials:
        """A mesh port: this certificate, and a client certificate signed by the mesh CA required."""
        return grpc.ssl_server_credentials([(self.key, self.cert)], root_certificates=self.ca,
                                           require_client_auth=True)

    def channel_credentials(self) -> grpc.ChannelCredentials:
        """A client of the mesh: trusts the mesh CA alone and presents this certificate."""
        return grpc.ssl_channel_credentials(root_certificates=self.ca, private_key=self.key,
                                            certificate_chain=self.cert)

    def channel_options(self, options: Options = ()) -> tuple:
        return (*options, ("grpc.ssl_target_name_override", MESH_SERVER_NAME))

    def channel(self, address: str, options: Options = ()) -> grpc.Channel:
        """A blocking channel to the mesh process at ``address``."""
        return grpc.secure_channel(address, self.channel_credentials(), options=self.channel_options(options))

    def aio_channel(self, address: str, options: Options = ()) -> grpc.aio.Channel:
        """An asyncio channel to the mesh process at ``address``."""
        return grpc.aio.secure_channel(address, self.channel_credentials(), options=self.channel_options(options))

    def interceptors(self) -> tuple[grpc.aio.ServerInterceptor, ...]:
        """What a mesh server adds: the check of each caller's role (``PeerRoles``)."""
        return (PeerRoles(),)

    def ssl_context(self, *, server: bool) -> ssl.SSLContext:
        """The same identity for HTTP (aiohttp): a server that requires a mesh client certificate,
        or a client that checks the mesh's name and presents this certificate."""
        ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH if server else ssl.Purpose.SERVER_AUTH,
                                         cadata=self.ca.decode())
        ctx.load_cert_chain(*_files_of(self))
        if server:
            ctx.verify_mode = ssl.CERT_REQUIRED
        return ctx


def channel(address: str, tls: MeshTLS | None, options: Options = ()) -> grpc.Channel:
    """A blocking channel to a mesh process: mTLS with ``tls``, plaintext without (``--insecure``)."""
    return grpc.insecure_channel(address, options=options) if tls is None else tls.channel(address, options)


def aio_channel(address: str, tls: MeshTLS | None, options: Options = ()) -> grpc.aio.Channel:
    """An asyncio channel to a mesh process: mTLS with ``tls``, plaintext without (``--insecure``)."""
    return grpc.aio.insecure_channel(address, options=options) if tls is None else tls.aio_channel(address, options)


# --- who may call what ----------------------------------------------------------------------


def peer_role(auth: dict[str, list[bytes]]) -> str | None:
    """The role (OU) of the mesh certificate the peer presented; None when it presented none."""
    if auth.get("transport_security_type") != [b"ssl"]:
        return None
    for part in b",".join(auth.get("x509_subject", [])).decode(errors="replace").split(","):
        name, _, value = part.strip().partition("=")
        if name == "OU":
            return value
    common = auth.get("x509_common_name")
    return common[0].decode(errors="replace") if common else None


def refusal(service: str, role: str | None) -> tuple[grpc.StatusCode, str] | None:
    """Why a caller of ``role`` may not call ``service`` (status and message), or None if it may."""
    if service in OPEN_SERVICES:
        return None
    allowed = SERVICE_ROLES.get(service, frozenset(ROLES))
    if role is None:
        return (grpc.StatusCode.UNAUTHENTICATED,
                f"{service} takes calls only from the mesh's own processes: present a client certificate "
                f"of the mesh CA (`stagemesh certs DIR`, the --tls-dir of the mesh's processes)")
    if role not in allowed:
        return (grpc.StatusCode.PERMISSION_DENIED,
                f"{service} takes calls only from the roles {', '.join(sorted(allowed))}; the caller's certificate "
                f"is for role {role!r}")
    return None


class PeerRoles(grpc.aio.ServerInterceptor):
    """Refuses a call whose caller's certificate role may not call its service (``refusal``).

    NOTE: the peer's certificate is on the call's context only, not on what an interceptor sees
    before the handler runs: each handler is wrapped so that the check runs first, on the call.
    """

    async def intercept_service(self, continuation, details: grpc.HandlerCallDetails):
        handler = await continuation(details)
        service = details.method.lstrip("/").partition("/")[0]
        if handler is None or service in OPEN_SERVICES:
            return handler
        return _guarded(handler, service)


async def _check(service: str, context: grpc.aio.ServicerContext) -> None:
    why = refusal(service, peer_role(context.auth_context()))
    if why is not None:
        await context.abort(*why)


def _guarded(handler: grpc.RpcMethodHandler, service: str) -> grpc.RpcMethodHandler:
    """``handler`` with ``_check`` before its behaviour, whichever of the four kinds it is."""
    for kind, make in (("unary_unary", grpc.unary_unary_rpc_method_handler),
                       ("unary_stream", grpc.unary_stream_rpc_method_handler),
                       ("stream_unary", grpc.stream_unary_rpc_method_handler),
                       ("stream_stream", grpc.stream_stream_rpc_method_handler)):
        behaviour = getattr(handler, kind)
        if behaviour is not None:
            wrap = _streaming if kind.endswith("_stream") else _unary
            return make(wrap(behaviour, service), request_deserializer=handler.request_deserializer,
                        response_serializer=handler.response_serializer)
    return handler


def _unary(behaviour: Callable, service: str) -> Callable:
    async def call(request, context):
        await _check(service, context)
        result = behaviour(request, context)
        return await result if inspect.isawaitable(result) else result
    return call


def _streaming(behaviour: Callable, service: str) -> Callable:
    """NOTE: always an async generator, which gRPC iterates: a behaviour that yields its answers is
    iterated in turn, one that writes them (``context.write``) and returns is awaited."""
    async def stream(request, context):
        await _check(service, context)
        result = behaviour(request, context)
        if hasattr(result, "__aiter__"):
            async for response in result:
                yield response
        elif inspect.isawaitable(result):
            await result
    return stream


# --- the client-facing port's certificate ---------------------------------------------------


@dataclass(frozen=True)
class ServingCert:
    """A certificate and key for a client-facing port (a frontend's gRPC and HTTP ports): server-side
    TLS, no client certificate asked (clients prove themselves with API keys)."""

    cert_file: Path
    key_file: Path

    def server_credentials(self) -> grpc.ServerCredentials:
        try:
            return grpc.ssl_server_credentials([(self.key_file.read_bytes(), self.cert_file.read_bytes())])
        except OSError as err:
            raise ValueError(f"--tls-cert/--tls-key: cannot read {err.filename} ({err.strerror})") from None

    def ssl_context(self) -> ssl.SSLContext:
        ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        ctx.load_cert_chain(self.cert_file, self.key_file)
        return ctx


# --- command line ---------------------------------------------------------------------------


def add_tls_args(p: argparse.ArgumentParser, *, role: bool = False) -> None:
    """``--tls-dir`` (default: ``$STAGEMESH_TLS_DIR``); with ``role``, ``--tls-role`` too (tools
    that act for an operator: ``admin`` by default)."""
    p.add_argument("--tls-dir", type=Path, default=os.environ.get(TLS_DIR_ENV) or None,
                   help=f"the mesh's certificates (`stagemesh certs DIR`): mutual TLS with the other processes "
                        f"(default: ${TLS_DIR_ENV}; none: plaintext, an --insecure mesh)")
    if role:
        p.add_argument("--tls-role", default="admin", choices=ROLES, help="whose certificate of --tls-dir to present")


def add_serving_cert_args(p: argparse.ArgumentParser) -> None:
    """``--tls-cert`` / ``--tls-key``: server-side TLS on the client-facing ports."""
    p.add_argument("--tls-cert", type=Path, default=None,
                   help="serve the client port and the HTTP port over TLS with this certificate (PEM; with --tls-key)")
    p.add_argument("--tls-key", type=Path, default=None, help="the key of --tls-cert (PEM)")


def tls_from_args(args: argparse.Namespace, role: str | None = None) -> MeshTLS | None:
    """The identity ``--tls-dir`` gives (``role``, else ``--tls-role``); None without one. ValueError
    when the directory lacks the files."""
    if args.tls_dir is None:
        return None
    return MeshTLS.load(args.tls_dir, role or args.tls_role)


def serving_cert_from_args(args: argparse.Namespace) -> ServingCert | None:
    """``--tls-cert`` and ``--tls-key`` (both or neither; ValueError otherwise)."""
    if (args.tls_cert is None) != (args.tls_key is None):
        raise ValueError("--tls-cert and --tls-key go together: give both (or neither, for plaintext)")
    return None if args.tls_cert is None else ServingCert(args.tls_cert, args.tls_key)


def _files_of(tls: MeshTLS) -> tuple[Path, Path]:
    return tls.tls_dir / f"{tls.role}.pem", tls.tls_dir / f"{tls.role}.key"
