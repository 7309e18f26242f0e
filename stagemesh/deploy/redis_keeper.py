"""The local redis-server that `stagemesh up` started (no ``--redis-url``), kept alive: started
again when it dies or freezes, with the topology written back when it comes back empty.

NOTE: a Redis that had served is started again at once, whatever ``served_backoff_s`` says:
every process is waiting for it. Failed starts back off and give up like any child's
(``stagemesh.deploy.supervise``). It restarts on the same port and data dir, so it reloads its
append-only file. A frozen one (SIGSTOP) keeps its port: it is asked for ``INFO`` every 0.5 s on
a thread of its own (``stagemesh.deploy.liveness.Pinger``) and SIGKILLed once it answered
nothing for ``liveness_s`` since it last (re)started.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable

from stagemesh.deploy.liveness import Pinger
from stagemesh.deploy.redis_server import LocalRedis, log_tail, server_pid
from stagemesh.deploy.supervise import Lifeline, RestartPolicy

log = logging.getLogger(__name__)


class RedisKeeper:
    """One local Redis, its restart record and the watch of its answers."""

    def __init__(self, redis: LocalRedis, policy: RestartPolicy, liveness_s: float, on_back: Callable[[], None]):
        self.redis = redis
        now = time.monotonic()
        self.life = Lifeline(policy, started_at=now, probed=True)
        self.life.became_ready(now)  # it answered PING before ``start_local_redis`` returned
        self.liveness_s = liveness_s
        """Kill it once it answered nothing this long (0: never)."""
        self._on_back = on_back
        """Called once it serves again after a restart (the launcher writes back a lost topology)."""
        self._ping = Pinger(lambda: server_pid(redis.port, redis.password) is not None) if liveness_s else None

    def keep(self, now: float) -> None:
        """Restart it once it died, or once it froze (killed first); RuntimeError when it keeps failing to start."""
        life = self.life
        if self.redis.running() and not self._killed_silent(now):
            return
        if life.restart_at is None:
            if life.died(now) is None:
                raise RuntimeError(
                    f"redis-server keeps failing to start; its log ends with:\n{log_tail(self.redis.log_path)}"
                )
            if life.quick_deaths == 0:
                life.restart_at = now
            log.warning("redis-server (port %d) exited with code %s; restarting it",
                        self.redis.port, self.redis.returncode)
        if now < life.restart_at:
            return
        life.restarted(now)
        try:
            self.redis.restart()
        except RuntimeError as err:
            log.error("could not restart redis-server: %s", err)  # not ready: this death counts
            return
        life.became_ready(now)
        self._on_back()

    def _killed_silent(self, now: float) -> bool:
        """SIGKILL it when it answered nothing for ``liveness_s`` since it last (re)started; whether it did."""
        if self._ping is None:
            return False
        silent_s = now - max(self._ping.last_answer, self.life.ready_at or now)
        if silent_s < self.liveness_s:
            return False
        log.warning("redis-server (pid %d) has answered nothing for %.1f s: killing it to start it again "
                    "(--liveness-s %g)", self.redis.pid, silent_s, self.liveness_s)
        self.redis.kill()
        return True

    def stop(self) -> None:
        if self._ping is not None:
            self._ping.close()
        self.redis.stop()

