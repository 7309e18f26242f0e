"""A frontend's part in the server lifecycle (``stagemesh.runtime.server.run``): the model's
tokenizer and limits, the client port (shared with the mesh's other frontends), the link to
the gateway; health SERVING while the link is up."""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass
from functools import partial

from frontend.link import GatewayLink
from frontend.servicer import FrontendServicer
from frontend.stream import MESSAGES_PER_S
from stagemesh.config import ModelConfig
from stagemesh.mesh.topology import Topology
from stagemesh.runtime.server import SERVER_OPTIONS, Role, WorkerServer
from stagemesh.tokenizer import Tokenizer
from stagemesh.v1 import gateway_pb2, gateway_pb2_grpc

log = logging.getLogger(__name__)

GATEWAY_SERVICE = gateway_pb2.DESCRIPTOR.services_by_name["Gateway"].full_name
CLIENT_SERVER_OPTIONS = (*SERVER_OPTIONS, ("grpc.so_reuseport", 1))
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


class Frontend(Role):
    """Serves clients over the link to the gateway."""

    def __init__(self, opts: FrontendOptions, topology: Topology):
        self.opts, self.topology = opts, topology
        self.link = GatewayLink(opts.gateway, opts.name, opts.messages_per_s)
        self._health: asyncio.Task | None = None

    async def load(self, server: WorkerServer) -> None:
        """Tokenizer and limits of the model, the link to the gateway, then the client port.

        NOTE: the port is bound only once the gateway answers: frontends share it
        (SO_REUSEPORT), so the kernel hands connections to every process bound to it, and one
        that is still starting would answer them UNAVAILABLE while its siblings serve."""
        config = ModelConfig.from_dir(self.topology.model)
        tokenizer = Tokenizer.from_dir(self.topology.model)
        self.link.start()
        log.info("%s waiting for the gateway at %s", self.opts.name, self.opts.gateway)
        await self.link.connected.wait()
        servicer = FrontendServicer(self.link, tokenizer, config)
        add_servicer = partial(gateway_pb2_grpc.add_GatewayServicer_to_server, servicer)
        await server.start(f"{self.opts.host}:{self.opts.port}", add_servicer)

    async def serve(self, server: WorkerServer) -> None:
        """SERVING while the link to the gateway is up, NOT_SERVING while it is down."""
        self._health = asyncio.create_task(self._follow_link(server))
        log.info("%s serving clients on %s:%d", self.opts.name, self.opts.host, self.opts.port)

    async def _follow_link(self, server: WorkerServer) -> None:
        while True:
            await server.set_serving(True)
            while self.link.connected.is_set():
                await asyncio.sleep(0.1)
            await server.set_serving(False)
            await self.link.connected.wait()

    async def drain(self) -> None:
        if self._health is not None:
            self._health.cancel()

    async def close(self) -> None:
        await self.link.close()
