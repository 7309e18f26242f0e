"""Waiting inside a test's event loop for what the code under test does on its own time."""

from __future__ import annotations

import asyncio
from collections.abc import Callable


async def eventually(predicate: Callable[[], object], timeout_s: float) -> bool:
    """Whether ``predicate()`` came to hold within ``timeout_s``, polled every 10 ms (a loaded
    machine may pause the loop's other tasks for a while); the caller asserts what it needs."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout_s
    while not predicate():
        if loop.time() >= deadline:
            return False
        await asyncio.sleep(0.01)
    return True
