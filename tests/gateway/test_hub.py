"""The gateway's hub on fake chains: one message per step per frontend, cancels, a frontend that
leaves, and failover seen from a frontend (no token lost or repeated)."""

from __future__ import annotations

import asyncio
from array import array

from gateway.hub import FrontendHub
from gateway.metrics import GatewayMetrics
from stagemesh.errors import Cancelled, InvalidArgument
from stagemesh.serving.params import SamplingParams
from stagemesh.wire.codec.scheduling import Submission
from tests.gateway.test_failover import gateway
from tests.serving.test_engine import expected


def sub(handle: int, prompt: tuple[int, ...], n: int, rid: str = "") -> Submission:
    return Submission(handle, rid or f"req-{handle}", array("q", prompt), SamplingParams(max_new_tokens=n, ignore_eos=True))


async def drain(link, until) -> list:
    """What the link's writer would send: ``take()`` at each wake-up, until ``until(batches)``."""
    batches = []
    while not until(batches):
        await asyncio.wait_for(link.ready.wait(), 5)
        batches.append(link.take())
    return batches


def tokens_by_handle(batches) -> dict[int, list[int]]:
    out: dict[int, list[int]] = {}
    for b in batches:
        for h, t in zip(b.handles, b.token_ids):
            out.setdefault(h, []).append(t)
    return out


def finished(batches) -> dict:
    return {h: r for b in batches for h, r in b.finished.items()} | {h: e for b in batches for h, e in b.errors.items()}


def test_each_step_reaches_a_frontend_as_one_message_with_every_request_of_it():
    prompts = {h: (h + 2, 5) for h in range(1, 9)}

    async def main():
        async with gateway(n=1) as (router, _, journal, _):
            hub = FrontendHub(router, journal, GatewayMetrics())
            a, b = hub.attach("a"), hub.attach("b")
            for h, p in prompts.items():
                hub.submit(a if h % 2 else b, sub(h, p, 6))
            done = lambda n: lambda batches: len(finished(batches)) == n  # noqa: E731
            return await asyncio.gather(drain(a, done(4)), drain(b, done(4))), hub

    (batches_a, batches_b), hub = asyncio.run(main())
    for batches, handles in ((batches_a, [1, 3, 5, 7]), (batches_b, [2, 4, 6, 8])):
        got = tokens_by_handle(batches)
        assert sorted(got) == handles
        assert all(got[h] == expected(prompts[h], 6) for h in handles)
        assert finished(batches) == {h: "length" for h in handles}
        steps = len(batches)
        assert steps <= 8, steps  # ~one message per step for 4 requests x 6 tokens, not one per token
    assert not any(link.followers for link in hub.links)


def test_a_cancel_and_a_frontend_that_leaves_free_their_requests():
    async def main():
        async with gateway(n=1) as (router, _, journal, store):
            hub = FrontendHub(router, journal, GatewayMetrics())
            a, b = hub.attach("a"), hub.attach("b")
            hub.submit(a, sub(1, (4, 4), 500))
            hub.submit(b, sub(2, (5, 5), 500))
            await drain(a, lambda bs: len(tokens_by_handle(bs).get(1, [])) >= 3)
            hub.cancel(a, 1)
            got_a = await drain(a, lambda bs: 1 in finished(bs))
            hub.detach(b)
            await asyncio.sleep(0.1)
            return got_a, router, store

    got_a, router, store = asyncio.run(main())
    ends = finished(got_a)
    assert isinstance(ends[1], Cancelled)
    assert router.chains[0].engine.scheduler.num_running == 0 and store.entries == {}


def test_a_running_request_id_is_refused_to_the_frontend_that_reused_it():
    async def main():
        async with gateway(n=1) as (router, _, journal, _):
            hub = FrontendHub(router, journal, GatewayMetrics())
            a = hub.attach("a")
            hub.submit(a, sub(1, (4, 4), 50, rid="same"))
            hub.submit(a, sub(2, (4, 4), 5, rid="same"))
            batches = await drain(a, lambda bs: 2 in finished(bs))
            hub.cancel(a, 1)
            return finished(batches)[2]

    err = asyncio.run(main())
    assert isinstance(err, InvalidArgument) and "already running" in err.message


def test_a_chain_failing_mid_request_costs_a_frontend_no_token():
    prompts = {h: (h + 3, 5, 7) for h in range(1, 7)}

    async def main():
        async with gateway(n=2) as (router, remotes, journal, _):
            hub = FrontendHub(router, journal, GatewayMetrics())
            a = hub.attach("a")
            for h, p in prompts.items():
                hub.submit(a, sub(h, p, 12))

            def kill_when_three(batches):
                if not remotes[0].down and any(len(t) >= 3 for t in tokens_by_handle(batches).values()):
                    remotes[0].down = True
                return len(finished(batches)) == len(prompts)

            return await drain(a, kill_when_three), router

    batches, router = asyncio.run(main())
    got = tokens_by_handle(batches)
    assert {h: got[h] for h in prompts} == {h: expected(p, 12) for h, p in prompts.items()}
    assert finished(batches) == {h: "length" for h in prompts}
    assert not router.chains[0].healthy
