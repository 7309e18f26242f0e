"""The step loop: one engine for the in-process path and the mesh.

NOTE: the loop keeps up to ``num_slots`` plans in flight on a ``Chain`` (the in-process
model, or the first stage of a gRPC chain), one more with overlap scheduling, applies each
result to the pure scheduler in launch order as it comes back, and hands each token event to
its request's consumer: a plain callable, called synchronously, so one step's events all
reach their consumers in one run of the event loop (the gateway batches them per frontend;
``generate`` puts them on a queue). A failed step fails only the requests in it; the loop
itself never dies of a step.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from typing import Protocol

from stagemesh.errors import Cancelled, Internal, StagemeshError, Unavailable, error_for
from stagemesh.serving.scheduler import Scheduler, SchedulerConfig
from stagemesh.serving.types import Request, StepPlan, StepResult, TokenEvent
from stagemesh.serving.validate import validate_request

logger = logging.getLogger(__name__)


class Chain(Protocol):
    """Runs one micro-batch through every stage and returns the sampled tokens."""

    async def step(self, plan: StepPlan) -> StepResult: ...


Consumer = Callable[[TokenEvent | StagemeshError], None]
"""Takes one request's token events in order, then possibly the error that ends it."""


@dataclass
class EngineCounters:
    """Running totals for status and metrics (plain ints: cheap to read)."""

    requests_finished: int = 0
    requests_failed: int = 0
    requests_aborted: int = 0
    tokens_emitted: int = 0
    steps_done: int = 0
    steps_failed: int = 0


