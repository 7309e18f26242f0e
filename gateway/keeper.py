"""Rebuilds what the gateway owns in Redis when Redis lost it: the topology, the expert
placement and the journal of the requests still running.

NOTE: Redis keeps an append-only file, so a restarted Redis normally comes back with what it
held; but it may come back empty (its file lost, a fresh server, a FLUSHALL), and even a
reloaded one lacks the writes the gateway dropped while it was down (``gateway.journal`` drops
a batch it cannot write). Every ``INTERVAL_S`` the keeper reads two things in two small
commands: whether the topology key exists, and the server's run id (new at every start). When
the topology is gone, or the run id changed, it writes back, from the gateway's own state:
the expert placement (``rewrite_placement``), the journal of every open request with its
tokens so far (and no other: entries of requests that ended while Redis was down are closed),
and last the topology, so that a rebuild cut short by Redis going down again
is tried again in full at the next tick (the topology is still missing). The workers'
registry rebuilds itself: a worker whose heartbeat finds it unregistered registers again
(``stagemesh.runtime.heartbeat``). A Redis that is down is retried at the next tick; nothing
here raises out of ``run``.

With signed documents (``stagemesh.mesh.signing``) a topology or placement that does not verify
counts as gone: the store refuses it (and reports it), and the keeper writes the gateway's own
back at the next tick, so a forged one stays in Redis for a second at most, and readers
meanwhile keep their last good copy.

Writing the journal back races with the ``JournalWriter``'s own flushes: tokens it buffered
before the snapshot would be appended a second time after it. So the rebuild runs under
``journal_lock`` (the writer's flush lock), and ``journal_snapshot`` must hand over, with the
open requests, the writes it had buffered for them (see ``StoreKeeper``).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Awaitable, Callable
from typing import Any

from stagemesh.errors import StagemeshError
from stagemesh.mesh.store import Store
from stagemesh.mesh.topology import Topology

logger = logging.getLogger(__name__)

INTERVAL_S = 1.0
"""How often the keeper looks at Redis: two cheap commands a second, and a rebuild at most this
long after Redis came back empty (the workers' heartbeats bring the registry back meanwhile)."""

JournalSnapshot = dict[str, tuple[list[int], dict[str, Any], int, list[int]]]
"""request id -> (prompt token ids, sampling parameters as journaled, chain, tokens emitted so far)."""


class StoreKeeper:
    """Watches Redis for lost state and writes the gateway's part of it back (see the module NOTE).

    ``store``: the gateway's store. ``topology``: the topology it runs (read at startup).
    ``rewrite_placement``: writes every chain's expert placement again, with each replica's
    current liveness; None when the experts live in the stages. ``journal_snapshot``: every open
    request (running, waiting, or between chains) with all the tokens its client was sent,
    called with ``journal_lock`` held; it must also forget what the journal writer buffered for
    those requests (their pending opens, tokens and closes), which the snapshot supersedes.
    ``journal_lock``: the journal writer's flush lock, so no flush runs between the snapshot and
    its write; None only where nothing else writes the journal (tests).
    """

    def __init__(
        self,
        store: Store,
        topology: Topology,
        rewrite_placement: Callable[[], Awaitable[None]] | None,
        journal_snapshot: Callable[[], JournalSnapshot],
        *,
        journal_lock: asyncio.Lock | None = None,
        interval_s: float = INTERVAL_S,
    ):
        self.store, self.topology = store, topology
        self.rewrite_placement, self.journal_snapshot = rewrite_placement, journal_snapshot
        self.journal_lock = journal_lock
        self.interval_s = interval_s
        self.server: str | None = None
        """The run id of the Redis whose state is known whole; None until the first look."""
        self.rebuilds = 0
        self._failing = False

    async def run(self) -> None:
        """Look every ``interval_s`` until cancelled; never raises otherwise."""
        while True:
            await self.tick()
            await asyncio.sleep(self.interval_s)

    async def tick(self) -> str | None:
        """One look, and a rebuild when one is due; why it rebuilt (None: nothing to do, or Redis failed)."""
        try:
            why = await self.check()
        except Exception as err:  # noqa: BLE001 - Redis down (retried next tick) or a bug: never fatal
            self._note_failure(err)
            return None
        if self._failing:
            logger.info("Redis answers the store keeper again")
        self._failing = False
        return why

    async def check(self) -> str | None:
        """Rebuild when the topology is gone or Redis restarted since the last look; why, or None."""
        server, present = await self.store.server_id(), await self.store.has_topology()
        placed = await self._placed()
        if not present:
            why = "the topology is gone (Redis came back empty, or was flushed) or refused (forged)"
        elif self.server is not None and server != self.server:
            why = "Redis restarted (it may lack the writes made while it was down)"
        else:
            self.server = server
            return None if placed else await self._write_placement_back()
        count = await self.rebuild()
        self.server = server
        self.rebuilds += 1
        logger.warning("%s: rebuilt the topology, the expert placement and the journal of %d open request(s)",
                       why, count)
        return why

    async def _placed(self) -> bool:
        """Whether every chain's expert placement is there and verifies (True without expert workers).
        Read at every tick, so that a forged one is refused (and reported) here too."""
        if self.rewrite_placement is None:
            return True
        chains = [c.index for c in self.topology.chains if c.expert_workers]
        return all([await self.store.has_placement(chain) for chain in chains])

    async def _write_placement_back(self) -> str:
        """The placement again, when only it is gone or refused (forged); why."""
        await self.rewrite_placement()
        why = "an expert placement is gone or refused (forged)"
        logger.warning("%s: wrote the gateway's placement back", why)
        return why

    async def rebuild(self) -> int:
        """Write the placement, the journal, then the topology back; how many requests were journaled."""
        if self.rewrite_placement is not None:
            await self.rewrite_placement()
        count = await self._rewrite_journal()
        await self.store.set_topology(self.topology)
        return count

    async def _rewrite_journal(self) -> int:
        """Make the journal in Redis the snapshot: its requests opened afresh with their tokens, and
        the entries of requests no longer open (closed while Redis was down) closed."""
        lock = self.journal_lock if self.journal_lock is not None else contextlib.nullcontext()
        async with lock:
            snapshot = self.journal_snapshot()
            if stale := sorted(await self._journaled() - snapshot.keys()):
                await self.store.journal_close_many(stale)
            if snapshot:
                await self.store.journal_open_many({rid: (prompt, params, chain)
                                                    for rid, (prompt, params, chain, _) in snapshot.items()})
                await self.store.journal_append_many({rid: tokens for rid, (*_, tokens) in snapshot.items()})
        return len(snapshot)

    async def _journaled(self) -> set[str]:
        """The ids of every request journaled in Redis, on any chain."""
        return {rid for chain in self.topology.chains for rid in await self.store.journal_by_chain(chain.index)}

    def _note_failure(self, err: Exception) -> None:
        if not self._failing:
            logger.warning("store keeper cannot read Redis (%s); retrying every %.0f s", err, self.interval_s,
                           exc_info=not isinstance(err, StagemeshError))
        self._failing = True
