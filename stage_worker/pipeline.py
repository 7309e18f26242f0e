"""The stage's step pipeline: every received micro-batch runs through the runner and gets one answer.

NOTE: ordering. Steps run on ONE dedicated thread (a single-worker executor runs its queue in
submission order), so they run strictly in arrival order while the event loop keeps receiving
and sending. When a step ends, the thread hands its outcome to the loop with
``call_soon_threadsafe``, which runs callbacks in the order they were scheduled: so the
answers of the last stage, and the requests forwarded to the next stage, also keep arrival
order. A step that fails here is answered with its error and is not forwarded.

What runs a step is the stage object (``stage_worker.stage``): the runner in this process, or
rank 0 of a tensor-parallel stage, which first broadcasts the step to the other ranks. The
first stage of a longer chain first fills in the step's pending tokens from the answers it
relays (``stage_worker.feedback``: overlap scheduling).

Faults injected through the Admin service (``stagemesh.runtime.faults``) act at the top of each
step on the step thread (``FaultSeam.before_step``): a stall holds this step and the ones
behind it, as a slow or frozen stage would; a failure is answered like any failed step.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from dataclasses import replace
from functools import partial
from typing import Callable

import torch

from stage_worker.decode import StageStep, forward_step
from stage_worker.downstream import DownstreamLink
from stage_worker.feedback import SampledTokens
from stage_worker.stage import LocalStage, TPStage
from stage_worker.topology import StagePlace
from stagemesh.errors import StagemeshError, Unavailable
from stagemesh.mesh.figures import StageFigures
from stagemesh.runners.stage import StageRunner
from stagemesh.runtime.faults import FaultSeam
from stagemesh.runtime.histogram import LatencyHistogram
from stagemesh.runtime.tls import MeshTLS
from stagemesh.serving.types import StepPlan
from stagemesh.v1 import stage_pb2
from stagemesh.wire.codec.messages import failed_step_to_pb, result_from_pb, result_to_pb

log = logging.getLogger(__name__)

BUSY_INTERVALS_KEPT = 256


class StageCounters:
    """What the heartbeat's figures count. The step thread writes them; the event loop reads them."""

    def __init__(self) -> None:
        self.received = 0
        """Requests submitted (event loop only)."""
        self.computed = 0
        """Requests whose step ended, failed ones included (step thread only)."""
        self.steps = 0
        self.steps_failed = 0
        self.tokens = 0
        self.busy_s = 0.0
        self.bytes_sent = 0
        """Bytes of hidden states forwarded to the next stage (step thread only)."""
        self.step_latency = LatencyHistogram()
        self._intervals: deque[tuple[float, float]] = deque(maxlen=BUSY_INTERVALS_KEPT)
        self._interval_steps: deque[int] = deque(maxlen=BUSY_INTERVALS_KEPT)
        """The step id of each of ``_intervals``: the dashboard's timeline follows one micro-batch down the chain."""
        self._lock = threading.Lock()
        self._last_report = (time.time(), 0.0, 0, 0)
        """(time, busy_s, steps, tokens) at the previous report: the rates' window starts there."""

    def record(self, t_start: float, t_end: float, tokens: int, step_id: int = -1) -> None:
        with self._lock:
            self.steps += 1
            self.tokens += tokens
            self.busy_s += t_end - t_start
            self._intervals.append((t_start, t_end))
            self._interval_steps.append(step_id)
            self.step_latency.observe(t_end - t_start)

    def report(self, runner: StageRunner | None) -> StageFigures:
        """The figures; the busy fraction and the rates cover the time since the previous report."""
        now = time.time()
        with self._lock:
            intervals, interval_steps = [list(pair) for pair in self._intervals], list(self._interval_steps)
            busy_s, steps, tokens, histogram = self.busy_s, self.steps, self.tokens, self.step_latency.figure()
        last_time, last_busy, last_steps, last_tokens = self._last_report
        self._last_report = (now, busy_s, steps, tokens)
        window = max(now - last_time, 1e-6)
        cache = runner.cache if runner is not None else None
        return StageFigures(
            time=now,
            micro_batches_per_s=(steps - last_steps) / window,
            tokens_per_s=(tokens - last_tokens) / window,
            bytes_sent=self.bytes_sent,
            step_latency=histogram,
            steps=self.steps,
            steps_failed=self.steps_failed,
            tokens_processed=self.tokens,
            busy_s=busy_s,
            busy_fraction=min(1.0, (busy_s - last_busy) / window),
            queue_depth=self.received - self.computed,
            kv_blocks_used=cache.blocks_used if cache else 0,
            kv_blocks_total=cache.num_blocks if cache else 0,
            running_sequences=len(cache.block_tables) if cache else 0,
            busy_intervals=intervals,
            busy_steps=interval_steps,
        )


