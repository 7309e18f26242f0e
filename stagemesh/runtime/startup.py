"""What every worker process does before it can serve: reach Redis, then find its place in
the topology the launcher (or compose's planner) wrote there.

Torch-free; shared by the stage and expert workers.
"""

from __future__ import annotations

import asyncio
import time
from typing import Awaitable, Callable, TypeVar

from stagemesh.errors import StagemeshError
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
    """``find(topology)`` once the topology is in Redis; StartupError when it never comes, is
    malformed or has no such place."""
    try:
        while (topology := await store.get_topology()) is None:
            if time.monotonic() > deadline:
                raise StartupError(
                    f"no topology in Redis at {store.url} (deployment {deployment!r}) after "
                    f"{wait_s:.0f} s; `stagemesh up` writes it (Store.set_topology)"
                )
            await asyncio.sleep(0.2)
        return find(topology)
    except ValueError as err:
        raise StartupError(f"the topology in Redis at {store.url}: {err}") from err


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
