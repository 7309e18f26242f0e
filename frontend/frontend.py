"""A frontend's part in the server lifecycle (``stagemesh.runtime.server.run``): the model's
tokenizer and limits, the client port and the HTTP port (each shared with the mesh's other
frontends), the link to the gateway; health SERVING while the link is up."""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING

from frontend.kserve import KServeServicer, with_kserve
from frontend.link import GatewayLink
from frontend.servicer import FrontendServicer
from frontend.stream import MESSAGES_PER_S
from stagemesh.config import ModelConfig
from stagemesh.mesh.topology import Topology
from stagemesh.runtime.api_keys import NO_KEYS, ApiKeys
from stagemesh.runtime.file_lock import FileLocks
from stagemesh.runtime.server import CALL_OPTIONS, Role, WorkerServer
from stagemesh.runtime.tls import MeshTLS, ServingCert
from stagemesh.tokenizer import Tokenizer
from stagemesh.v1 import gateway_pb2, gateway_pb2_grpc

if TYPE_CHECKING:
    from frontend.http import HttpServer

log = logging.getLogger(__name__)

GATEWAY_SERVICE = gateway_pb2.DESCRIPTOR.services_by_name["Gateway"].full_name
MAX_PENDING_CALLS = 1 << 16
CLIENT_SERVER_OPTIONS = (
    *CALL_OPTIONS,
    ("grpc.so_reuseport", 1),
    # NOTE: gRPC's core cancels calls (a bare CANCELLED, which clients read as their own doing)
    # once more than 1,000 have arrived that the server has not picked up yet: 2,000 streams
    # opened at once got 203 of them. The limit goes up, and what the mesh cannot take is refused
    # by the mesh itself: RESOURCE_EXHAUSTED with a retry hint (the gateway's queue limit).
    ("grpc.server.max_pending_requests", MAX_PENDING_CALLS),
    ("grpc.server.max_pending_requests_hard_limit", MAX_PENDING_CALLS),
)
"""Several frontends of one mesh listen on one client port (the kernel spreads the connections);
``stagemesh up`` checks that no other process holds the port before it starts them."""


@dataclass(frozen=True)
class FrontendOptions:
    """How one frontend process runs."""

    gateway: str
    """``host:port`` of the gateway's ``Scheduling`` service."""
    host: str = "127.0.0.1"
    port: int = 50051
    """The client port (``stagemesh.v1.Gateway``)."""
    name: str = "frontend"
    """How the gateway's logs name it."""
    messages_per_s: float = MESSAGES_PER_S
    """Its stream-message budget (``frontend.stream.Pacer``); 0 sends every step's tokens at once."""
    own_port: int | None = None
    """A port of this frontend alone, where the same services answer: the client port is shared,
    so a probe of this process's health (the launcher's, an orchestrator's) goes here."""
    http_port: int | None = None
    """The HTTP port (OpenAI API), shared by the frontends like the client port; None: no HTTP."""
    gateway_http: str | None = None
    """``host:port`` of the gateway's HTTP side, whose pages (dashboard, ``/metrics``) the HTTP port
    passes through (``frontend.gateway_proxy``); None: not passed."""
    served_model_name: str | None = None
    """The model's name in the OpenAI API; None: the checkpoint directory's name."""
    grace_s: float = 5.0
    """On stop, how long open HTTP calls may finish."""
    tls: MeshTLS | None = None
    """The frontend's mesh identity: its link to the gateway and its own port (``own_port``) are
    mesh mTLS; None: plaintext (an ``--insecure`` mesh). Never the client port's (``serving_cert``)."""
    serving_cert: ServingCert | None = None
    """Server-side TLS of the client port and the HTTP port; None: plaintext."""
    api_keys: ApiKeys = NO_KEYS
    """The keys the HTTP port asks for (the gRPC port's check is the server's interceptor:
    ``frontend.auth.interceptors``); none: every caller is let in."""
    slots: tuple[Path, ...] = ()
    """Lock files, one per frontend that serves (``stagemesh up --spare-frontends``): this one binds
    its ports only once it holds one of them, so with more frontends than files the rest wait,
    loaded and linked, as spares (``Frontend._take_slot``); empty: it serves at once."""


