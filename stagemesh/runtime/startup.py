"""What every worker process does before it can serve: reach Redis, then find its place in
the topology the launcher (or compose's planner) wrote there.

NOTE: both steps wait, until one deadline (``wait_s`` after the start), for a Redis that is down
or restarting: one that refuses connections, dies between the two steps, or comes back empty
(no topology until the launcher or the gateway's ``StoreKeeper`` writes it again). So a worker
restarted while Redis is down starts once Redis is back. The limit is the worker's
``--topology-wait-s``: `stagemesh up` passes ``launch.REDIS_WAIT_S`` (60 s); past it the worker
exits with a StartupError, and the launcher restarts it with its growing backoff, at most
``RestartPolicy.max_quick_deaths`` times in a row.

Torch-free; shared by the stage and expert workers.
"""

from __future__ import annotations

import asyncio
import time
from typing import Awaitable, Callable, TypeVar

from stagemesh.errors import StagemeshError, Unavailable
from stagemesh.mesh.store import Store
from stagemesh.mesh.topology import Topology

Place = TypeVar("Place")


class StartupError(Exception):
    """The worker cannot start; the message says what to fix."""


async def connect_store(url: str, deployment: str, deadline: float) -> Store:
    """The store, retried until ``deadline`` (time.monotonic) while Redis comes up."""
    while True:
        try:
            return await Store.connect(url, deployment)
        except StagemeshError as err:
            if time.monotonic() > deadline:
                raise StartupError(str(err)) from err
            await asyncio.sleep(0.5)


async def find_place(
    store: Store, deployment: str, wait_s: float, deadline: float, find: Callable[[Topology], Place]
) -> Place:
    """``find(topology)`` once the topology is in Redis; StartupError when it never comes (or
    Redis stays unreachable) until ``deadline``, is malformed or has no such place."""
    try:
        while (topology := await _topology(store, deadline)) is None:
            if time.monotonic() > deadline:
                raise StartupError(
                    f"no topology in Redis at {store.url} (deployment {deployment!r}) after "
                    f"{wait_s:.0f} s; `stagemesh up` writes it (Store.set_topology)"
                )
            await asyncio.sleep(0.2)
        return find(topology)
    except ValueError as err:
        raise StartupError(f"the topology in Redis at {store.url}: {err}") from err


async def _topology(store: Store, deadline: float) -> Topology | None:
    """The topology; None while there is none or Redis is unreachable (until ``deadline``)."""
    try:
        return await store.get_topology()
    except Unavailable as err:
        if time.monotonic() > deadline:
            raise StartupError(str(err)) from err
        return None


async def start_worker(
    url: str,
    deployment: str,
    wait_s: float,
    find: Callable[[Topology], Place],
    serve: Callable[[Place, Store], Awaitable[int]],
) -> int:
    """Reach Redis and this worker's place (both within ``wait_s``), then ``serve(place, store)``;
    its exit code. The store is closed after."""
    deadline = time.monotonic() + wait_s
    store = await connect_store(url, deployment, deadline)
    try:
        return await serve(await find_place(store, deployment, wait_s, deadline, find), store)
    finally:
        await store.close()
