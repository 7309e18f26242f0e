"""The ``Stage`` gRPC service: a thin shell over ``StagePipeline`` that decodes each request once."""

from __future__ import annotations

import asyncio
import logging
import os

import grpc

from stage_worker.decode import decode_step
from stage_worker.pipeline import StagePipeline
from stagemesh.errors import InvalidArgument
from stagemesh.runtime.decode_guard import Undecodable, in_band_decode_errors
from stagemesh.runtime.faults import OpenStreams, unless_dropped
from stagemesh.v1 import stage_pb2, stage_pb2_grpc
from stagemesh.wire.codec.tensors import dtype_name

log = logging.getLogger(__name__)

MAX_IN_FLIGHT = 256
"""Requests one stream may have taken but not yet answered; beyond it, gRPC flow control pushes back."""


class StageServicer(stage_pb2_grpc.StageServicer):
    """Serves one stage worker's ``Forward`` streams and ``Info``."""

    def __init__(self, pipeline: StagePipeline, streams: OpenStreams | None = None):
        self._pipeline = pipeline
        self._streams = streams if streams is not None else OpenStreams(enabled=False)
        """The open Forward streams, for an injected ``DropStreams`` (tracked only when fault injection is on)."""
        self._receivers: set[asyncio.Task] = set()

    @in_band_decode_errors
    async def Forward(self, request_iterator, context):
        """One answer per request, in request order.

        A receiver task submits each request as it arrives (so steps queue up while earlier
        ones compute, at most ``MAX_IN_FLIGHT`` of them); this handler yields the answers from
        a FIFO of their futures. An injected ``DropStreams`` aborts it UNAVAILABLE.
        """
        answers: asyncio.Queue[asyncio.Future | None] = asyncio.Queue()
        slots = asyncio.Semaphore(MAX_IN_FLIGHT)
        receiver = asyncio.create_task(self._receive(request_iterator, answers, slots))
        self._receivers.add(receiver)
        receiver.add_done_callback(self._receivers.discard)
        dropped = self._streams.open()
        try:
            while (answer := await unless_dropped(answers.get(), dropped, context)) is not None:
                yield await unless_dropped(answer, dropped, context)
                slots.release()
        finally:
            receiver.cancel()
            self._streams.close(dropped)

    async def _receive(self, requests, answers: asyncio.Queue, slots: asyncio.Semaphore) -> None:
        try:
            while True:
                await slots.acquire()
                request = await anext(requests, None)
                if request is None:
                    break
                answers.put_nowait(self._submit(request))
        except grpc.RpcError as err:
            log.info("a Forward stream into stage %s ended: %s", self._pipeline.place.name, err)
        finally:
            answers.put_nowait(None)  # the handler answers what it took, then ends the stream

    def _submit(self, request: stage_pb2.StageRequest) -> asyncio.Future[stage_pb2.StageResponse]:
        """Decode once, here at the stage's edge; a malformed request is answered at once."""
        if isinstance(request, Undecodable):  # its step id is in the bytes that could not be read
            return self._pipeline.refuse(0, InvalidArgument(f"stage {self._pipeline.place.name}: {request.detail}"))
        try:
            place = self._pipeline.place
            step = decode_step(request, place.name, samples=place.spec.is_last)
        except InvalidArgument as err:
            return self._pipeline.refuse(request.step_id, err)
        return self._pipeline.submit(step)

    def drain(self) -> None:
        """Stop taking requests on every open stream; each ends once its taken ones are answered."""
        for receiver in list(self._receivers):
            receiver.cancel()

    async def Info(self, request, context) -> stage_pb2.StageInfo:
        """What this worker holds; UNAVAILABLE while it is loading its weights."""
        place, runner = self._pipeline.place, self._pipeline.runner
        if runner is None:
            await context.abort(grpc.StatusCode.UNAVAILABLE, f"stage {place.name} is still loading its weights")
        # NOTE: StageInfo has no domain dataclass to convert from, so it is filled here.
        return stage_pb2.StageInfo(
            role="stage",
            chain=place.chain,
            stage=place.stage,
            num_stages=place.num_stages,
            layer_start=place.spec.start_layer,
            layer_end=place.spec.end_layer,
            mlp_only_start=place.spec.mlp_only_start,
            attn_only_end=place.spec.attn_only_end,
            num_layers=place.spec.num_layers,
            device=str(runner.device),
            tp_size=runner.tp.size,
            dtype=dtype_name(runner.dtype),
            hidden_size=runner.config.hidden_size,
            num_kv_blocks=runner.cache.num_blocks,
            block_size=runner.cache.block_size,
            kv_blocks_used=runner.cache.blocks_used,
            pid=os.getpid(),
            model=place.model,
        )
