"""The one thread that does a process's torch work when no worker gives it one of its own.

NOTE: torch's CPU kernels run their parallel regions on OpenMP (libgomp). Every thread that
enters a parallel region gets an OpenMP team of its own, and once a process holds more libgomp
threads than it may use cores, libgomp stops spinning between parallel regions: its threads
sleep on a futex, and every op pays for waking them. On the 2-core reference load of
BENCHMARKS.md, the same 100 steps of one stage took 2.75–2.86 s when the model was loaded and
stepped on one thread, and 2.97–3.67 s when it was loaded on one thread and stepped on another.
So a process loads, warms up, steps and calibrates on one thread: the stage and expert workers
on their step threads, and everything else (the in-process engine, the benchmark's roofline
calibration and transformers run, the profiling scripts) on this one, through ``call``/``run``.
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from functools import partial
from typing import TypeVar

T = TypeVar("T")

_lock = threading.Lock()
_executor: ThreadPoolExecutor | None = None
_ident: int | None = None


def _started() -> None:
    global _ident
    _ident = threading.get_ident()


def executor() -> ThreadPoolExecutor:
    """The process's torch thread (a single-worker executor: work runs in submission order)."""
    global _executor
    with _lock:
        if _executor is None:
            _executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="torch", initializer=_started)
        return _executor


def on_torch_thread() -> bool:
    return _ident is not None and threading.get_ident() == _ident


def call(fn: Callable[..., T], *args, **kwargs) -> T:
    """``fn(*args, **kwargs)`` on the torch thread, blocking until it returns (inline when
    already on it, so torch work may call torch work)."""
    if on_torch_thread():
        return fn(*args, **kwargs)
    return executor().submit(fn, *args, **kwargs).result()


async def run(fn: Callable[..., T], *args, **kwargs) -> T:
    """``fn(*args, **kwargs)`` on the torch thread, without blocking the event loop (inline when
    the loop itself runs on the torch thread: handing it to the busy thread would never return)."""
    if on_torch_thread():
        return fn(*args, **kwargs)
    return await asyncio.get_running_loop().run_in_executor(executor(), partial(fn, *args, **kwargs))
