"""The gateway's ``Scheduling`` service for its frontends: decode, hand to the hub, encode."""

from __future__ import annotations

import asyncio
import contextlib
import logging

import grpc
import grpc.aio

from gateway.hub import FrontendHub, FrontendLink
from gateway.status import StatusReporter
from stagemesh.errors import InvalidArgument
from stagemesh.v1 import gateway_pb2, scheduling_pb2_grpc
from stagemesh.wire.codec.messages import status_to_pb
from stagemesh.wire.codec.scheduling import events_to_pb, submission_from_pb

logger = logging.getLogger(__name__)


class SchedulingServicer(scheduling_pb2_grpc.SchedulingServicer):
    """Connect (one stream per frontend), Cancel and Status."""

    def __init__(self, hub: FrontendHub, status: StatusReporter):
        self.hub, self.status = hub, status

    async def Connect(self, request_iterator, context: grpc.aio.ServicerContext):
        """Reads the frontend's batches on a task; writes one EventBatch per wake-up of the link."""
        link = self.hub.attach(context.peer())
        reader = asyncio.ensure_future(self._read(request_iterator, link))
        try:
            while True:
                ready = asyncio.ensure_future(link.ready.wait())
                await asyncio.wait((ready, reader), return_when=asyncio.FIRST_COMPLETED)
                if not ready.done():
                    ready.cancel()
                    return  # the frontend closed its side (or sent garbage: logged by the reader)
                yield events_to_pb(link.take())
        finally:
            reader.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await reader
            self.hub.detach(link)

    async def _read(self, request_iterator, link: FrontendLink) -> None:
        async for batch in request_iterator:
            if batch.frontend:
                link.name = batch.frontend
            if batch.pid:
                link.pid = batch.pid
            link.spare = batch.spare
            for msg in batch.submit:
                try:
                    sub = submission_from_pb(msg)
                except ValueError as err:
                    link.pending.errors[msg.handle] = InvalidArgument(f"malformed submission: {err}")
                    link.ready.set()
                    continue
                self.hub.submit(link, sub)
            for handle in batch.cancel:
                self.hub.cancel(link, handle)

    async def Cancel(self, request: gateway_pb2.CancelRequest, context: grpc.aio.ServicerContext):
        return gateway_pb2.CancelResponse(cancelled=self.hub.router.abort(request.request_id))

    async def Status(self, request: gateway_pb2.StatusRequest, context: grpc.aio.ServicerContext):
        return status_to_pb(await self.status.document())
