"""Gateway startup and shutdown. The gateway schedules: its callers are the frontends
(``frontend/``), which own the client-facing APIs, over the ``Scheduling`` service
(``gateway.scheduling``, ``gateway.hub``).

Startup: connect to Redis and read the topology (both retried until present), with a
``lock_file`` wait until this process holds it (a warm standby: ``gateway.lead``), start the gRPC
server with health NOT_SERVING, wait until every stage of every chain answers its health
check SERVING and its ``Info`` (after a restart: until one chain does), build one engine per
chain, take over the open requests a previous gateway journaled (``FrontendHub.adopt``), then
turn health SERVING: the frontends connect (again) and resubmit their clients' requests. From
then on ``gateway.chain_health`` takes chains whose workers stop answering out of service and
puts them back when they answer again, requests of a failed chain resume on another
(``gateway.failover``), and the overall health ("") says NOT_SERVING while no chain is in
service (the ``Scheduling`` service stays SERVING, so the frontends stay connected and their
requests wait for a chain).

NOTE: each start is a new *epoch* (its start time in microseconds; a standby's: when it leads),
stamped on every step: a stage worker that sees a newer one drops the sequences of the old
gateway, whose KV cache it still holds, before running the step (``stagemesh.runners.stage``).
SIGTERM / SIGINT: health NOT_SERVING, stop accepting calls, let running ones finish for
``shutdown_grace_s`` (``server.stop(grace)``), then stop the engines and flush the journal.

The lifecycle itself is ``stagemesh.runtime.server.run``, shared with the workers; ``Gateway``
is the gateway's part in it.
"""

from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import dataclass
from functools import partial
from pathlib import Path

from gateway.chain_health import ChainWatch
from gateway.chain_setup import POLL_S, build_chain, retry
from gateway.experts import ExpertWatch
from gateway.history import History
from gateway.hub import RESUME_WINDOW_S, FrontendHub
from gateway.journal import JournalWriter
from gateway.keeper import StoreKeeper
from gateway.lead import FENCE_AFTER_S, Fence, LeadLock
from gateway.metrics import GatewayMetrics
from gateway.router import FAILOVER_WAIT_S, Router
from gateway.scheduling import SchedulingServicer
from gateway.status import StatusReporter
from stagemesh.config import ModelConfig
from stagemesh.errors import StagemeshError
from stagemesh.mesh.figures import StageFigures
from stagemesh.mesh.signing import Signer
from stagemesh.mesh.store import JournalEntry, Store
from stagemesh.mesh.topology import Chain, Topology
from stagemesh.runtime import health
from stagemesh.runtime.health import HealthProbe
from stagemesh.runtime.procs import LIVENESS_S
from stagemesh.runtime.server import EXCLUSIVE_PORT, Role, WorkerServer, run
from stagemesh.runtime.tls import MeshTLS
from stagemesh.tokenizer import Tokenizer
from stagemesh.v1 import scheduling_pb2, scheduling_pb2_grpc

logger = logging.getLogger(__name__)

SCHEDULING_SERVICE = scheduling_pb2.DESCRIPTOR.services_by_name["Scheduling"].full_name
SERVER_OPTIONS = (EXCLUSIVE_PORT,)
"""gRPC's defaults (its callers send token ids, not activations), on a port of its own."""
LATE_CHAIN_WAIT_S = 30.0
"""Once one chain serves, how long the gateway waits for the others before it serves without them."""


