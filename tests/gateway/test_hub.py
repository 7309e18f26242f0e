"""The gateway's hub on fake chains: one message per step per frontend, cancels, a frontend that
leaves, and failover seen from a frontend (no token lost or repeated)."""

from __future__ import annotations

import asyncio
import time
from array import array

from gateway.hub import FrontendHub
from gateway.journal import params_doc
from gateway.metrics import GatewayMetrics
from stagemesh.errors import Cancelled, InvalidArgument
from stagemesh.mesh.store import JournalEntry
from stagemesh.serving.params import SamplingParams
from stagemesh.wire.codec.scheduling import Submission
from tests.gateway.test_failover import gateway
from tests.serving.test_engine import expected, logprobs_of
from tests.waiting import eventually


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
    # the status names each with the requests it took, none open any more
    assert hub.frontends() == [{"name": "a", "pid": None, "requests": 0, "taken": 4, "spare": False},
                               {"name": "b", "pid": None, "requests": 0, "taken": 4, "spare": False}]


def test_a_cancel_frees_its_request_and_an_orphan_nobody_takes_up_is_cancelled_after_the_window():
    async def main():
        async with gateway(n=1) as (router, _, journal, store):
            hub = FrontendHub(router, journal, GatewayMetrics(), resume_window_s=5.0)
            a, b = hub.attach("a"), hub.attach("b")
            hub.submit(a, sub(1, (4, 4), 120))  # 2 + 120 tokens within the context of 128
            hub.submit(b, sub(2, (5, 5), 120))
            await drain(a, lambda bs: len(tokens_by_handle(bs).get(1, [])) >= 3)
            hub.cancel(a, 1)
            got_a = await drain(a, lambda bs: 1 in finished(bs))
            hub.detach(b)  # the frontend died: its request runs on, waiting to be resumed
            await asyncio.sleep(0.1)
            running_after_detach = router.chains[0].engine.scheduler.num_running
            hub.sweep(time.monotonic() + 1.0)  # within the window: left alone
            hub.sweep(time.monotonic() + 6.0)  # past it: cancelled
            chain = router.chains[0]
            await eventually(lambda: chain.engine.scheduler.num_running == 0 and not store.entries and not hub.running, 5.0)
            return got_a, running_after_detach, router, store, hub

    got_a, running_after_detach, router, store, hub = asyncio.run(main())
    assert isinstance(finished(got_a)[1], Cancelled)
    assert running_after_detach == 1
    assert router.chains[0].engine.scheduler.num_running == 0 and store.entries == {} and not hub.running
    assert not hub.recent  # outcomes older than the window are forgotten by the same sweep


def resume(handle: int, prompt: tuple[int, ...], n: int, rid: str, known: list[int] = ()) -> Submission:
    return Submission(handle, rid, array("q", prompt), SamplingParams(max_new_tokens=n, ignore_eos=True, seed=3),
                      resume=True, known_token_ids=array("q", known))


def test_a_request_whose_frontend_died_is_taken_up_on_another_with_every_token_once():
    async def main():
        async with gateway(n=1) as (router, _, journal, _):
            hub = FrontendHub(router, journal, GatewayMetrics())
            a, b = hub.attach("a"), hub.attach("b")
            hub.submit(a, sub(1, (6, 2), 30, rid="r"))
            seen_by_a = tokens_by_handle(await drain(a, lambda bs: len(tokens_by_handle(bs).get(1, [])) >= 4))[1]
            hub.detach(a)
            await asyncio.sleep(0.05)  # it runs on meanwhile
            hub.submit(b, resume(7, (6, 2), 30, "r"))
            return seen_by_a, await drain(b, lambda bs: 7 in finished(bs))

    seen_by_a, got_b = asyncio.run(main())
    assert tokens_by_handle(got_b)[7] == expected((6, 2), 30)  # everything from index 0, each once
    assert tokens_by_handle(got_b)[7][: len(seen_by_a)] == seen_by_a
    assert finished(got_b) == {7: "length"}


