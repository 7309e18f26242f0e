"""When `stagemesh up` starts a dead worker again: at once after a long life, with a growing
backoff after quick deaths, and never again after several quick deaths in a row.

NOTE: pure bookkeeping (the clock is passed in), so the policy is tested without processes.
A worker that lived at least ``quick_s`` seconds is restarted after ``first_backoff_s``; each
death within ``quick_s`` of its start doubles the wait (up to ``max_backoff_s``), and the
``max_quick_deaths``-th such death in a row gives it up: a worker that cannot start (a
broken checkpoint, a port taken for good) would otherwise loop forever.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class RestartPolicy:
    """How `stagemesh up` restarts a worker process that exited."""

    first_backoff_s: float = 0.5
    """Wait before restarting a worker that had been running for a while."""
    max_backoff_s: float = 8.0
    """The longest wait between two restarts."""
    quick_s: float = 30.0
    """A worker that dies within this long of its start died *quickly*."""
    max_quick_deaths: int = 5
    """Quick deaths in a row after which the worker is given up on (left dead)."""


@dataclass
class Lifeline:
    """One worker's restart record: when it started, how often it died quickly in a row."""

    policy: RestartPolicy
    started_at: float
    quick_deaths: int = 0
    restart_at: float | None = None
    """Set while the worker is dead and waits for its restart."""
    restarts: int = 0

    def died(self, now: float) -> float | None:
        """Record its death at ``now``; returns when to restart it, or None to give it up."""
        quick = now - self.started_at < self.policy.quick_s
        self.quick_deaths = self.quick_deaths + 1 if quick else 0
        if self.quick_deaths >= self.policy.max_quick_deaths:
            self.restart_at = None
            return None
        wait = min(self.policy.max_backoff_s, self.policy.first_backoff_s * 2**self.quick_deaths)
        self.restart_at = now + wait
        return self.restart_at

    def restarted(self, now: float) -> None:
        self.started_at, self.restart_at = now, None
        self.restarts += 1
