"""The gateway's chains (data-parallel replicas) and which one takes a new request."""

from __future__ import annotations

from dataclasses import dataclass

from stagemesh.errors import InvalidArgument, Unavailable
from stagemesh.serving.engine import Engine

from .chain_client import RemoteChain


@dataclass(eq=False)
class ChainHandle:
    """One chain of stage workers: its id, its stream client and the engine driving it."""

    chain_id: int
    remote: RemoteChain
    engine: Engine
    stage_addresses: tuple[str, ...]
    healthy: bool = True
    """Every stage worker of the chain heartbeats (kept current by the gateway's health monitor)."""

    @property
    def free_kv_blocks(self) -> int:
        scheduler = self.engine.scheduler
        return scheduler.config.num_blocks - scheduler.kv_blocks_used


class Router:
    """Admits each request to the healthy chain with the most free KV room; remembers where it went."""

    def __init__(self) -> None:
        self.chains: list[ChainHandle] = []
        self._active: dict[str, ChainHandle] = {}

    def add(self, handle: ChainHandle) -> None:
        self.chains.append(handle)

    def admit(self, request_id: str) -> ChainHandle:
        """The chain for a new request; InvalidArgument for a running id, Unavailable with no chain."""
        if request_id in self._active:
            raise InvalidArgument(f"request id {request_id!r} is already running; use a new id")
        healthy = [h for h in self.chains if h.healthy]
        if not healthy:
            raise Unavailable(self._why_unavailable())
        best = max(healthy, key=lambda h: (h.free_kv_blocks, -h.engine.scheduler.num_waiting))
        self._active[request_id] = best
        return best

    def release(self, request_id: str) -> None:
        self._active.pop(request_id, None)

    def abort(self, request_id: str) -> bool:
        """Cancel a running request; False when no chain runs it."""
        handle = self._active.get(request_id)
        return handle is not None and handle.engine.abort(request_id)

    def _why_unavailable(self) -> str:
        if not self.chains:
            return "the gateway is still starting: its stage workers are not all ready yet; retry shortly"
        down = "; ".join(f"chain {h.chain_id}: {' -> '.join(h.stage_addresses)}" for h in self.chains)
        return f"no healthy chain: every chain has a stage worker that stopped heartbeating ({down}); retry later"