class StagePipeline:
    """Runs this stage's micro-batches in arrival order; ``submit`` returns each one's answer."""

    def __init__(self, place: StagePlace, faults: FaultSeam | None = None, tls: MeshTLS | None = None):
        self.place = place
        self.faults = faults if faults is not None else FaultSeam(place.name)
        """Injected faults, consulted once per step (none unless the Admin service injects some)."""
        self.stage: LocalStage | TPStage | None = None
        """Set once ``load`` has built it; until then every step is answered UNAVAILABLE."""
        self.failure: StagemeshError | None = None
        """Set by ``fail``: every step from then on is answered with it."""
        self.figures = StageCounters()
        self._loop = asyncio.get_running_loop()
        self._thread = ThreadPoolExecutor(max_workers=1, thread_name_prefix=f"step-{place.name}")
        self._downstream = None if place.next_address is None else DownstreamLink(place.next_address, place.next_name, tls)
        self._sampled = SampledTokens(place.name) if place.spec.is_first and not place.spec.is_last else None
        """The first stage of a longer chain: the tokens sampled downstream, for pending tokens."""
        self._unanswered: dict[asyncio.Future, int] = {}
        """Answers not given yet -> their step ids (for ``fail``)."""

    @property
    def runner(self) -> StageRunner | None:
        """Rank 0's runner, once loaded."""
        return None if self.stage is None else self.stage.runner

    async def load(self, make_stage: Callable[[], LocalStage | TPStage]) -> LocalStage | TPStage:
        """Build the stage on the step thread (the loop keeps answering health checks meanwhile):
        the thread that steps it, so the process has one OpenMP team (``stagemesh.model.torch_thread``)."""
        self.stage = await self._loop.run_in_executor(self._thread, make_stage)
        return self.stage

    def submit(self, step: StageStep) -> asyncio.Future[stage_pb2.StageResponse]:
        """Queue ``step``; the future always resolves to a StageResponse, never raises."""
        step_id = step.plan.step_id
        if self.failure is not None or self.stage is None:
            err = self.failure or Unavailable(f"stage {self.place.name} is still loading its weights")
            return self.refuse(step_id, err)
        self.figures.received += 1
        answer = self._loop.create_future()
        try:
            self._thread.submit(self._run, step, answer)
        except RuntimeError as err:  # the executor is shut down: the worker is exiting
            self.figures.received -= 1
            return self.refuse(step_id, Unavailable(f"stage {self.place.name}: {err}"))
        self._unanswered[answer] = step_id
        answer.add_done_callback(self._answered)
        return answer

    def refuse(self, step_id: int, err: StagemeshError) -> asyncio.Future[stage_pb2.StageResponse]:
        """The answer of a step that will not run: ``err``, at once."""
        answer = self._loop.create_future()
        answer.set_result(failed_step_to_pb(step_id, err))
        return answer

    def fail(self, err: StagemeshError) -> None:
        """Answer every step not answered yet with ``err``, and every later one at once.

        For a stage that can never step again (a TP rank died): its step thread may be stuck
        in a collective that will not complete, so the answers do not wait for it.
        """
        self.failure = err
        for answer, step_id in list(self._unanswered.items()):
            if not answer.done():
                answer.set_result(failed_step_to_pb(step_id, err))

    def _answered(self, answer: asyncio.Future) -> None:
        self._unanswered.pop(answer, None)

    async def close(self) -> None:
        """Drop the steps not yet started (nobody is left to take their answers), finish the
        running one, close the stage (a TP stage stops its ranks), then the link to the next stage."""
        await self._loop.run_in_executor(None, partial(self._thread.shutdown, wait=True, cancel_futures=True))
        if self.stage is not None:
            await self._loop.run_in_executor(None, self.stage.close)
        if self._downstream is not None:
            await self._downstream.close()

    # --- on the step thread ----------------------------------------------------------------

    def _run(self, step: StageStep, answer: asyncio.Future) -> None:
        plan = step.plan
        refused = self._refused(step)
        if refused is not None:
            self.figures.computed += 1
            self._loop.call_soon_threadsafe(self._deliver, plan, refused, answer)
            return
        try:
            outcome = self._step(step)
        except Exception as err:  # noqa: BLE001 - a failed step is answered, never fatal
            self.figures.steps_failed += 1
            expected = isinstance(err, StagemeshError)
            log.warning("stage %s: step %d failed: %s", self.place.name, plan.step_id, err, exc_info=not expected)
            outcome = failed_step_to_pb(plan.step_id, err)
            if self._sampled is not None:
                self._sampled.fail(plan)
        finally:
            self.figures.computed += 1
        self._loop.call_soon_threadsafe(self._deliver, plan, outcome, answer)

    def _refused(self, step: StageStep) -> stage_pb2.StageResponse | None:
        """The answer of a malformed or foreign step on the first stage of a longer chain, before
        it reaches the pending-token state (``SampledTokens``), which another sequence's next step
        reads: the runner checks every step again, but only once that state has seen it."""
        if self._sampled is None:
            return None
        try:
            self.stage.runner.check(step.plan, step.hidden, before_fill=True)
        except StagemeshError as err:
            self.figures.steps_failed += 1
            log.warning("stage %s: step %d refused: %s", self.place.name, step.plan.step_id, err)
            return failed_step_to_pb(step.plan.step_id, err)
        return None

    def _step(self, step: StageStep) -> stage_pb2.StageRequest | stage_pb2.StageResponse:
        plan = step.plan
        self.faults.before_step()  # the one fault-injection seam: may stall, may raise
        if self._sampled is not None:  # before the clock starts: waiting is not busy
            plan = self._sampled.fill(step.plan)
            self._sampled.expect(plan)
        t_start = time.time()
        out = self.stage.step(step if plan is step.plan else replace(step, plan=plan))
        wait_computed(out)
        t_end = time.time()
        self.figures.record(t_start, t_end, plan.num_tokens, plan.step_id)
        if self.place.spec.is_last:
            return result_to_pb(out)
        # the plan as this stage ran it (pending tokens filled in), on its output
        forward = forward_step(step, plan, out)
        self.figures.bytes_sent += len(forward.hidden.data)
        return forward

    # --- back on the event loop ------------------------------------------------------------

    def _deliver(
        self, plan: StepPlan, outcome: stage_pb2.StageRequest | stage_pb2.StageResponse, answer: asyncio.Future
    ) -> None:
        if not isinstance(outcome, stage_pb2.StageRequest):
            if not answer.done():
                answer.set_result(outcome)
            return
        try:
            # Forwarded even when the upstream asker is gone: the next stages' KV must follow.
            reply = self._downstream.send(outcome, answer)
        except Exception as err:  # noqa: BLE001 - the answer must come whatever happens
            log.exception("stage %s: could not forward step %d", self.place.name, outcome.step_id)
            if self._sampled is not None:
                self._sampled.fail(plan)
            if not answer.done():
                answer.set_result(failed_step_to_pb(outcome.step_id, err))
            return
        if self._sampled is not None:
            reply.add_done_callback(lambda done: self._sampled.land(plan.step_id, _tokens(done.result())))


def wait_computed(out) -> None:
    """Returns once a step's output is computed. NOTE: CUDA kernels run after the call that
    launched them returns; without this wait a GPU stage's busy time would be its launch time
    (the copy to the wire waits for them anyway, a moment later)."""
    if isinstance(out, torch.Tensor) and out.is_cuda:
        torch.cuda.synchronize(out.device)


def _tokens(response: stage_pb2.StageResponse) -> dict[int, int] | None:
    """The tokens of a relayed answer (seq id -> token), or None when its step failed."""
    try:
        return result_from_pb(response).tokens
    except StagemeshError:
        return None
