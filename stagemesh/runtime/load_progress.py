"""A worker's weight-loading progress, as log lines that `stagemesh up` follows.

NOTE: the worker's log is the channel. A worker loads before it registers in Redis, its log file
is already there (the launcher opened it), reading new bytes of a file costs the launcher nothing
per poll, and a worker restarted later simply logs its progress again. The line is written and
parsed here only, so the two sides cannot drift apart.

Torch-free.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Callable
from dataclasses import dataclass

Progress = Callable[[int, int], None]
"""``progress(done, total)``: called by a loader after each unit it loaded."""

_LINE = re.compile(r"load progress (\d+)/(\d+) (\w+)")


@dataclass(frozen=True)
class LoadProgress:
    """How far one worker's loading is."""

    done: int
    total: int
    unit: str
    """What is counted: ``layers`` (a stage) or ``layers`` of experts (an expert worker)."""


def line(done: int, total: int, unit: str) -> str:
    """The log line for ``done`` of ``total`` ``unit`` loaded."""
    return f"load progress {done}/{total} {unit}"


def reporter(log: logging.Logger, unit: str) -> Progress:
    """A ``Progress`` that logs each step at INFO (the workers' default level)."""
    return lambda done, total: log.info(line(done, total, unit))


def latest(text: str) -> LoadProgress | None:
    """The last progress line in ``text`` (a chunk of a worker's log), or None."""
    found = None
    for found in _LINE.finditer(text):
        pass
    return None if found is None else LoadProgress(int(found[1]), int(found[2]), found[3])
