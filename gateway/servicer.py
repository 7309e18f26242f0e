"""The client-facing ``Gateway`` service: decode, hand to a chain's engine (failing over between
chains, ``gateway.failover``), encode."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import random
import time
import uuid
from collections.abc import AsyncIterator

import grpc
import grpc.aio

from gateway.failover import resumable_events
from gateway.journal import JournalWriter
from gateway.metrics import GatewayMetrics, RequestTracker
from gateway.router import Router
from gateway.status import StatusReporter
from stagemesh.errors import StagemeshError
from stagemesh.serving.scheduler import SEED_RANGE
from stagemesh.serving.types import Request, SamplingParams, TokenEvent
from stagemesh.tokenizer import IncrementalDecoder, Tokenizer, encode_prompt
from stagemesh.v1 import gateway_pb2, gateway_pb2_grpc
from stagemesh.wire.codec.messages import (
    GenerateChunk,
    GenerateInput,
    chunk_to_pb,
    generate_request_from_pb,
    status_to_pb,
)

logger = logging.getLogger(__name__)


class GatewayServicer(gateway_pb2_grpc.GatewayServicer):
    """Generate / Cancel / Status over the router's chains. Failures are gRPC statuses."""

    def __init__(self, router: Router, journal: JournalWriter, tokenizer: Tokenizer | None, status: StatusReporter,
                 metrics: GatewayMetrics | None = None):
        self.router = router
        self.journal = journal
        self.tokenizer = tokenizer
        self.status = status
        self.metrics = metrics or GatewayMetrics()
        self._rng = random.SystemRandom()

    async def Generate(self, request: gateway_pb2.GenerateRequest, context: grpc.aio.ServicerContext):
        """Streams the request's tokens; leaving the call early aborts it and frees its KV cache."""
        tracker = self.metrics.track()
        try:
            # aclosing: a client that leaves while we wait in ``yield`` still ends the engine's stream.
            async with contextlib.aclosing(self._generate(generate_request_from_pb(request), tracker)) as stream:
                async for msg in stream:
                    yield msg
            tracker.outcome = "ok"
        except StagemeshError as err:
            tracker.outcome = err.code.lower()
            await context.abort(_status_code(err.code), err.message)
        except (GeneratorExit, asyncio.CancelledError):
            tracker.outcome = "cancelled"  # the client left
            raise
        finally:
            tracker.done()

    async def Cancel(self, request: gateway_pb2.CancelRequest, context: grpc.aio.ServicerContext):
        return gateway_pb2.CancelResponse(cancelled=self.router.abort(request.request_id))

    async def Status(self, request: gateway_pb2.StatusRequest, context: grpc.aio.ServicerContext):
        return status_to_pb(await self.status.document())

    # --- Generate, step by step ------------------------------------------------------

    async def _generate(
        self, inp: GenerateInput, tracker: RequestTracker
    ) -> AsyncIterator[gateway_pb2.GenerateResponse]:
        request = Request(inp.request_id or uuid.uuid4().hex, self._encode(inp), self._seeded(inp.params), time.monotonic())
        decoder = IncrementalDecoder(self.tokenizer) if self.tokenizer is not None else None
        events = resumable_events(self.router, self.journal, request, tracker.admitted)
        async with contextlib.aclosing(events):
            async for event in events:
                if event.token_id is not None:
                    tracker.token()
                yield chunk_to_pb(_chunk(event, decoder))

    def _encode(self, inp: GenerateInput) -> tuple[int, ...]:
        if inp.token_ids is not None:
            return inp.token_ids
        return encode_prompt(self.tokenizer, inp.prompt)

    def _seeded(self, params: SamplingParams) -> SamplingParams:
        """The request's seed, drawn here when the client gave none, so the journal holds it."""
        if params.seed is not None:
            return params
        return dataclasses.replace(params, seed=self._rng.randrange(SEED_RANGE))


def _chunk(event: TokenEvent, decoder: IncrementalDecoder | None) -> GenerateChunk:
    text = ""
    if decoder is not None:
        text = decoder.push(event.token_id) if event.token_id is not None else ""
        if event.finish_reason is not None:
            text += decoder.flush()
    token_ids = () if event.token_id is None else (event.token_id,)
    return GenerateChunk(event.request_id, token_ids, event.index, text, event.finish_reason)


def _status_code(name: str) -> grpc.StatusCode:
    try:
        return grpc.StatusCode[name]
    except KeyError:
        return grpc.StatusCode.UNKNOWN
