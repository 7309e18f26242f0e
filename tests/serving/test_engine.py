"""The step loop over a tiny pure-Python chain whose tokens are easy to predict."""

from __future__ import annotations

import asyncio

import pytest

from stagemesh.errors import Cancelled, Internal, InvalidArgument, ResourceExhausted, Unavailable
from stagemesh.serving.engine import Engine
from stagemesh.serving.scheduler import SchedulerConfig
from stagemesh.serving.types import PENDING_TOKEN, Request, SamplingParams, StepPlan, StepResult, TokenLogprobs

V = 97


class SumChain:
    """A fake chain: the next token is the sum of the sequence's context so far, mod V.

    It keeps each sequence's tokens as its "KV cache", so it also checks chunk positions and
    that frees arrive; like a single-stage runner, it fills a ``PENDING_TOKEN`` in with the
    token it sampled last for that sequence. A chunk whose spec asks for logprobs gets ``logprobs_of``.
    """

    def __init__(self, delay: float = 0.0, fail_when=None):
        self.delay = delay
        self.fail_when = fail_when or (lambda plan: None)
        self.kv: dict[int, list[int]] = {}
        self.plans: list[StepPlan] = []
        self.sampled: dict[int, int] = {}
        self.in_flight = self.max_in_flight = 0

    async def step(self, plan: StepPlan) -> StepResult:
        self.plans.append(plan)
        self.in_flight += 1
        self.max_in_flight = max(self.max_in_flight, self.in_flight)
        try:
            await asyncio.sleep(self.delay)
            error = self.fail_when(plan)
            if error is not None:
                raise error
            return self._run(plan)
        finally:
            self.in_flight -= 1

    def _run(self, plan: StepPlan) -> StepResult:
        for seq_id in plan.free:
            self.kv.pop(seq_id, None)
            self.sampled.pop(seq_id, None)
        tokens, logprobs = {}, {}
        for chunk in plan.chunks:
            ctx = self.kv.setdefault(chunk.seq_id, [])
            if chunk.start != len(ctx):
                raise RuntimeError(f"seq {chunk.seq_id}: chunk starts at {chunk.start}, cache holds {len(ctx)}")
            ids = chunk.token_ids
            if ids == (PENDING_TOKEN,):
                ids = (self.sampled[chunk.seq_id],)
            ctx.extend(ids)
            if chunk.sample is not None:
                tokens[chunk.seq_id] = sum(ctx) % V
                if chunk.sample.logprobs:
                    logprobs[chunk.seq_id] = logprobs_of(tokens[chunk.seq_id])
        self.sampled.update(tokens)
        return StepResult(plan.step_id, tokens, logprobs)

    def freed(self) -> set[int]:
        return {s for p in self.plans for s in p.free}


def logprobs_of(token: int) -> TokenLogprobs:
    """``SumChain``'s made-up log-probabilities of ``token`` (exact in float32)."""
    return TokenLogprobs(-token / 4, ((token, -token / 4),))


def expected(prompt: tuple[int, ...], n: int, stop: tuple[int, ...] = ()) -> list[int]:
    ctx, out = list(prompt), []
    for _ in range(n):
        out.append(sum(ctx) % V)
        ctx.append(out[-1])
        if out[-1] in stop:
            break
    return out


def config(**kw) -> SchedulerConfig:
    kw.setdefault("num_blocks", 64)
    kw.setdefault("block_size", 4)
    kw.setdefault("max_model_len", 128)
    return SchedulerConfig(**kw)


def make_engine(chain, **kw) -> Engine:
    cfg = config(**kw)
    return Engine(chain, cfg, vocab_size=V, max_model_len=cfg.max_model_len)


def req(rid: str, prompt=(1, 2, 3), max_new: int = 4) -> Request:
    return Request(rid, tuple(prompt), SamplingParams(max_new_tokens=max_new, seed=1))


async def collect(engine: Engine, request: Request) -> list:
    return [e async for e in engine.generate(request)]


def run(coro):
    return asyncio.run(asyncio.wait_for(coro, timeout=10))


async def settle(engine: Engine) -> None:
    """Let the loop send the last free-only plans."""
    for _ in range(20):
        await asyncio.sleep(0)


def test_many_concurrent_requests_get_their_tokens():
    chain = SumChain()

    async def main():
        async with make_engine(chain, num_slots=2, num_blocks=40, max_num_batched_tokens=32) as engine:
            reqs = [req(f"r{i}", prompt=tuple(range(i, 3 * i + 1)), max_new=1 + i % 9) for i in range(1, 21)]
            results = await asyncio.gather(*(collect(engine, r) for r in reqs))
            await settle(engine)
            return engine, reqs, results

    engine, reqs, results = run(main())
    for r, events in zip(reqs, results):
        assert [e.token_id for e in events] == expected(r.prompt_token_ids, r.params.max_new_tokens)
        assert [e.index for e in events] == list(range(len(events)))
        assert [e.finish_reason for e in events][-1] == "length"
    assert engine.counters.requests_finished == 20
    assert engine.counters.tokens_emitted == sum(r.params.max_new_tokens for r in reqs)
    assert engine.scheduler.kv_blocks_used == 0 and chain.kv == {}
    assert max(p.num_tokens for p in chain.plans) <= 32


