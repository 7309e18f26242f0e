"""The ``Expert`` gRPC service: a thin shell over ``ExpertRunner``."""

from __future__ import annotations

import asyncio
import logging
import os
from concurrent.futures import ThreadPoolExecutor
from functools import partial

import grpc

from expert_worker.place import ExpertPlace
from stagemesh.errors import InvalidArgument, StagemeshError, Unavailable
from stagemesh.runners.expert import ExpertRunner
from stagemesh.runtime.decode_guard import Undecodable, in_band_decode_errors
from stagemesh.runtime.faults import FaultInjector, unless_dropped
from stagemesh.runtime.load_progress import reporter
from stagemesh.v1 import expert_pb2, expert_pb2_grpc
from stagemesh.wire.codec.experts import expert_output_to_pb, expert_request_from_pb, failed_expert_to_pb
from stagemesh.wire.codec.tensors import dtype_name

log = logging.getLogger(__name__)


class ExpertServicer(expert_pb2_grpc.ExpertServicer):
    """Serves one expert worker's ``Run`` streams (one per stage that routes to it) and ``Info``.

    NOTE: every batch, whichever stream it came on, runs on ONE compute thread, so the event
    loop stays free to receive, answer health checks and heartbeat. A stream's batches are
    taken one at a time, so its answers keep request order.

    Faults injected through the Admin service act at the top of each batch on the compute
    thread (``FaultSeam.before_step``: a stall, a failure) and on the open streams (a drop).
    """

    def __init__(self, place: ExpertPlace, faults: FaultInjector | None = None):
        self.place = place
        self.faults = faults if faults is not None else FaultInjector(place.worker_id, enabled=False)
        self.runner: ExpertRunner | None = None
        """Set once the weights are loaded; until then every batch is answered UNAVAILABLE."""
        self.draining = False
        """Set on SIGTERM: every batch is answered UNAVAILABLE, so stages send it to other replicas."""
        self.waiting = 0
        """Batches taken and not answered yet (the queue depth)."""
        self._thread = ThreadPoolExecutor(max_workers=1, thread_name_prefix=f"experts-{place.name}")

    async def load(self) -> ExpertRunner:
        """Build the runner on the compute thread, the thread that will run it (see
        ``stagemesh.model.torch_thread``: one thread for a process's torch work)."""
        place = self.place
        make = partial(ExpertRunner, place.model, place.experts, device=place.device, dtype=place.dtype,
                       progress=reporter(log, "layers"))  # `stagemesh up` follows these lines
        self.runner = await asyncio.get_running_loop().run_in_executor(self._thread, make)
        return self.runner

    @in_band_decode_errors
    async def Run(self, request_iterator, context):
        """One answer per request, in request order; a failed batch answers with ``error``."""
        loop = asyncio.get_running_loop()
        dropped = self.faults.streams.open()
        try:
            while (request := await unless_dropped(anext(request_iterator, None), dropped, context)) is not None:
                self.waiting += 1
                try:
                    answer = loop.run_in_executor(self._thread, self._answer, request)
                    yield await unless_dropped(answer, dropped, context)
                finally:
                    self.waiting -= 1
        finally:
            self.faults.streams.close(dropped)

    def _answer(self, request: expert_pb2.ExpertRequest) -> expert_pb2.ExpertResponse:
        """Decode, run, encode (on the compute thread)."""
        if isinstance(request, Undecodable):  # answered in band, like any failed batch
            return failed_expert_to_pb(0, InvalidArgument(f"expert worker {self.place.name}: {request.detail}"))
        try:
            if self.draining or self.runner is None:
                why = "is shutting down" if self.draining else "is still loading its weights"
                raise Unavailable(f"expert worker {self.place.name} {why}")
            self.faults.seam.before_step()
            try:
                batch = expert_request_from_pb(request)
            except ValueError as err:
                raise InvalidArgument(f"expert worker {self.place.name}: malformed ExpertRequest: {err}") from err
            out = self.runner.run(batch.layer, batch.expert_ids, batch.counts, batch.hidden)
            return expert_output_to_pb(request.step_id, request.layer, out)
        except Exception as err:  # noqa: BLE001 - a failed batch is answered, never fatal
            expected = isinstance(err, StagemeshError)
            log.warning("expert worker %s: batch of step %d layer %d failed: %s", self.place.name, request.step_id,
                        request.layer, err, exc_info=not expected)
            return failed_expert_to_pb(request.step_id, err, request.layer)

    async def Info(self, request, context) -> expert_pb2.ExpertInfo:
        """What this worker holds; UNAVAILABLE while it is loading its weights."""
        runner = self.runner
        if runner is None:
            why = f"expert worker {self.place.name} is still loading its weights"
            await context.abort(grpc.StatusCode.UNAVAILABLE, why)
        # NOTE: ExpertInfo has no domain dataclass; ``experts`` is the union over its layers
        # (the registry's WorkerInfo.experts has the per-layer map).
        return expert_pb2.ExpertInfo(
            role="expert",
            layers=sorted(runner.layers),
            experts=sorted({e for local in runner.layers.values() for e in local.expert_ids}),
            device=str(runner.device),
            dtype=dtype_name(runner.dtype),
            hidden_size=runner.config.hidden_size,
            pid=os.getpid(),
            model=self.place.model,
        )

    def close(self) -> None:
        self._thread.shutdown(wait=True, cancel_futures=True)