@dataclass(frozen=True)
class GatewayOptions:
    """How one gateway process runs."""

    redis_url: str
    deployment: str = "default"
    """Names the mesh's keys in Redis; the same as its workers'."""
    host: str = "127.0.0.1"
    port: int = 50051
    """gRPC port of the ``Scheduling`` service, which the frontends connect to."""
    http_port: int | None = None
    """Serve the dashboard (``/``), ``/api/status``, ``/metrics`` and ``/healthz`` over HTTP on this
    port; None: no HTTP."""
    http_host: str | None = None
    """The interface the HTTP server binds; None: ``host``. Its pages carry no API-key check (the
    frontends' HTTP port passes them through with one), so `stagemesh up` binds it to loopback."""
    max_num_batched_tokens: int = 512
    """Token budget of one micro-batch."""
    max_num_seqs: int = 256
    """Sequences in one micro-batch at most."""
    max_waiting: int = 1024
    """Requests one chain queues at most; past that a request is refused RESOURCE_EXHAUSTED."""
    shutdown_grace_s: float = 5.0
    """On SIGTERM, running calls get this long to finish before they are cancelled."""
    failover_wait_s: float = FAILOVER_WAIT_S
    """A running request whose chain failed waits this long for a healthy chain, then fails UNAVAILABLE."""
    micro_batches: int | None = None
    """Micro-batches each chain keeps in flight; None: one per stage (every stage computes at once).
    Fewer suit stages that share too few cores to compute at once (``stagemesh up`` on CPU picks
    it: ``stagemesh.runtime.cpus.micro_batches``); more than a chain's stages are not used."""
    overlap: bool = True
    """Overlap scheduling: one step more than the chain has stages goes out while they run,
    its decodes taking the tokens still being sampled (``stagemesh.serving.scheduler``)."""
    resume_window_s: float = RESUME_WINDOW_S
    """A request whose frontend left runs on this long for a client to resume it (then it is
    cancelled); a finished one's outcome is kept as long."""
    tls: MeshTLS | None = None
    """The gateway's mesh identity: its port takes only mesh certificates (``Scheduling``: frontends
    alone), and its calls to the workers present it; None: plaintext (an ``--insecure`` mesh)."""
    lock_file: Path | None = None
    """Schedule only while holding an exclusive lock on this file (``gateway.lead``): a second gateway
    given the same file waits, warm, and takes over the moment the first exits; None: no standby."""
    fence_after_s: float = FENCE_AFTER_S
    """With ``lock_file``: a standby SIGKILLs the leader once it answered no health check this long
    (frozen), then takes over (``gateway.lead.Fence``)."""
    liveness_s: float = LIVENESS_S
    """Once serving, the process ends when its event loop has not run this long, so that whatever runs
    it restarts it (``stagemesh.runtime.watchdog``); 0: never."""
    signer: Signer | None = None
    """The mesh key (``--tls-dir``'s ``mesh.key``): the documents it writes to Redis are signed and
    those it reads checked (``stagemesh.mesh.signing``); None: unsigned (an ``--insecure`` mesh)."""


async def serve(opts: GatewayOptions) -> None:
    """Run the gateway until SIGTERM / SIGINT."""
    await run(WorkerServer(SCHEDULING_SERVICE, opts.shutdown_grace_s, options=SERVER_OPTIONS, tls=opts.tls,
                           liveness_s=opts.liveness_s),
              Gateway(opts))