def test_slow_chain_keeps_two_plans_in_flight():
    chain = SumChain(delay=0.01)

    async def main():
        async with make_engine(chain, num_slots=2) as engine:
            return await asyncio.gather(*(collect(engine, req(f"r{i}", max_new=5)) for i in range(4)))

    results = run(main())
    assert chain.max_in_flight == 2
    assert all(len(r) == 5 for r in results)


def test_loop_sleeps_when_idle():
    chain = SumChain()

    async def main():
        async with make_engine(chain) as engine:
            await collect(engine, req("a"))
            await settle(engine)
            before = len(chain.plans)
            await asyncio.sleep(0.05)
            return before

    assert run(main()) == len(chain.plans)


def test_consumer_closing_early_aborts_and_frees():
    chain = SumChain(delay=0.001)

    async def main():
        async with make_engine(chain) as engine:
            stream = engine.generate(req("a", max_new=100))
            first = await stream.__anext__()
            await stream.aclose()
            others = await collect(engine, req("b", max_new=3))
            await settle(engine)
            return engine, first, others

    engine, first, others = run(main())
    assert first.index == 0 and len(others) == 3
    assert 0 in chain.freed() and 0 not in chain.kv
    assert engine.counters.requests_aborted == 1 and engine.scheduler.kv_blocks_used == 0


def test_cancelled_consumer_task_aborts():
    chain = SumChain(delay=0.001)

    async def main():
        async with make_engine(chain) as engine:
            task = asyncio.create_task(collect(engine, req("a", max_new=100)))
            while not chain.plans:
                await asyncio.sleep(0.001)
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)
            await asyncio.sleep(0.02)
            return engine

    engine = run(main())
    assert 0 in chain.freed() and not engine.scheduler.has_unfinished()


def test_abort_from_outside_raises_cancelled_in_the_stream():
    chain = SumChain(delay=0.001)

    async def main():
        async with make_engine(chain) as engine:
            stream = engine.generate(req("a", max_new=100))
            await stream.__anext__()
            assert engine.abort("a") and not engine.abort("a")
            with pytest.raises(Cancelled):
                await stream.__anext__()

    run(main())


def test_failed_step_fails_only_its_requests():
    def fail_b_third_token(plan):
        if any(c.seq_id == 1 and c.start == 5 for c in plan.chunks):
            return ConnectionError("stage 1 went away")
        return None

    chain = SumChain(fail_when=fail_b_third_token)

    async def main():
        async with make_engine(chain, num_slots=2, max_num_seqs=1) as engine:
            a = asyncio.create_task(collect(engine, req("a", max_new=6)))
            b = asyncio.create_task(collect(engine, req("b", max_new=6)))
            results = await asyncio.gather(a, b, return_exceptions=True)
            more = await collect(engine, req("c", max_new=2))
            return engine, results, more

    engine, (a, b), more = run(main())
    assert [e.token_id for e in a] == expected((1, 2, 3), 6)
    assert isinstance(b, Unavailable) and "step" in b.message and "stage 1 went away" in b.message
    assert len(more) == 2
    assert engine.counters.steps_failed == 1 and engine.counters.requests_failed == 1


def test_broken_result_is_internal_and_chain_errors_keep_their_code():
    class Forgetful(SumChain):
        def _run(self, plan):
            return StepResult(plan.step_id, {})

    chain = SumChain(fail_when=lambda plan: ResourceExhausted("stage 0 KV cache is full") if plan.chunks else None)

    async def main(c):
        async with make_engine(c) as engine:
            with pytest.raises(Exception) as info:
                await collect(engine, req("a"))
            return info.value

    assert isinstance(run(main(Forgetful())), Internal)
    err = run(main(chain))
    assert isinstance(err, ResourceExhausted) and err.message.startswith("step 0 failed: stage 0 KV")


@pytest.mark.parametrize(
    "request_, error",
    [
        (Request("a", (), SamplingParams()), InvalidArgument),
        (Request("a", (1, V), SamplingParams()), InvalidArgument),
        (Request("a", (1,), SamplingParams(top_p=2.0)), InvalidArgument),
        (Request("a", tuple(range(60)), SamplingParams(max_new_tokens=60)), ResourceExhausted),
    ],
)
def test_bad_requests_raise_before_any_token(request_, error):
    chain = SumChain()

    async def main():
        async with make_engine(chain, num_blocks=8) as engine:  # 32 tokens of KV
            stream = engine.generate(request_)
            with pytest.raises(error):
                await stream.__anext__()

    run(main())
    assert chain.plans == []


