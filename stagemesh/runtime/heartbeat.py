"""The worker's presence in Redis: registration, a heartbeat every second, and its figures."""

from __future__ import annotations

import asyncio
import logging
import time
from typing import Any, Callable

from stagemesh.errors import StagemeshError
from stagemesh.mesh.store import Store, WorkerInfo

log = logging.getLogger(__name__)

INTERVAL_S = 1.0
TTL_S = 3.0
"""The worker counts as dead after this long without a heartbeat: about three missed beats."""
RETRY_S = 0.2
"""Between beats while Redis does not answer.

NOTE: shorter than a beat so that the registry is whole again soon after Redis returns: a Redis
that came back empty has no heartbeat keys, and the gateway's chain watch (every 0.5 s) takes a
chain whose workers have none out of service. A refused connection costs nothing to retry."""
STOP_WAIT_S = 1.0
"""How long ``stop`` waits for the beat in flight to end before it goes on without it."""


class Heartbeat:
    """Registers ``info``, then keeps it alive and publishes ``figures()`` every ``interval_s``.

    A Redis outage is logged and outlived, never fatal: the beats resume when Redis answers
    (redis-py opens a new connection by itself), and a worker that the mesh forgot in the meantime
    (deregistered, or Redis restarted empty: heartbeat returns False) registers again.
    """

    def __init__(
        self,
        store: Store,
        info: WorkerInfo,
        figures: Callable[[], dict[str, Any]],
        *,
        interval_s: float = INTERVAL_S,
        ttl_s: float = TTL_S,
        retry_s: float = RETRY_S,
    ):
        self.store, self.info, self.figures = store, info, figures
        self.interval_s, self.ttl_s, self.retry_s = interval_s, ttl_s, min(retry_s, interval_s)
        self._task: asyncio.Task | None = None
        self._failing = False
        self._stopped = False

    def start(self) -> None:
        self._task = asyncio.create_task(self._run(), name=f"heartbeat-{self.info.worker_id}")

    async def stop(self, *, deregister: bool = True) -> None:
        """Stop beating; with ``deregister`` the worker leaves the registry at once (best effort).

        NOTE: the loop also ends at its next turn by a flag, and the wait for it is bounded: a beat
        cancelled inside the Redis client can outlive its cancel. Seen in the dead-TP-rank test,
        about one run in ten on a busy machine: the failed stage still read alive 5 s after it
        began to fail, past the 3 s TTL, which only further beats can do, and nothing after
        ``fail``'s first line was logged. A beat that lands after the worker marked itself down
        keeps it alive for ``ttl_s`` at most."""
        self._stopped = True
        if self._task is not None:
            self._task.cancel()
            done, _ = await asyncio.wait({self._task}, timeout=STOP_WAIT_S)
            if not done:
                log.warning("the heartbeat of %s did not end within %.1f s of its cancel; it ends at its next turn",
                            self.info.worker_id, STOP_WAIT_S)
        if deregister:
            try:
                await asyncio.wait_for(self.store.deregister_worker(self.info.worker_id), self.ttl_s)
            except (StagemeshError, asyncio.TimeoutError) as err:
                log.warning("could not deregister %s: %s", self.info.worker_id, err)

    async def _run(self) -> None:
        registered = False
        while not self._stopped:
            try:
                if not registered:
                    await self.store.register_worker(self.info, self.ttl_s)
                    log.info("registered %s at %s in Redis", self.info.worker_id, self.info.address)
                registered = await self.store.heartbeat(self.info.worker_id, self.ttl_s, self._figures())
                if not registered:
                    log.warning("Redis forgot %s; registering it again", self.info.worker_id)
                    continue
                self._note_ok()
            except Exception as err:  # noqa: BLE001 - a failed beat is retried, never fatal
                self._note_failure(err)
            await asyncio.sleep(self.retry_s if self._failing else self.interval_s)

    def _figures(self) -> dict[str, Any]:
        """The worker's figures, stamped with ``time`` (Unix time of this beat) unless they carry one."""
        figures = self.figures()
        figures.setdefault("time", time.time())
        return figures

    def _note_ok(self) -> None:
        if self._failing:
            log.info("Redis answers heartbeats of %s again", self.info.worker_id)
        self._failing = False

    def _note_failure(self, err: Exception) -> None:
        if not self._failing:
            log.warning(
                "heartbeat of %s failed (%s); retrying every %.1f s", self.info.worker_id, err, self.retry_s,
                exc_info=not isinstance(err, StagemeshError),
            )
        self._failing = True