class Frontend(Role):
    """Serves clients over the link to the gateway."""

    def __init__(self, opts: FrontendOptions, topology: Topology):
        self.opts, self.topology = opts, topology
        self.link = GatewayLink(opts.gateway, opts.name, opts.messages_per_s, tls=opts.tls)
        self._health: asyncio.Task | None = None
        self._http: HttpServer | None = None
        self._http_stopping: asyncio.Task | None = None

    async def load(self, server: WorkerServer) -> None:
        """Tokenizer and limits of the model, the link to the gateway, then the client port.

        NOTE: the port is bound only once the gateway answers: frontends share it
        (SO_REUSEPORT), so the kernel hands connections to every process bound to it, and one
        that is still starting would answer them UNAVAILABLE while its siblings serve."""
        config = ModelConfig.from_dir(self.topology.model)
        tokenizer = Tokenizer.from_dir(self.topology.model)
        slot = self._slot()
        self.link.spare = slot is not None and slot.held is None
        self.link.start()
        log.info("%s waiting for the gateway at %s", self.opts.name, self.opts.gateway)
        await self.link.connected.wait()
        servicer = FrontendServicer(self.link, tokenizer, config)
        add_servicer = with_kserve(partial(gateway_pb2_grpc.add_GatewayServicer_to_server, servicer), KServeServicer(
            self.link, tokenizer, config, self.opts.served_model_name or Path(self.topology.model).name))
        own = (f"{self.opts.host}:{self.opts.own_port}",) if self.opts.own_port else ()
        http = self._http_server(tokenizer, config) if self.opts.http_port else None
        if self.link.spare:  # it waits here, ready to bind
            await self._take_slot(slot)
        cert = self.opts.serving_cert
        if http is not None:  # before the client port: once a probe sees SERVING, both ports are up
            await http.start(self.opts.host, self.opts.http_port, cert.ssl_context() if cert else None)
            self._http = http
        await server.start(f"{self.opts.host}:{self.opts.port}", add_servicer, also=own, public=True,
                           public_credentials=cert.server_credentials() if cert else None)

    def _slot(self) -> FileLocks | None:
        """The locks of ``slots`` (None without them), holding one if one is free: else a spare."""
        if not self.opts.slots:
            return None
        locks = FileLocks(self.opts.slots)
        if locks.try_acquire():
            log.info("%s holds %s: it serves", self.opts.name, locks.held)
        else:
            log.info("%s is a spare: %d other frontend(s) serve; serving once one of them exits",
                     self.opts.name, len(self.opts.slots))
        return locks

    async def _take_slot(self, locks: FileLocks) -> None:
        """A spare: until it holds one of ``locks``.

        NOTE: a warm spare. A lone frontend's restart costs its clients a new interpreter, its
        imports, the tokenizer and the link (1.2-1.7 s here, under load); a spare has done all of
        that, and built its servers, and blocks in ``flock`` (``stagemesh.runtime.file_lock``)
        until a serving frontend dies, which lets its lock go as it dies, SIGKILL included. It then
        binds the shared client port (and its own and the HTTP port) and its clients resume there;
        the launcher starts the dead one again, which finds every slot held and waits as the next
        spare. The gateway's status lists a spare as one (``GatewayLink.spare``)."""
        held = await locks.wait()
        self.link.serves()
        log.warning("%s takes over %s: a frontend exited; this spare serves now", self.opts.name, held)

    def _http_server(self, tokenizer: Tokenizer | None, config: ModelConfig) -> HttpServer:
        """The OpenAI API (and the gateway's pages) for the shared HTTP port, not yet bound.

        NOTE: imported here, as the gateway's HTTP is: aiohttp and jinja2 are ~0.3 s of a frontend's
        start on this VM, which a restarted lone frontend's clients wait for, and a frontend without
        ``--http-port`` serves no HTTP."""
        from frontend.chat_template import ChatTemplate
        from frontend.gateway_proxy import GatewayProxy
        from frontend.http import HttpServer
        from frontend.openai_http import OpenAIApi

        model = self.topology.model
        api = OpenAIApi(self.link, tokenizer, config, self.opts.served_model_name or Path(model).name,
                        ChatTemplate.from_dir(model))
        proxy = GatewayProxy(self.opts.gateway_http) if self.opts.gateway_http else None
        return HttpServer(api, proxy, self.opts.grace_s, self.opts.api_keys)

    async def serve(self, server: WorkerServer) -> None:
        """SERVING while the link to the gateway is up and a chain serves, else NOT_SERVING."""
        self._health = asyncio.create_task(self._follow_link(server))
        log.info("%s serving clients on %s:%d", self.opts.name, self.opts.host, self.opts.port)

    async def _follow_link(self, server: WorkerServer) -> None:
        """SERVING while linked to a gateway that can serve (a chain is in service)."""
        serving = None
        while True:
            now = self.link.connected.is_set() and self.link.can_serve
            if now != serving:
                serving = now
                await server.set_serving(now)
            await asyncio.sleep(0.1)

    async def drain(self) -> None:
        if self._health is not None:
            self._health.cancel()
        if self._http is not None:  # stops listening now; its open calls finish beside the gRPC ones
            self._http_stopping = asyncio.create_task(self._http.stop())

    async def close(self) -> None:
        if self._http_stopping is not None:
            await self._http_stopping
        await self.link.close()
