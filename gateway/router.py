"""The gateway's chains (data-parallel replicas): which one takes a request, and taking a failed
chain out of service and back.

NOTE: a chain is *in service* while ``healthy``. It leaves service (``fence``) when the health
watch finds one of its workers down (``gateway.chain_health``) or a step of it fails
UNAVAILABLE: its engine is stopped, which fails every request it holds, running or waiting, as
UNAVAILABLE, and each request's handler resumes it on another chain (``gateway.failover``).
It comes back (``revive``) once every worker of it answers again: its stages are told to free
every sequence the old engine knew (a stage that survived still holds their KV cache; one that
restarted ignores unknown ids), and a fresh engine (fresh scheduler, fresh stream) takes over.
So the old scheduler's state never has to be mended after a failure: it is dropped whole.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from dataclasses import dataclass

from gateway.chain_client import RemoteChain
from stagemesh.errors import Cancelled, InvalidArgument, StagemeshError, Unavailable
from stagemesh.serving.engine import Engine
from stagemesh.serving.types import StepPlan

logger = logging.getLogger(__name__)

FAILOVER_WAIT_S = 30.0
"""How long a request whose chain failed waits for a healthy chain before it fails UNAVAILABLE."""
POLL_S = 0.1
CLOSE_TIMEOUT_S = 2.0
REVIVE_TIMEOUT_S = 10.0
"""How long the step that frees a returning chain's old sequences may take."""


@dataclass(eq=False)
class ChainHandle:
    """One chain of stage workers: its id, its stream client and the engine driving it."""

    chain_id: int
    remote: RemoteChain
    engine: Engine
    stage_addresses: tuple[str, ...]
    renew: Callable[[], tuple[RemoteChain, Engine]] | None = None
    """A fresh stream client and engine (not started) for when the chain comes back into service."""
    healthy: bool = True
    """In service: every worker of it heartbeats and answers its health check, and it has not
    failed since (kept current by ``gateway.chain_health`` and ``Router.fence``)."""
    why_down: str = ""
    """Why it last left service."""
    outages: int = 0
    """Times it left service."""
    served_before: int = 0
    """Requests finished by the engines it had before the current one."""
    last_admitted: int = 0
    """The router's admission count when it last took a request (ties go to the chain idle longest)."""

    @property
    def requests_served(self) -> int:
        return self.served_before + self.engine.counters.requests_finished

    @property
    def free_kv_blocks(self) -> int:
        """KV blocks that neither running nor waiting requests hold or will hold."""
        scheduler = self.engine.scheduler
        return scheduler.config.num_blocks - scheduler.kv_blocks_used - scheduler.kv_blocks_waiting

    @property
    def queued_tokens(self) -> int:
        return self.engine.scheduler.queued_tokens


