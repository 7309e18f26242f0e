"""The frontend's one ``Scheduling.Connect`` stream to the gateway, and the requests it carries.

Submissions and cancels go up batched (everything queued since the last message); each
``EventBatch`` coming down is spread over the requests' streams in one pass.

NOTE: a gateway that dies or restarts costs the clients latency, not their requests. When the
stream breaks, the open requests stay open (their clients wait); the link reconnects (checking
often at first, ``health.retry_after``), and its first message to the gateway (the same one
restarted, or another) resubmits every open request as a *resume* with the prompt, the
parameters (the seed included) and the tokens it has. The gateway takes each one up (it took
them over from the journal, or starts it from those tokens) and sends every token again from
index 0; each stream skips what its client has. Requests that wait longer than ``reattach_s``
for a gateway fail UNAVAILABLE. The frontend's health says NOT_SERVING while the link is down
or the gateway cannot serve.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import os
from array import array

import grpc
import grpc.aio

from frontend.stream import MESSAGES_PER_S, Pacer, RequestStream
from stagemesh.errors import StagemeshError, Unavailable
from stagemesh.runtime import health
from stagemesh.runtime import tls as mesh_tls
from stagemesh.runtime.tls import MeshTLS
from stagemesh.serving.params import SamplingParams
from stagemesh.v1 import gateway_pb2, scheduling_pb2, scheduling_pb2_grpc
from stagemesh.wire.codec.scheduling import Events, Submission, events_from_pb, submission_to_pb
from stagemesh.wire.streams import MESSAGE_OPTIONS

log = logging.getLogger(__name__)

SCHEDULING_SERVICE = scheduling_pb2.DESCRIPTOR.services_by_name["Scheduling"].full_name
RETRY_S = 0.5
"""Between attempts to reach a gateway that has been away for long (``health.retry_after``: more often at first)."""
UNARY_TIMEOUT_S = 10.0
REATTACH_S = 30.0
"""How long open requests wait for the gateway to come back before they fail UNAVAILABLE."""
HEALTH_POLL_S = 0.5
LOG_EVERY_S = 10.0
"""How often the link says again that the gateway is unreachable."""


class GatewayLink:
    """Carries this frontend's requests to the gateway at ``address`` and their tokens back."""

    def __init__(self, address: str, name: str, messages_per_s: float = MESSAGES_PER_S, reattach_s: float = REATTACH_S,
                 tls: MeshTLS | None = None):
        self.address, self.name, self.reattach_s = address, name, reattach_s
        self.tls = tls
        """The frontend's mesh identity, presented to the gateway (mTLS); None: plaintext."""
        self.streams: dict[int, RequestStream] = {}
        """Open requests by handle."""
        self.pacer = Pacer(lambda: len(self.streams), messages_per_s)
        self.connected = asyncio.Event()
        """Set while the stream to a serving gateway is up."""
        self.can_serve = False
        """The gateway's overall health, polled while connected: some chain can serve."""
        self.spare = False
        """A warm spare (``frontend.frontend.Frontend._take_slot``): said in every message, so the
        gateway's status lists it as one; ``serves`` ends it."""
        self._handles = itertools.count(1)
        self._submit: list[scheduling_pb2.Submission] = []
        self._cancel: list[int] = []
        self._outbox = asyncio.Event()
        self._connection = 0
        """Counts the Connect streams opened: the current one's number."""
        self._channel: grpc.aio.Channel | None = None
        self._task: asyncio.Task | None = None

    def start(self) -> None:
        self._task = asyncio.create_task(self._run(), name="gateway-link")

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
        self._fail_all(Unavailable("this frontend is shutting down; retry on another"))
        self.pacer.close()

    # --- requests ---------------------------------------------------------------------

    def submit(self, request_id: str, prompt: array, params: SamplingParams, resume_from: int | None = None
               ) -> RequestStream:
        """Send a request to the gateway (once the link is up, if it is down); its stream fills as
        tokens come. ``resume_from``: the client resumes it and has its tokens up to there."""
        stream = RequestStream(next(self._handles), request_id, prompt, params, sent=resume_from or 0)
        self.streams[stream.handle] = stream
        if self.connected.is_set():
            self._submit.append(_submission(stream, resume=resume_from is not None))
            self._outbox.set()
        return stream

    def cancel(self, stream: RequestStream) -> None:
        """The client left or cancelled: the gateway stops the request and frees its KV cache."""
        if self.streams.pop(stream.handle, None) is not None:
            self._cancel.append(stream.handle)
            self._outbox.set()

    def serves(self) -> None:
        """This spare serves clients now: the next message tells the gateway."""
        self.spare = False
        self._outbox.set()

    async def cancel_by_id(self, request_id: str) -> bool:
        """``Cancel`` of a request by id, whichever frontend holds it."""
        reply = await self._stub().Cancel(gateway_pb2.CancelRequest(request_id=request_id), timeout=UNARY_TIMEOUT_S)
        return reply.cancelled

    async def status(self) -> gateway_pb2.StatusResponse:
        return await self._stub().Status(gateway_pb2.StatusRequest(), timeout=UNARY_TIMEOUT_S)

    # --- the stream -------------------------------------------------------------------

    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        down_since = next_log = loop.time()
        while True:
            try:
                await self._connect_and_serve()
            except (grpc.RpcError, StagemeshError, LookupError) as err:
                if loop.time() >= next_log:
                    log.warning("gateway at %s unreachable (%s); retrying", self.address, _reason(err))
                    next_log = loop.time() + LOG_EVERY_S
            if self.connected.is_set():
                self.connected.clear()
                down_since = next_log = loop.time()
                log.warning("the stream to the gateway at %s broke; %d open request(s) wait for it",
                            self.address, len(self.streams))
            if loop.time() - down_since > self.reattach_s:
                self._fail_all(Unavailable(f"the gateway at {self.address} has been unreachable for "
                                           f"{self.reattach_s:.0f} s; retry the request"))
            await asyncio.sleep(health.retry_after(loop.time() - down_since, RETRY_S))

    async def _connect_and_serve(self) -> None:
        if self._channel is None:
            self._channel = mesh_tls.aio_channel(self.address, self.tls, MESSAGE_OPTIONS)
        channel = self._channel
        try:
            status = await health.status(channel, service=SCHEDULING_SERVICE, timeout_s=2.0)
        except grpc.RpcError:
            await self._drop(channel)
            raise
        if status != health.SERVING:  # it answers: the channel is kept for the next check
            raise LookupError(f"its health is {health.status_name(status)}")
        self._connection += 1
        call = self._stub().Connect(self._outgoing(self._connection))
        self.connected.set()
        log.info("connected to the gateway at %s (%d open request(s) resubmitted)", self.address, len(self.streams))
        poll = asyncio.create_task(self._poll_health(self._channel))
        try:
            async for batch in call:
                self._dispatch(events_from_pb(batch))
        finally:
            poll.cancel()
            call.cancel()
            self.can_serve = False
            await self._drop(channel)

    async def _drop(self, channel: grpc.aio.Channel) -> None:
        """A new channel for the next attempt: one whose gateway went away waits out gRPC's
        reconnect backoff (1 s, then longer) before it dials again, long after a new one serves."""
        if self._channel is channel:
            self._channel = None
        await channel.close()

    async def _poll_health(self, channel: grpc.aio.Channel) -> None:
        """``can_serve``: the gateway's overall health, which is NOT_SERVING while no chain serves."""
        while True:
            try:
                self.can_serve = await health.status(channel, timeout_s=2.0) == health.SERVING
            except (grpc.RpcError, StagemeshError, LookupError):
                self.can_serve = False
            await asyncio.sleep(HEALTH_POLL_S)

    async def _outgoing(self, connection: int):
        # NOTE: every open request goes (again) in the first message: after a break, the gateway
        # on the other side may be a new one, and no request is lost or started twice either way.
        # A broken connection's generator may still be waiting on the outbox: it must leave what
        # it finds there to the current one (``connection``), or those submissions are lost.
        self._submit.clear()
        self._cancel.clear()
        resubmit = [_submission(stream, resume=True) for stream in self.streams.values()]
        for stream in self.streams.values():
            stream.restart()  # the gateway sends them all again; the stream skips what its client has
        yield scheduling_pb2.FrontendBatch(frontend=self.name, pid=os.getpid(), submit=resubmit, spare=self.spare)
        while True:
            await self._outbox.wait()
            if connection != self._connection:
                return
            self._outbox.clear()
            submit, self._submit = self._submit, []
            cancel, self._cancel = self._cancel, []
            yield scheduling_pb2.FrontendBatch(submit=submit, cancel=cancel, spare=self.spare)

    def _dispatch(self, events: Events) -> None:
        """One EventBatch: tokens first (in order), then finishes and errors."""
        streams, woken, logprobs = self.streams, set(), events.logprobs
        if logprobs:  # some request asked for them
            for i, (handle, token) in enumerate(zip(events.handles, events.token_ids)):
                if (stream := streams.get(handle)) is not None:
                    stream.add(token, logprobs.get(i))
                    woken.add(stream)
        else:
            for handle, token in zip(events.handles, events.token_ids):
                if (stream := streams.get(handle)) is not None:
                    stream.add(token, None)
                    woken.add(stream)
        for handle, reason in events.finished.items():
            if (stream := streams.pop(handle, None)) is not None:
                stream.finish(reason)
        for handle, err in events.errors.items():
            if (stream := streams.pop(handle, None)) is not None:
                stream.fail(err)
        self.pacer.wake(woken)

    def _fail_all(self, err: Unavailable) -> None:
        streams, self.streams = self.streams, {}
        for stream in streams.values():
            stream.fail(err, final=False)  # this frontend's trouble: resuming on another may help
        self._submit.clear()
        self._cancel.clear()

    def _stub(self) -> scheduling_pb2_grpc.SchedulingStub:
        if self._channel is None:
            raise Unavailable(f"this frontend has no connection to the gateway at {self.address}; retry shortly")
        return scheduling_pb2_grpc.SchedulingStub(self._channel)


def _submission(stream: RequestStream, *, resume: bool) -> scheduling_pb2.Submission:
    known = array("q", stream.tokens) if resume else array("q")
    return submission_to_pb(Submission(stream.handle, stream.request_id, stream.prompt, stream.params, resume, known))


def _reason(err: Exception) -> str:
    if isinstance(err, grpc.RpcError):
        return f"{err.code().name}: {err.details()}"
    return str(err)