class Gateway(Role):
    """The gateway's parts, built by ``load`` and torn down (whatever exists) by ``drain`` and ``close``."""

    def __init__(self, opts: GatewayOptions):
        self.opts = opts
        self.router = Router(failover_wait_s=opts.failover_wait_s)
        self.epoch = time.time_ns() // 1000
        """This incarnation, stamped on every step (``StageRequest.epoch``)."""
        self.store: Store | None = None
        self.journal: JournalWriter | None = None
        self.hub: FrontendHub | None = None
        self.status: StatusReporter | None = None
        self.metrics = GatewayMetrics()
        self.history: History | None = None
        """The dashboard's last 10 minutes, sampled by ``_sampler`` (``gateway.history``)."""
        self._sampler: asyncio.Task | None = None
        self.probe = HealthProbe(tls=opts.tls)
        """One health client for every watched worker (chains and expert placement share it)."""
        self._http = None
        self._watch: asyncio.Task | None = None
        self._serving: asyncio.Task | None = None
        self._keeper: asyncio.Task | None = None
        self._late_chains: set[asyncio.Task] = set()
        """Chains still waiting for their workers when the gateway began to serve."""
        self.chain_watch: ChainWatch | None = None
        self.experts: ExpertWatch | None = None
        """The chains' expert workers and their placement in Redis (None when the experts live in the stages)."""

    async def load(self, server: WorkerServer) -> None:
        """Redis and the topology (waited for), the server, every chain's workers serving, one engine per chain."""
        self.store = await retry("connect to Redis", lambda: Store.connect(self.opts.redis_url, self.opts.deployment,
                                                                          signer=self.opts.signer))
        topology = await retry("read the topology", self._topology)
        config = ModelConfig.from_dir(topology.model)
        tokenizer = Tokenizer.from_dir(topology.model)
        if self.opts.lock_file is not None:  # a standby waits here, imported and loaded, until it leads
            leader = f"{_local(self.opts.host)}:{self.opts.port}"
            await LeadLock(self.opts.lock_file).acquire(Fence(leader, self.opts.fence_after_s, self.opts.tls))
            self.epoch = time.time_ns() // 1000  # newer than the epoch of the gateway it follows
        self.journal = JournalWriter(self.store)
        self.journal.start()
        self.status = StatusReporter(self.store, self.router, topology)
        self.history = History(self.store, self.router, self.metrics.latencies)
        self._sampler = asyncio.create_task(self.history.run(), name="dashboard-history")
        self.hub = FrontendHub(self.router, self.journal, self.metrics, self.opts.resume_window_s)
        self.status.frontends = self.hub.frontends
        await self._start_server(server, SchedulingServicer(self.hub, self.status))
        experts = ExpertWatch(self.store, topology, self.probe)
        if experts.replicas:
            self.experts = experts
            await experts.start()  # the placement in Redis; returns once every expert worker serves
        open_requests = await self._journaled(topology)
        restart = bool(open_requests) or await self._mesh_served()
        await self._build_chains(topology, config, tokenizer, late_wait_s=0.0 if restart else LATE_CHAIN_WAIT_S)
        self.chain_watch = ChainWatch(self.store, self.router, topology, self.probe, self.experts)
        self._watch = asyncio.create_task(self.chain_watch.run(), name="gateway-health")
        self.hub.start()
        self._take_over(open_requests)
        keeper = StoreKeeper(self.store, topology, self._rewrite_placement if self.experts else None,
                             self._journal_snapshot, journal_lock=self.journal.lock)
        self._keeper = asyncio.create_task(keeper.run(), name="store-keeper")

    def _journal_snapshot(self):
        """Every open request's whole journal entry, for a Redis that lost them (``gateway.keeper``)."""
        snapshot = self.hub.journal_snapshot()
        self.journal.forget(snapshot)
        return snapshot

    async def _rewrite_placement(self) -> None:
        """Every chain's expert placement again, each replica with its current liveness."""
        for chain in self.experts.replicas:
            await self.store.set_placement(chain, self.experts.current(chain))

    async def _build_chains(self, topology: Topology, config: ModelConfig, tokenizer: Tokenizer | None,
                            late_wait_s: float) -> None:
        """Every chain, built as its workers serve: returns once all are, or once one is and the
        others have had ``late_wait_s`` more; those join the router when they serve.

        NOTE: a gateway restarted while a chain's worker is dead or frozen must not hold the
        requests until that chain is back: those it takes over from the journal, and those its
        frontends hold, which they resubmit only once it serves (a journal flushes every 100 ms,
        and Redis may have lost it). A restart (requests to take over, or a mesh whose stages ran
        steps: ``_mesh_served``) serves as soon as one chain does; a first start waits for all."""
        async def build(chain: Chain) -> None:
            self.router.add(await build_chain(chain, config, tokenizer, self.store, self.opts, self.epoch))

        tasks = [asyncio.create_task(build(chain), name=f"build-chain-{chain.index}") for chain in topology.chains]
        done, pending = await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
        if pending and late_wait_s > 0:
            more, pending = await asyncio.wait(pending, timeout=late_wait_s)
            done |= more
        for task in done:
            task.result()  # a topology the workers contradict is an error here
        if pending:
            logger.warning("serving with %d of %d chain(s); the others join once their workers serve",
                           len(done), len(tasks))
        self._late_chains = pending

    async def _mesh_served(self) -> bool:
        """Whether a stage of the mesh ran steps since it started (its figures in Redis, which expire
        30 s after its last heartbeat): this gateway follows another one."""
        try:
            metrics = await self.store.get_metrics()
        except StagemeshError as err:
            logger.warning("could not read the workers' figures: %s", err)
            return False
        steps = (StageFigures.from_json(doc).steps for doc in metrics.values())
        return any(isinstance(n, int) and n > 0 for n in steps)

    async def _journaled(self, topology: Topology) -> list[JournalEntry]:
        """The requests a previous gateway left open in the journal (none when it cannot be read)."""
        try:
            ids = [rid for chain in topology.chains for rid in await self.store.journal_by_chain(chain.index)]
            entries = await asyncio.gather(*(self.store.journal_get(rid) for rid in ids))
        except StagemeshError as err:
            logger.warning("could not read the journal to take over open requests: %s", err)
            return []
        return [e for e in entries if e is not None]

    def _take_over(self, entries: list[JournalEntry]) -> None:
        """Run on the requests a previous gateway left open."""
        if entries:
            adopted = self.hub.adopt(entries)
            logger.warning("took over %d of %d open request(s) from the journal (epoch %d)", adopted, len(entries),
                           self.epoch)

    async def serve(self, server: WorkerServer) -> None:
        await server.set_serving(True)
        self.status.ready = True
        self._serving = asyncio.create_task(self._follow_chains(server), name="gateway-serving")
        logger.info("gateway ready on %s:%d with %d chain(s)", self.opts.host, self.opts.port, len(self.router.chains))

    async def _follow_chains(self, server: WorkerServer) -> None:
        """The overall health says whether a chain can serve; the Scheduling service stays SERVING."""
        serving = True
        while True:
            await asyncio.sleep(POLL_S / 5)
            if self.router.can_serve != serving:
                serving = self.router.can_serve
                await server.health.set("", health.SERVING if serving else health.NOT_SERVING)
                logger.warning("the mesh %s", "can serve again" if serving else
                               f"cannot serve: {self.router.why_unavailable()}")

    async def _topology(self) -> Topology:
        topology = await self.store.get_topology()
        if topology is None:
            raise LookupError(f"no topology in Redis for deployment {self.opts.deployment!r} yet")
        return topology

    async def _start_server(self, server: WorkerServer, servicer: SchedulingServicer) -> None:
        add_servicer = partial(scheduling_pb2_grpc.add_SchedulingServicer_to_server, servicer)
        await server.start(f"{self.opts.host}:{self.opts.port}", add_servicer)
        if self.opts.http_port is not None:
            # NOTE: imported here: aiohttp and jinja2 are 0.4 s of a restarted gateway's ~1 s start on this
            # VM, while its streams wait for it, and a gateway without --http-port serves no page.
            from gateway.http import start_http

            host = self.opts.http_host or self.opts.host
            self._http = await start_http(self.status, host, self.opts.http_port, self.metrics, self.history)

    async def drain(self) -> None:
        logger.info("gateway stopping")
        if self.status is not None:
            self.status.ready = False

    async def close(self) -> None:
        """After ``server.stop(grace)``: the chain watch, the engines, the journal, HTTP, Redis."""
        for task in (self._watch, self._serving, self._keeper, self._sampler, *self._late_chains):
            if task is not None:
                task.cancel()
                await asyncio.gather(task, return_exceptions=True)
        if self.chain_watch is not None:
            await self.chain_watch.stop()
        if self.hub is not None:
            await self.hub.stop()
        await self.probe.close()
        for handle in self.router.chains:
            await handle.engine.stop()
            await handle.remote.close()
        if self.journal is not None:
            await self.journal.stop()
        if self._http is not None:
            await self._http.cleanup()
        if self.store is not None:
            await self.store.close()


def _local(host: str) -> str:
    """Where this host's own server at ``host`` is reached: loopback for a wildcard address."""
    return "127.0.0.1" if host.strip("[]") in ("", "0.0.0.0", "::") else host
