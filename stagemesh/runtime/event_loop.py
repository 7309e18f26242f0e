"""The event loop every mesh process (gateway, frontend, stage and expert worker) runs on: uvloop's
where it is installed (a dependency on Linux), else the standard library's.

NOTE: why. At 128 streams most of the front door's CPU per streamed token is event-loop and gRPC
callback work, not stagemesh's own code: asyncio's ``Handle._run`` alone was ~12% of the
gateway's py-spy samples and ~50% of the frontend's. On uvloop (libuv, in Cython) the same load
served ~12% more tokens/s and the gateway + frontend spent ~8% less CPU per token (median of
eight runs each, interleaved; BENCHMARKS.md, "Session 14"); one stream's latency did not move.
grpc.aio, aiohttp and redis.asyncio run on any asyncio loop, and uvloop is what vLLM's and
SGLang's HTTP servers run on too. ``STAGEMESH_EVENT_LOOP=asyncio`` runs the standard loop instead
(to rule the loop out while debugging).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Coroutine
from typing import Any, TypeVar

from stagemesh.runtime.startup import env_choice

log = logging.getLogger(__name__)

T = TypeVar("T")

EVENT_LOOP_ENV = "STAGEMESH_EVENT_LOOP"
"""``uvloop`` (the default) or ``asyncio``."""
CHOICES = ("uvloop", "asyncio")


def wanted() -> str:
    """The loop the environment asks for; a StartupError naming the choices for anything else."""
    return env_choice(EVENT_LOOP_ENV, CHOICES)


def run(main: Coroutine[Any, Any, T]) -> T:
    """``asyncio.run(main)``, on uvloop's loop unless the environment asks for asyncio's or uvloop
    is not installed (then on asyncio's, said once in the log)."""
    if wanted() == "uvloop":
        try:
            import uvloop
        except ImportError:
            log.info("uvloop is not installed: running on asyncio's event loop")
        else:
            return uvloop.run(main)
    return asyncio.run(main)
