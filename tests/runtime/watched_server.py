"""A serving process for tests/runtime/test_watchdog.py: ``stagemesh.runtime.server.run`` with a
real gRPC server on PORT and ``--liveness-s`` LIVENESS; with STALL_AFTER, a call on its event loop
that never returns, that long after it serves.

    python -m tests.runtime.watched_server PORT LIVENESS [STALL_AFTER]
"""

from __future__ import annotations

import asyncio
import sys
import time

from stagemesh.runtime.server import Role, WorkerServer, run


def stuck_forever() -> None:
    """What a deadlock looks like from the loop: a call that does not return."""
    time.sleep(3600)


class Watched(Role):
    def __init__(self, port: int, stall_after_s: float | None):
        self.port, self.stall_after_s = port, stall_after_s

    async def load(self, server: WorkerServer) -> None:
        await server.start(f"127.0.0.1:{self.port}", lambda grpc_server: None)

    async def serve(self, server: WorkerServer) -> None:
        await super().serve(server)
        print("serving", flush=True)
        if self.stall_after_s is not None:
            asyncio.get_running_loop().call_later(self.stall_after_s, stuck_forever)


def main(argv: list[str]) -> int:
    port, liveness_s = int(argv[0]), float(argv[1])
    stall_after_s = float(argv[2]) if len(argv) > 2 else None
    return asyncio.run(run(WorkerServer("test.Watched", 1.0, liveness_s=liveness_s), Watched(port, stall_after_s)))


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
