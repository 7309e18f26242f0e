"""Data parallelism in the gateway, on fake chains: load-aware admission, failover that loses
and repeats no token, no healthy chain, and a chain back in service with a fresh engine."""

from __future__ import annotations

import asyncio
import contextlib

import pytest

from gateway.failover import Follower
from gateway.journal import JournalWriter
from gateway.router import ChainHandle, Router
from stagemesh.errors import Cancelled, StagemeshError, Unavailable
from stagemesh.mesh.store import JournalEntry
from stagemesh.serving.engine import Engine
from stagemesh.serving.types import Request, SamplingParams
from tests.serving.test_engine import SumChain, V, config, expected
from tests.waiting import eventually


class FakeStore:
    """The journal methods of ``Store``, in memory."""

    def __init__(self) -> None:
        self.entries: dict[str, dict] = {}
        self.moves: list[tuple[str, int]] = []

    async def journal_open_many(self, entries):
        for rid, (prompt, params, chain) in entries.items():
            self.entries[rid] = {"prompt": tuple(prompt), "params": params, "chain": chain, "tokens": []}

    async def journal_close_many(self, rids):
        for rid in rids:
            self.entries.pop(rid, None)

    async def journal_append_many(self, tokens):
        for rid, ids in tokens.items():
            self.entries[rid]["tokens"] += ids

    async def journal_move(self, rid, chain):
        self.entries[rid]["chain"] = chain
        self.moves.append((rid, chain))

    async def journal_get(self, rid):
        e = self.entries.get(rid)
        return e and JournalEntry(rid, e["prompt"], e["params"], e["chain"], tuple(e["tokens"]))


class FakeRemote(SumChain):
    """A chain of stages that fails every step while ``down``; keeps its KV across engines."""

    def __init__(self, chain: int, delay: float = 0.002):
        super().__init__(delay, fail_when=lambda plan: Unavailable("stage down") if self.down else None)
        self.chain, self.down = chain, False

    async def close(self, why: str = "") -> None:
        pass


def handle(chain_id: int, remote: FakeRemote) -> ChainHandle:
    def renew():
        return remote, Engine(remote, config(num_slots=2), vocab_size=V, max_model_len=128)

    _, engine = renew()
    engine.start()
    return ChainHandle(chain_id, remote, engine, (f"fake:{chain_id}",), renew)


@contextlib.asynccontextmanager
async def gateway(n: int = 2, wait_s: float = 2.0):
    router = Router(failover_wait_s=wait_s)
    remotes = [FakeRemote(c) for c in range(n)]
    for c, remote in enumerate(remotes):
        router.add(handle(c, remote))
    store = FakeStore()
    journal = JournalWriter(store, interval_s=0.001)
    journal.start()
    try:
        yield router, remotes, journal, store
    finally:
        for h in router.chains:
            await h.engine.stop()
        await journal.stop()


async def collect(router, journal, rid: str, prompt: tuple[int, ...], n: int, on_token=None) -> list:
    """The request's token events through a ``Follower``, as the gateway's hub follows it; its error raised."""
    request = Request(rid, prompt, SamplingParams(max_new_tokens=n, ignore_eos=True, seed=1))
    events, ended = [], asyncio.get_running_loop().create_future()

    def emit(event):
        events.append(event)
        if on_token is not None:
            on_token(event)

    Follower(router, journal, request, emit, ended.set_result).start()
    err: StagemeshError | None = await ended
    if err is not None:
        raise err
    return events


def test_a_burst_of_requests_is_spread_over_both_chains():
    async def main():
        async with gateway() as (router, remotes, journal, _):
            await asyncio.gather(*(collect(router, journal, f"r{i}", (i + 1, 2), 4) for i in range(8)))
            return [h.requests_served for h in router.chains]

    served = asyncio.run(main())
    assert sum(served) == 8 and min(served) >= 3, served


