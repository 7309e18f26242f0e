"""scripts/journal_micro.py against the suite's real Redis: what it times is the journal's real append."""

import asyncio
import uuid

import journal_micro

from stagemesh.mesh.store import Store


def test_every_timed_flush_lands_in_its_requests_journal(redis_url):
    deployment = f"test-{uuid.uuid4().hex[:8]}"
    runs, appended = asyncio.run(journal_micro._runs(redis_url, requests=3, flushes=4, repeats=2,
                                                     deployment=deployment))
    assert len(runs) == 2 and all(cpu >= 0 and wall > 0 for cpu, wall in runs)

    async def journaled() -> dict[str, int]:
        async with await Store.connect(redis_url, deployment) as store:
            return {rid: len((await store.journal_get(rid)).token_ids) for rid in appended}

    assert len(appended) == 3 and asyncio.run(journaled()) == appended
    assert all(n >= 4 + 2 * 4 for n in appended.values())  # 4 warm-up and 2 × 4 timed flushes, 1-2 tokens each