def test_a_resume_gets_a_finished_outcome_starts_an_unknown_request_from_its_known_tokens_and_checks_the_prompt():
    async def main():
        async with gateway(n=1) as (router, _, journal, _):
            hub = FrontendHub(router, journal, GatewayMetrics())
            a = hub.attach("a")
            hub.submit(a, sub(1, (3, 9), 5, rid="done"))
            await drain(a, lambda bs: 1 in finished(bs))
            hub.submit(a, resume(2, (3, 9), 5, "done"))  # its end was lost on the way to the client
            late = await drain(a, lambda bs: 2 in finished(bs))
            known = expected((8, 1), 12)[:5]  # the gateway restarted and its journal lacked it
            hub.submit(a, resume(3, (8, 1), 12, "unknown", known))
            restarted = await drain(a, lambda bs: 3 in finished(bs))
            hub.submit(a, resume(4, (1, 1), 5, "done"))
            other = await drain(a, lambda bs: 4 in finished(bs))
            return late, restarted, other

    late, restarted, other = asyncio.run(main())
    assert tokens_by_handle(late)[2] == expected((3, 9), 5) and finished(late) == {2: "length"}
    assert tokens_by_handle(restarted)[3] == expected((8, 1), 12) and finished(restarted) == {3: "length"}
    err = finished(other)[4]
    assert isinstance(err, InvalidArgument) and "another prompt" in err.message


def test_requests_a_previous_gateway_journaled_are_taken_over_and_resumed():
    async def main():
        async with gateway(n=1) as (router, _, journal, store):
            known = expected((2, 7), 20)[:6]
            entry = JournalEntry("old", (2, 7), params_doc(SamplingParams(max_new_tokens=20, ignore_eos=True)), 0,
                                 tuple(known))
            hub = FrontendHub(router, journal, GatewayMetrics())
            assert hub.adopt([entry]) == 1
            await asyncio.sleep(0.05)
            a = hub.attach("a")
            hub.submit(a, resume(1, (2, 7), 20, "old", known[:4]))  # the frontend had fewer than the journal
            return await drain(a, lambda bs: 1 in finished(bs))

    got = asyncio.run(main())
    assert tokens_by_handle(got)[1] == expected((2, 7), 20) and finished(got) == {1: "length"}


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


def logprobs_by_handle(batches) -> dict[int, list]:
    out: dict[int, list] = {}
    for b in batches:
        for i, h in enumerate(b.handles):
            out.setdefault(h, []).append(b.logprobs.get(i))
    return out


def test_logprobs_reach_the_frontend_and_a_resume_sends_them_again_those_before_a_restart_unknown():
    asked = SamplingParams(max_new_tokens=12, ignore_eos=True, seed=3, logprobs=True)

    async def main():
        async with gateway(n=1) as (router, _, journal, _):
            hub = FrontendHub(router, journal, GatewayMetrics())
            a, b = hub.attach("a"), hub.attach("b")
            hub.submit(a, Submission(1, "r", array("q", (6, 2)), asked))
            first = await drain(a, lambda bs: len(tokens_by_handle(bs).get(1, [])) >= 3)
            hub.detach(a)
            hub.submit(b, Submission(2, "r", array("q", (6, 2)), asked, resume=True))
            again = await drain(b, lambda bs: 2 in finished(bs))
            known = expected((2, 7), 12)[:5]  # a previous gateway journaled these: token ids only
            hub.adopt([JournalEntry("old", (2, 7), params_doc(asked), 0, tuple(known))])
            hub.submit(b, Submission(3, "old", array("q", (2, 7)), asked, resume=True,
                                     known_token_ids=array("q", known)))
            adopted = await drain(b, lambda bs: 3 in finished(bs))
            return first, again, adopted

    first, again, adopted = asyncio.run(main())
    tokens = expected((6, 2), 12)
    seen = logprobs_by_handle(first)[1]
    assert seen == [logprobs_of(t) for t in tokens[:len(seen)]]
    assert tokens_by_handle(again)[2] == tokens
    assert logprobs_by_handle(again)[2] == [logprobs_of(t) for t in tokens]  # every one, from index 0
    old = expected((2, 7), 12)
    assert tokens_by_handle(adopted)[3] == old
    assert logprobs_by_handle(adopted)[3] == [None] * 5 + [logprobs_of(t) for t in old[5:]]
