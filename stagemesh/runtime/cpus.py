"""CPU binding of the compute processes: each TP rank and expert worker on cores of its own.

NOTE: why. On CPU every rank runs its torch ops on its own intra-op threads. Left to the OS,
the ranks of a mesh migrate between cores and meet on one core now and then; each such
meeting stalls the rank's step, and so the whole pipeline behind it. `stagemesh up` gives
every compute process a disjoint set of cores instead (`--cpus`; vLLM's CPU backend binds its
threads for the same reason). On the 2-core reference machine a running pp=2 mesh served
1–7% more tokens/s with its two stages bound than unbound, in seven pairs; whole bench runs
vary more than that (BENCHMARKS.md, "CPU binding"). The gateway and Redis are not bound:
they take what the ranks leave.

A stage worker gets the cores of all its TP ranks; rank ``r`` binds itself to slice ``r``.
When there are more processes than cores, nothing is bound (they share, one thread each).
"""

from __future__ import annotations

import argparse
import logging
import os
import sys

log = logging.getLogger(__name__)


def available() -> list[int]:
    """The cores this process may run on, in order."""
    try:
        return sorted(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return list(range(os.cpu_count() or 1))


def parse(text: str) -> list[int]:
    """``"0,2-3"`` → ``[0, 2, 3]`` (the ``taskset -c`` list syntax); ValueError naming what is wrong."""
    cpus: list[int] = []
    for part in text.split(","):
        lo, sep, hi = part.strip().partition("-")
        try:
            first, last = int(lo), int(hi) if sep else int(lo)
        except ValueError:
            raise ValueError(f"--cpus {text!r}: {part!r} is not a core number or a range like 2-5") from None
        if first < 0 or last < first:
            raise ValueError(f"--cpus {text!r}: {part!r} is not a core number or a range like 2-5")
        cpus.extend(range(first, last + 1))
    if len(set(cpus)) != len(cpus):
        raise ValueError(f"--cpus {text!r} names a core twice")
    return cpus


def arg(text: str) -> list[int]:
    """The ``argparse`` type of ``--cpus``: ``parse``, with its message on a bad list."""
    try:
        return parse(text)
    except ValueError as err:
        raise argparse.ArgumentTypeError(str(err)) from None


def format_list(cpus: list[int]) -> str:
    return ",".join(map(str, cpus))


def share(cpus: list[int], ranks: list[int]) -> tuple[int, list[list[int]] | None]:
    """Threads per rank, and for each process (``ranks[i]`` ranks each) its disjoint slice of
    ``cpus`` — or None when there are more ranks than cores (then nothing is bound)."""
    total = sum(ranks)
    if total < 1:
        raise ValueError("no compute processes to place")
    threads = max(1, len(cpus) // total)
    if total > len(cpus):
        return threads, None
    sets, at = [], 0
    for n in ranks:
        sets.append(cpus[at : at + n * threads])
        at += n * threads
    return threads, sets


def micro_batches(cores: int, ranks: int, stages: int, tp: int, chains: int) -> int:
    """The micro-batches each chain should keep in flight when ``ranks`` compute processes (every
    chain's TP ranks and expert workers) run on ``cores`` CPU cores: one per stage while every rank
    has cores of its own, else only as many stages as can compute at once.

    NOTE: a chain keeps one micro-batch per stage so that every stage computes at once, each on its
    own device. Four stages sharing two cores cannot: the extra micro-batches only split each step
    into more, smaller messages, each costing every process on the path its gRPC and Python work.
    ``tiny`` at pp=4 on the 2-core reference machine, 128 streams: 2,395-2,504 tok/s with four
    micro-batches, 3,564-3,901 with two, 3,518-3,826 with one (three interleaved runs each;
    BENCHMARKS.md, "Session 17: micro-batches on shared cores")."""
    if ranks <= cores:
        return stages
    return max(1, min(stages, cores // (tp * chains)))


def rank_slice(cpus: list[int], rank: int, threads: int) -> list[int]:
    """Rank ``rank``'s cores out of its stage's ``cpus``: slice ``rank`` of ``threads`` cores, or
    all of ``cpus`` when it holds fewer than that (a stage started by hand with a short list)."""
    part = cpus[rank * threads : (rank + 1) * threads]
    return part if len(part) == threads else cpus


def bind_rank(cpus: list[int] | None, rank: int, threads: int | None) -> int | None:
    """Bind TP rank ``rank`` of a process given ``cpus`` (``--cpus``; None: leave it unbound) to
    its cores; returns the intra-op threads it should run: ``threads``, else its core count."""
    if cpus is None:
        return threads
    mine = rank_slice(cpus, rank, threads or len(cpus))
    bind(mine)
    return threads or len(mine)


def take(cpus: list[int] | None, rank: int, threads: int | None) -> None:
    """A worker's first act: ``bind_rank``, then that many torch intra-op threads;
    ``StartupError`` when the cores cannot be had."""
    import torch  # here, not at the top: the launcher imports this module and never torch

    from stagemesh.runtime.startup import StartupError

    try:
        threads = bind_rank(cpus, rank, threads)
    except ValueError as err:
        raise StartupError(str(err)) from None
    if threads:
        torch.set_num_threads(threads)


OMP_WAIT_POLICY = "passive"
"""What a compute process's OpenMP threads do between parallel regions: sleep (see ``idle_team_sleeps``)."""


def idle_team_sleeps() -> bool:
    """Make this process's OpenMP team sleep between parallel regions instead of spinning;
    call it first thing in a worker's ``__main__``, before torch loads libgomp, which reads the
    policy once. An ``OMP_WAIT_POLICY`` already in the environment wins. False (and a warning)
    when torch is already loaded, so the policy comes too late to take.

    NOTE: why. libgomp's default lets a team's threads spin for a few milliseconds after each
    parallel region. In a stage worker that spin runs while the step thread does the step's
    serial Python work and while it waits for the next request over gRPC, and on cores shared
    with the gateway and the clients it takes CPU from them; when a spinning thread is
    preempted its teammate spins at the barrier as well. On the tiny load of BENCHMARKS.md
    ("Stage worker CPU per step", 2 cores) the stage worker used 24–32 ms of CPU per step
    (1.0–1.7x the in-process engine's, measured back to back), and 36–106 ms when other
    processes ran beside it; with the team asleep, 9–16 ms (0.49–0.78x) and more tokens/s in
    7 of 7 pairs. On the 40M reference load, where every parallel region now pays a wake-up,
    throughput stayed within noise (687 -> 685 tok/s, mean of five pairs). The rank processes
    a stage starts inherit the policy with the environment.
    """
    if "torch" in sys.modules:
        log.warning("OMP_WAIT_POLICY set after torch was loaded: the OpenMP team keeps libgomp's default")
        return False
    os.environ.setdefault("OMP_WAIT_POLICY", OMP_WAIT_POLICY)
    return True


def bind(cpus: list[int]) -> None:
    """Bind this process — its threads so far and those it starts later — to ``cpus``; OSError →
    ValueError naming the cores, e.g. when one is not in this container's cpuset."""
    for tid in _threads():
        try:
            os.sched_setaffinity(tid, cpus)
        except ProcessLookupError:
            continue  # the thread ended meanwhile
        except OSError as err:
            raise ValueError(
                f"cannot bind to cores {format_list(cpus)} ({err}); this host allows {format_list(available())}"
            ) from None
    log.info("bound to cores %s", format_list(cpus))


def _threads() -> list[int]:
    """This process's thread ids (``sched_setaffinity`` binds one thread; new threads inherit it)."""
    try:
        return [int(tid) for tid in os.listdir("/proc/self/task")]
    except OSError:
        return [0]