class Engine:
    """Drives a ``Scheduler`` over a ``Chain``; ``add`` hands one request's tokens to a consumer,
    ``generate`` streams them."""

    def __init__(
        self,
        chain: Chain,
        config: SchedulerConfig,
        *,
        vocab_size: int,
        max_model_len: int,
        clock: Callable[[], float] = time.monotonic,
    ):
        if max_model_len != config.max_model_len:
            raise ValueError(
                f"max_model_len={max_model_len} differs from SchedulerConfig.max_model_len={config.max_model_len}"
            )
        self.chain = chain
        self.scheduler = Scheduler(config)
        self.counters = EngineCounters()
        self._vocab_size = vocab_size
        self._max_model_len = max_model_len
        self._clock = clock
        self._consumers: dict[str, Consumer] = {}
        self._steps: dict[asyncio.Task[StepResult], StepPlan] = {}
        self._wakeup = asyncio.Event()
        self._wake_task: asyncio.Task | None = None
        self._loop_task: asyncio.Task | None = None

    # --- lifecycle -----------------------------------------------------------------

    def start(self) -> None:
        """Spawn the step loop on the running event loop."""
        if self._loop_task is not None:
            raise RuntimeError("Engine.start() called twice")
        self._loop_task = asyncio.get_running_loop().create_task(self._run(), name="stagemesh-engine")

    async def stop(self) -> None:
        """Stop the loop, cancel in-flight steps, and fail every open request as UNAVAILABLE."""
        tasks = [t for t in (self._loop_task, self._wake_task, *self._steps) if t is not None]
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        self._loop_task = self._wake_task = None
        self._steps.clear()
        consumers, self._consumers = self._consumers, {}
        for consume in consumers.values():
            consume(Unavailable("the engine stopped before the request finished; retry it"))

    async def __aenter__(self) -> "Engine":
        self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()

    # --- requests ------------------------------------------------------------------

    def add(self, request: Request, consume: Consumer) -> None:
        """Validate and queue ``request``; ``consume`` then gets its token events in order, up to
        the one with a ``finish_reason``, or an error that ends it (``Cancelled`` after ``abort``,
        ``Unavailable`` when the engine stops or a step fails in the chain). A bad request raises
        here (InvalidArgument, ResourceExhausted) and is not queued."""
        validate_request(
            request.prompt_token_ids, request.params, vocab_size=self._vocab_size, max_model_len=self._max_model_len,
            resume_token_ids=request.resume_token_ids,
        )
        if self._loop_task is None:
            raise Unavailable("the engine is not running; call Engine.start() first")
        events = self.scheduler.add(request)
        self._consumers[request.request_id] = consume
        for event in events:
            self._deliver(event)
        self._wakeup.set()

    async def generate(self, request: Request) -> AsyncIterator[TokenEvent]:
        """``add`` ``request``, then yield its token events until it finishes.

        Errors in the request raise at the first ``__anext__``, before any token. Leaving
        the iteration early (``aclose``, cancellation) aborts the request and frees its KV cache.
        """
        queue: asyncio.Queue[TokenEvent | StagemeshError] = asyncio.Queue()
        self.add(request, queue.put_nowait)
        done = False
        try:
            while not done:
                item = await queue.get()
                if isinstance(item, StagemeshError):
                    done = True
                    raise item
                done = item.finish_reason is not None
                yield item
        finally:
            if not done:
                self.abort(request.request_id, quietly=True)

    def abort(self, request_id: str, *, quietly: bool = False) -> bool:
        """Cancel a request; its consumer gets ``Cancelled`` (nothing when ``quietly``: it left).
        False when it is not known."""
        consume = self._consumers.pop(request_id, None)
        if not self.scheduler.abort(request_id):
            return False
        self.counters.requests_aborted += 1
        self._wakeup.set()
        if consume is not None and not quietly:
            consume(Cancelled(f"request {request_id!r} was cancelled; its KV cache is freed"))
        return True

    # --- the loop ------------------------------------------------------------------

    async def _run(self) -> None:
        while True:
            self._wakeup.clear()
            self._launch_steps()
            # Only the oldest step can be applied next, so it is the one to wait for (waiting on a
            # later one that finished first would spin).
            waiting = {self._wake_waiter(), *itertools.islice(self._steps, 1)}
            await asyncio.wait(waiting, return_when=asyncio.FIRST_COMPLETED)
            done = self._complete_in_order()
            # NOTE: the next steps go out before this step's tokens are handed to the request
            # streams, so the chain computes while those streams write to their clients.
            self._launch_steps()
            for item in done:
                self._deliver(item)

    def _launch_steps(self) -> None:
        """Start a step for every plan the scheduler has, up to its free slots."""
        while (plan := self.scheduler.schedule(self._clock())) is not None:
            task = asyncio.create_task(self.chain.step(plan), name=f"stagemesh-step-{plan.step_id}")
            self._steps[task] = plan

    def _wake_waiter(self) -> asyncio.Task:
        if self._wake_task is None or self._wake_task.done():
            self._wake_task = asyncio.create_task(self._wakeup.wait())
        return self._wake_task

    def _complete_in_order(self) -> list[TokenEvent | _Failed]:
        """Apply the finished steps that no unfinished step was launched before (a lookahead
        plan is only meaningful after the plan it looks past); what to deliver, in order."""
        out: list[TokenEvent | _Failed] = []
        while self._steps and (task := next(iter(self._steps))).done():  # dict order: launch order
            out += self._complete(task, self._steps.pop(task))
        return out

    def _complete(self, task: asyncio.Task[StepResult], plan: StepPlan) -> list[TokenEvent | _Failed]:
        """Apply a finished step: its token events. A step that raised (or answered wrong)
        fails its requests instead."""
        try:
            events = self.scheduler.update(plan, task.result())
        except (Exception, asyncio.CancelledError) as exc:  # any step failure must not stop the loop
            return self._fail(plan, exc)
        self.counters.steps_done += 1
        return events

    def _deliver(self, item: TokenEvent | _Failed) -> None:
        """Hand a token event (or a request's failure) to its request's consumer; the last one
        (a finish or an error) also lets the consumer go."""
        rid = item.request_id
        if isinstance(item, TokenEvent):
            if item.token_id is not None:
                self.counters.tokens_emitted += 1
            last = item.finish_reason is not None
            if last:
                self.counters.requests_finished += 1
            consume = self._consumers.pop(rid, None) if last else self._consumers.get(rid)
            if consume is not None:
                consume(item)
        elif (consume := self._consumers.pop(rid, None)) is not None:
            consume(item.error)

    def _fail(self, plan: StepPlan, exc: BaseException) -> list[_Failed]:
        logger.error("step %d failed: %s: %s", plan.step_id, type(exc).__name__, exc)
        self.counters.steps_failed += 1
        try:
            failed = self.scheduler.fail(plan)
        except ValueError:
            logger.exception("step %d could not be failed cleanly; its requests may hang", plan.step_id)
            return []
        self.counters.requests_failed += len(failed)
        return [_Failed(rid, _step_error(plan.step_id, exc)) for rid in failed]


@dataclass(frozen=True)
class _Failed:
    """A request failed by its step: delivered in order with the token events of earlier steps."""

    request_id: str
    error: StagemeshError


def _step_error(step_id: int, exc: BaseException) -> StagemeshError:
    """A fresh error per request (raising one object in many tasks would tangle tracebacks)."""
    if isinstance(exc, StagemeshError):
        return error_for(exc.code, f"step {step_id} failed: {exc.message}")
    if isinstance(exc, ValueError):
        return Internal(f"step {step_id} returned a broken result: {exc}")
    return Unavailable(f"step {step_id} failed in the chain: {type(exc).__name__}: {exc}")