def test_a_chain_failing_mid_generation_moves_its_requests_without_losing_or_repeating_a_token():
    prompts = [(i + 3, 5, 7) for i in range(6)]

    async def main():
        async with gateway() as (router, remotes, journal, store):
            def kill_chain_0(event):
                if event.index == 3 and not remotes[0].down:
                    remotes[0].down = True

            outs = await asyncio.gather(*(collect(router, journal, f"r{i}", p, 12, kill_chain_0) for i, p in enumerate(prompts)))
            return outs, router.chains[0], store

    outs, chain0, store = asyncio.run(main())
    for prompt, events in zip(prompts, outs):
        assert [e.index for e in events] == list(range(12))  # each index once, in order
        assert [e.token_id for e in events] == expected(prompt, 12)  # as if nothing had failed
        assert events[-1].finish_reason == "length"
    assert not chain0.healthy and chain0.outages == 1 and "stage down" in chain0.why_down
    assert store.moves and all(chain == 1 for _, chain in store.moves)
    assert store.entries == {}  # every entry closed


def test_with_no_healthy_chain_new_requests_fail_at_once_and_running_ones_after_the_wait():
    async def main():
        async with gateway(n=1, wait_s=0.3) as (router, remotes, journal, _):
            def kill(event):
                remotes[0].down = True

            loop = asyncio.get_running_loop()
            t0 = loop.time()
            with pytest.raises(Unavailable, match="no healthy chain: chain 0: .*stage down.*waited 0.3 s"):
                await collect(router, journal, "running", (1, 2), 50, kill)
            waited = loop.time() - t0
            t0 = loop.time()
            with pytest.raises(Unavailable, match="no healthy chain: chain 0: "):
                await collect(router, journal, "new", (1, 2), 5)
            return waited, loop.time() - t0

    waited, refused = asyncio.run(main())
    # a new request does not wait for a chain (0.3 s here): refused well inside it, even on a loaded machine
    assert 0.3 <= waited < 2 and refused < 0.2


def test_a_chain_back_in_service_frees_its_old_sequences_and_runs_a_fresh_engine():
    async def main():
        async with gateway(n=1, wait_s=5.0) as (router, remotes, journal, _):
            chain = router.chains[0]

            async def revive_soon():
                await asyncio.sleep(0.2)
                remotes[0].down = False
                assert await router.revive(chain)

            def kill(event):
                if event.index == 2 and not remotes[0].down:
                    remotes[0].down = True
                    asyncio.get_running_loop().create_task(revive_soon())

            first = await collect(router, journal, "a", (4, 4), 10, kill)
            second = await collect(router, journal, "b", (9,), 6)  # seq ids start over on the fresh engine
            # the last free goes out with the engine's next (free-only) step
            await eventually(lambda: not remotes[0].kv, 5.0)
            return first, second, chain, remotes[0]

    first, second, chain, remote = asyncio.run(main())
    assert [e.token_id for e in first] == expected((4, 4), 10) and [e.index for e in first] == list(range(10))
    assert [e.token_id for e in second] == expected((9,), 6)
    assert chain.healthy and chain.outages == 1 and chain.requests_served == 2
    assert remote.kv == {}  # the old sequence was freed on the "surviving stages", the new ones at their end


def test_requests_one_after_another_on_idle_chains_take_turns():
    async def main():
        async with gateway(n=3) as (router, _, journal, _store):
            for i in range(6):
                await collect(router, journal, f"r{i}", (i + 1,), 2)
            return [h.requests_served for h in router.chains]

    assert asyncio.run(main()) == [2, 2, 2]


def test_a_request_cancelled_while_it_waits_for_a_chain_stops_there():
    async def main():
        async with gateway(n=1, wait_s=5.0) as (router, remotes, journal, store):
            loop = asyncio.get_running_loop()
            cancelled_at = []

            def kill_then_cancel(event):
                if event.index == 2 and not remotes[0].down:
                    remotes[0].down = True

                    async def cancel_soon():
                        await asyncio.sleep(0.1)  # the request is now waiting for a healthy chain
                        cancelled_at.append(loop.time())
                        assert router.abort("a")

                    loop.create_task(cancel_soon())

            with pytest.raises(Cancelled, match="cancelled while it was moving to another chain"):
                await collect(router, journal, "a", (4, 4), 40, kill_then_cancel)
            stopped = loop.time() - cancelled_at[0]
            remotes[0].down = False
            assert await router.revive(router.chains[0])
            await asyncio.sleep(0.05)
            return stopped, router.chains[0].engine.scheduler.num_running, store, router.abort("a")

    stopped, running, store, again = asyncio.run(main())
    assert stopped < 1.0  # at once, not after the 5 s wait
    assert running == 0 and store.entries == {} and not again  # never resumed; forgotten
