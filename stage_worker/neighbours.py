"""The worker's health follows its neighbours: SERVING only while the workers it sends to answer.

A stage is SERVING once its weights are loaded AND every neighbour it forwards to (the next
stage of its chain, if any) answers its own health check SERVING; it turns NOT_SERVING when
one stops answering and SERVING again when it is back. Since each stage waits on the next one,
a chain comes up SERVING from its last stage back to its first, and the first stage's health
says whether the whole chain behind it can serve.

NOTE: polling, not ``Health.Watch``: one unary Check per neighbour and interval is as cheap,
and a neighbour that is gone (connection refused) reads the same as one NOT_SERVING. The checks
go over a ``HealthProbe``'s channel, kept while the neighbour answers (a third of the CPU of a
check on a new channel: start-up checks often).
"""

from __future__ import annotations

import asyncio
import logging
from typing import Awaitable, Callable

from stage_worker.topology import StagePlace
from stagemesh.runtime.health import HealthProbe, retry_after
from stagemesh.runtime.tls import MeshTLS

log = logging.getLogger(__name__)

INTERVAL_S = 1.0
"""How often neighbours are checked while they answer."""
RETRY_S = 0.25
"""How often while one has not answered for long (``retry_after``: more often at first; start-up waits on this)."""


def stage_neighbours(place: StagePlace) -> tuple[str, ...]:
    """The addresses a stage sends to: the next stage of its chain (none for the last stage)."""
    return () if place.next_address is None else (place.next_address,)


async def follow_neighbours(addresses: tuple[str, ...], set_serving: Callable[[bool], Awaitable[None]],
                            tls: MeshTLS | None = None) -> None:
    """Calls ``set_serving(True)`` while every neighbour is SERVING, ``set_serving(False)`` when one
    is not (only on changes; the first call comes once the first check is done). Runs until cancelled."""
    if not addresses:
        await set_serving(True)
        return
    loop = asyncio.get_running_loop()
    probe = HealthProbe(tls=tls)
    current: bool | None = None
    down_since = loop.time()
    try:
        while True:
            answers = await asyncio.gather(*(probe.serving(a) for a in addresses))
            ok = all(answers)
            if ok != current:
                if current is not None or not ok:
                    down = [a for a, up in zip(addresses, answers) if not up]
                    log.info("neighbours %s", "all SERVING again" if ok else f"not SERVING: {', '.join(down)}")
                await set_serving(ok)
                current = ok
                down_since = loop.time()
            await asyncio.sleep(INTERVAL_S if ok else retry_after(loop.time() - down_since, RETRY_S))
    finally:
        await probe.close()