class Router:
    """Admits each request to the healthy chain with the most free KV room, then the fewest
    queued tokens, then the one that took a request least recently; remembers where it runs;
    moves it when its chain fails."""

    def __init__(self, *, failover_wait_s: float = FAILOVER_WAIT_S) -> None:
        self.chains: list[ChainHandle] = []
        self.failover_wait_s = failover_wait_s
        self._active: dict[str, ChainHandle] = {}
        self._cancelled: set[str] = set()
        """Running requests cancelled while between chains (failing over): they go no further."""
        self._admissions = 0

    def add(self, handle: ChainHandle) -> None:
        """A chain whose workers serve; chains are kept in id order, however they came."""
        self.chains.append(handle)
        self.chains.sort(key=lambda h: h.chain_id)

    def admit(self, request_id: str) -> ChainHandle:
        """The chain for a new request; InvalidArgument for a running id, Unavailable at once with no healthy chain."""
        if request_id in self._active:
            raise InvalidArgument(f"request id {request_id!r} is already running; use a new id")
        best = self._best()
        if best is None:
            raise Unavailable(self.why_unavailable())
        self._assign(request_id, best)
        return best

    def _best(self) -> ChainHandle | None:
        healthy = [h for h in self.chains if h.healthy]
        return max(healthy, key=lambda h: (h.free_kv_blocks, -h.queued_tokens, -h.last_admitted), default=None)

    def _assign(self, request_id: str, handle: ChainHandle) -> None:
        self._admissions += 1
        handle.last_admitted = self._admissions
        self._active[request_id] = handle

    def release(self, request_id: str) -> None:
        self._active.pop(request_id, None)
        self._cancelled.discard(request_id)

    def abort(self, request_id: str) -> bool:
        """Cancel a running request, one failing over between chains included; False when it is not running."""
        handle = self._active.get(request_id)
        if handle is None:
            return False
        if not (handle.healthy and handle.engine.abort(request_id)):
            self._cancelled.add(request_id)  # between chains: its handler stops before the next one
        return True

    def raise_if_cancelled(self, request_id: str) -> None:
        """Cancelled when ``abort`` caught the request between chains."""
        if request_id in self._cancelled:
            raise Cancelled(f"request {request_id!r} was cancelled while it was moving to another chain")

    # --- failure and recovery ----------------------------------------------------------

    async def fail_over(self, request_id: str, handle: ChainHandle, engine: Engine, why: str) -> ChainHandle:
        """``engine`` of ``handle`` failed the request: take that chain out of service (unless that
        happened already) and admit the request to the best healthy chain, waiting up to
        ``failover_wait_s`` for one; Unavailable ``no healthy chain: ...`` when none comes."""
        await self.fence(handle, engine, why)
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.failover_wait_s
        while (best := self._best()) is None:
            self.raise_if_cancelled(request_id)
            if loop.time() >= deadline:
                self._active.pop(request_id, None)
                raise Unavailable(f"{self.why_unavailable()} (waited {self.failover_wait_s:g} s for one to come back)")
            await asyncio.sleep(POLL_S)
        self._assign(request_id, best)
        return best

    async def fence(self, handle: ChainHandle, engine: Engine, why: str) -> None:
        """Take ``handle`` out of service if ``engine`` still drives it: every request it holds fails UNAVAILABLE."""
        if handle.engine is not engine or not handle.healthy:
            return  # already out of service, or out and back with a new engine since
        handle.healthy, handle.why_down = False, why
        handle.outages += 1
        scheduler = engine.scheduler
        logger.warning("chain %d is OUT of service (%s); moving its %d running and %d waiting requests",
                       handle.chain_id, why, scheduler.num_running, scheduler.num_waiting)
        await engine.stop()
        await _close(handle.remote, f"chain {handle.chain_id} left service")

    async def revive(self, handle: ChainHandle) -> bool:
        """Put a chain that is out of service back, with a fresh engine; False when its stages
        cannot take the step that frees the old sequences (it stays out)."""
        if handle.healthy or handle.renew is None:
            return handle.healthy
        old = handle.engine
        remote, engine = handle.renew()
        frees = StepPlan(0, (), tuple(old.scheduler.cached_seq_ids()))
        try:  # NOTE: step id 0 on the fresh stream; the fresh engine's first step is 0 too (answers are FIFO).
            await asyncio.wait_for(remote.step(frees), REVIVE_TIMEOUT_S)
        except (StagemeshError, asyncio.TimeoutError) as err:
            logger.info("chain %d is not back yet: %s", handle.chain_id, getattr(err, "message", "no answer in time"))
            await _close(remote, f"chain {handle.chain_id} is not back yet")
            return False
        engine.start()
        handle.served_before += old.counters.requests_finished
        handle.remote, handle.engine, handle.healthy = remote, engine, True
        logger.warning("chain %d is back in service (outage %d: %s)", handle.chain_id, handle.outages, handle.why_down)
        return True

    @property
    def can_serve(self) -> bool:
        """A chain is in service: the mesh can take requests."""
        return any(h.healthy for h in self.chains)

    def why_unavailable(self) -> str:
        if not self.chains:
            return "the gateway is still starting: its stage workers are not all ready yet; retry shortly"
        down = "; ".join(f"chain {h.chain_id}: {h.why_down or 'out of service'}" for h in self.chains)
        return f"no healthy chain: {down}; retry later"


async def _close(remote: RemoteChain, why: str) -> None:
    try:
        await asyncio.wait_for(remote.close(why), CLOSE_TIMEOUT_S)
    except asyncio.TimeoutError:
        logger.warning("the stream to chain %d did not close within %.0f s", remote.chain, CLOSE_TIMEOUT_S)
