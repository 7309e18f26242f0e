"""The gateway's journal flush, timed alone: ``Store.journal_append_many`` for ``--requests``
running requests against a real local Redis, as the ``JournalWriter`` sends it at each flush.

Prints the CPU (this process's, so the gateway's share: packing, the round trip, the reply) and
the wall time per flush, the median of ``--repeats`` runs of ``--flushes`` flushes each, so that
two builds can be compared in one sitting (``git stash`` / checkout between two runs)::

    python scripts/journal_micro.py --requests 128
"""

from __future__ import annotations

import argparse
import asyncio
import random
import statistics
import time

from stagemesh.deploy.redis_server import start_local_redis
from stagemesh.mesh.store import Store


async def _runs(url: str, requests: int, flushes: int, repeats: int, deployment: str = "journal-micro"
                ) -> tuple[list[tuple[float, float]], dict[str, int]]:
    """(CPU s, wall s) per flush for each run, and the tokens appended to each request."""
    rng = random.Random(0)
    ids = [f"{rng.getrandbits(128):032x}" for _ in range(requests)]  # as the frontends make them (uuid4 hex)
    async with await Store.connect(url, deployment) as store:
        await store.journal_open_many({rid: ([1, 2, 3], {"max_new_tokens": 128}, 0) for rid in ids})
        # one or two tokens per request and flush: 128 streams at ~3,000-10,000 tokens/s, a flush every 50 ms
        # (the writer's interval when these figures were first taken; at 100 ms a flush carries twice that)
        batches = [{rid: [rng.randrange(32_000) for _ in range(rng.choice((1, 1, 2)))] for rid in ids}
                   for _ in range(flushes)]
        sent = batches[:10] + batches * repeats
        for batch in batches[:10]:  # warm up: the connection, the script cache
            await store.journal_append_many(batch)
        runs = []
        for _ in range(repeats):
            cpu, wall = time.process_time(), time.perf_counter()
            for batch in batches:
                await store.journal_append_many(batch)
            runs.append(((time.process_time() - cpu) / flushes, (time.perf_counter() - wall) / flushes))
        return runs, {rid: sum(len(batch[rid]) for batch in sent) for rid in ids}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=128, help="running requests, each appended to at every flush")
    parser.add_argument("--flushes", type=int, default=200, help="flushes per run")
    parser.add_argument("--repeats", type=int, default=5, help="runs; the median is printed")
    args = parser.parse_args()
    redis = start_local_redis()
    try:
        runs, _ = asyncio.run(_runs(redis.url, args.requests, args.flushes, args.repeats))
    finally:
        redis.stop()
    cpu, wall = statistics.median(c for c, _ in runs), statistics.median(w for _, w in runs)
    print(f"journal flush of {args.requests} requests: {1e6 * cpu:.0f} µs CPU ({1e6 * cpu / args.requests:.2f} µs "
          f"a request), {1e3 * wall:.2f} ms wall")


if __name__ == "__main__":
    main()
