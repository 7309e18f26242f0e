"""When `stagemesh up` starts a dead process again: soon after it had served, with a growing
backoff after deaths before it could serve, and never again after several of those in a row.

NOTE: pure bookkeeping (the clock is passed in), so the policy is tested without processes.
A death *counts* when the process had not served since its last start: each counted death
doubles the wait before the restart (from ``first_backoff_s`` up to ``max_backoff_s``), and
the ``max_quick_deaths``-th in a row gives it up: a process that cannot start (a broken
checkpoint, a port taken for good) would otherwise loop forever. A death after it served is
restarted after ``served_backoff_s`` (none by default) and forgets the count: a worker killed
eight times in a row, each time after it came back, is restarted eight times at once (issue 19:
on dp=1 the requests wait for the chain, and a growing backoff outlasted their wait). A process
that served cannot loop fast: it must load and serve again before its next death is this kind.

"Served" is known two ways. A ``probed`` process (a stage or expert worker, the gateway: each
has an address of its own) served once the launcher's health probe saw it SERVING
(``became_ready``). A process without an address of its own (the frontends share one port, so
a probe cannot tell which answered) served when it lived at least ``quick_s`` seconds.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class RestartPolicy:
    """How `stagemesh up` restarts a process that exited."""

    served_backoff_s: float = 0.0
    """Wait before restarting a process that had served: its clients wait on it (a gateway's
    streams, a dp=1 chain's requests), so at once."""
    first_backoff_s: float = 0.5
    """The wait before restarting a process that died before it served is this × 2 at its first
    such death in a row, × 4 at the second, and so on (up to ``max_backoff_s``)."""
    max_backoff_s: float = 8.0
    """The longest wait between two restarts."""
    quick_s: float = 30.0
    """A process that is not probed and dies within this long of its start had not served."""
    max_quick_deaths: int = 5
    """Deaths in a row before serving after which the process is given up on (left dead)."""


@dataclass
class Lifeline:
    """One process's restart record: when it started, whether it served since, how many times
    in a row it died before serving."""

    policy: RestartPolicy
    started_at: float
    probed: bool = False
    """Served means seen SERVING by a health probe (``became_ready``), not lived ``quick_s``."""
    ready_at: float | None = None
    """When a probe first saw it SERVING since its last start (probed processes only)."""
    quick_deaths: int = 0
    """Deaths in a row before it served."""
    restart_at: float | None = None
    """Set while the process is dead and waits for its restart."""
    restarts: int = 0

    @property
    def awaits_ready(self) -> bool:
        """Whether a probe should look at it: probed, running, not yet seen SERVING."""
        return self.probed and self.ready_at is None and self.restart_at is None

    def became_ready(self, now: float) -> None:
        """A probe saw it SERVING at ``now``."""
        if self.ready_at is None:
            self.ready_at = now

    def served(self, now: float) -> bool:
        """Whether it served since its last start (see the module NOTE)."""
        if self.probed:
            return self.ready_at is not None
        return now - self.started_at >= self.policy.quick_s

    def died(self, now: float) -> float | None:
        """Record its death at ``now``; returns when to restart it, or None to give it up."""
        self.quick_deaths = 0 if self.served(now) else self.quick_deaths + 1
        if self.quick_deaths >= self.policy.max_quick_deaths:
            self.restart_at = None
            return None
        if self.quick_deaths == 0:
            wait = self.policy.served_backoff_s
        else:
            wait = min(self.policy.max_backoff_s, self.policy.first_backoff_s * 2**self.quick_deaths)
        self.restart_at = now + wait
        return self.restart_at

    def restarted(self, now: float) -> None:
        self.started_at, self.ready_at, self.restart_at = now, None, None
        self.restarts += 1