def test_generate_needs_a_started_engine_and_stop_ends_open_streams():
    chain = SumChain(delay=0.01)

    async def main():
        engine = make_engine(chain)
        with pytest.raises(Unavailable, match="not running"):
            await engine.generate(req("a")).__anext__()
        engine.start()
        stream = engine.generate(req("b", max_new=100))
        await stream.__anext__()
        await engine.stop()
        with pytest.raises(Unavailable, match="engine stopped"):
            await stream.__anext__()

    run(main())


def test_mismatched_max_model_len_is_refused():
    with pytest.raises(ValueError, match="max_model_len=64"):
        Engine(SumChain(), config(max_model_len=128), vocab_size=V, max_model_len=64)


# --- overlap scheduling -----------------------------------------------------------------------


def test_overlap_keeps_two_steps_in_flight_and_gives_the_same_tokens():
    chain = SumChain(delay=0.001)
    stop = (expected((1, 2, 3), 3)[2],)  # the third token of prompt (1, 2, 3): some requests stop on it

    async def main():
        async with make_engine(chain, overlap=True, num_blocks=60, max_num_batched_tokens=16) as engine:
            reqs = [
                Request(f"r{i}", (1, 2, 3) if i % 3 == 0 else tuple(range(i, 2 * i + 1)),
                        SamplingParams(max_new_tokens=1 + i % 7, seed=1, stop_token_ids=stop))
                for i in range(1, 16)
            ]
            results = await asyncio.gather(*(collect(engine, r) for r in reqs))
            await asyncio.sleep(0.05)  # the last frees go out in a plan of their own
            return engine, reqs, results

    engine, reqs, results = run(main())
    stopped = 0
    for r, events in zip(reqs, results):
        want = expected(r.prompt_token_ids, r.params.max_new_tokens, stop)
        assert [e.token_id for e in events] == want, r.request_id
        stopped += events[-1].finish_reason == "stop"
    assert stopped >= 2
    assert chain.max_in_flight == 2
    assert any(c.token_ids == (PENDING_TOKEN,) for p in chain.plans for c in p.chunks)
    assert engine.scheduler.kv_blocks_used == 0 and chain.kv == {} and chain.sampled == {}


def test_overlap_failed_step_fails_its_requests_and_drops_their_lookahead():
    class AnswerLost(SumChain):
        """Runs steps one at a time, in order (as a stage does), and loses the answer of the one
        with a's second token after running it."""

        lock = asyncio.Lock()

        async def step(self, plan):
            async with self.lock:
                return await super().step(plan)

        def _run(self, plan):
            result = super()._run(plan)
            if any(c.seq_id == 0 and c.start == 4 for c in plan.chunks):
                raise ConnectionError("stage 0 went away")
            return result

    chain = AnswerLost(delay=0.001)

    async def main():
        async with make_engine(chain, overlap=True) as engine:
            a = engine.generate(req("a", prompt=(1, 2, 3, 4), max_new=6))
            await a.__anext__()  # a's step 0 is back; steps 1 (fails) and 2 (a's lookahead past it) are out
            b = await collect(engine, req("b", max_new=6))
            with pytest.raises(Unavailable, match="stage 0 went away"):
                await a.__anext__()
            await asyncio.sleep(0.05)
            return engine, b

    engine, b = run(main())
    assert [e.token_id for e in b] == expected((1, 2, 3), 6)
    assert any(c.seq_id == 0 and c.start == 5 for p in chain.plans for c in p.chunks)  # the dropped lookahead
    assert engine.counters.requests_failed == 1
    assert engine.scheduler.kv_blocks_used == 0 and 0 not in chain.kv


def test_a_step_back_before_an_older_one_waits_for_it_without_spinning():
    class SlowFirst(SumChain):
        async def step(self, plan):
            self.delay = 0.05 if plan.step_id == 0 else 0.001
            return await super().step(plan)

    chain = SlowFirst()
    applied = []

    async def main():
        async with make_engine(chain, num_slots=2) as engine:
            passes = 0
            complete = engine._complete_in_order

            def counted():
                nonlocal passes
                passes += 1
                done = complete()
                applied.extend(e.request_id for e in done)
                return done

            engine._complete_in_order = counted
            results = await asyncio.gather(collect(engine, req("a", max_new=1)), collect(engine, req("b", max_new=1)))
            return results, passes

    (a, b), passes = run(main())
    assert [e.token_id for e in a] == expected((1, 2, 3), 1) == [e.token_id for e in b]
    assert applied[:2] == ["a", "b"]  # step 1 (b) came back first, and was applied after step 0 (a)
    assert passes < 20  # a loop that polled the finished later step would pass thousands of times
