"""The gateway's frontends: each one's requests, followed across chains, and each step's token
events sent to each frontend as ONE message.

NOTE: the cost per streamed token. An engine hands a step's events to their requests' consumers
synchronously, in one run of the event loop; here a consumer only appends the token to its
frontend's pending ``Events`` (two array appends) and sets that frontend's ``ready`` event. The
frontend's writer (``gateway.scheduling``) wakes once after the step and sends everything
pending in one ``EventBatch``: one gRPC message per step per frontend, not one per token per
client. A writer that falls behind sends several steps' events in its next message.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import random
import time
import uuid
from functools import partial

from gateway.failover import Follower
from gateway.journal import JournalWriter
from gateway.metrics import GatewayMetrics, RequestTracker
from gateway.router import Router
from stagemesh.errors import InvalidArgument, StagemeshError
from stagemesh.serving.params import SamplingParams
from stagemesh.serving.scheduler import SEED_RANGE
from stagemesh.serving.types import Request, TokenEvent
from stagemesh.wire.codec.scheduling import Events, Submission

logger = logging.getLogger(__name__)


class FrontendLink:
    """One frontend's ``Connect`` stream as the gateway sees it."""

    def __init__(self, name: str):
        self.name = name
        self.followers: dict[int, Follower] = {}
        """Its running requests by handle."""
        self.pending = Events()
        """What its next message carries."""
        self.ready = asyncio.Event()
        """Set while ``pending`` holds something."""

    def take(self) -> Events:
        """The pending events (the writer sends them); the link starts a fresh batch."""
        events, self.pending = self.pending, Events()
        self.ready.clear()
        return events


class FrontendHub:
    """Takes the frontends' submissions and cancels, and routes their requests' events back."""

    def __init__(self, router: Router, journal: JournalWriter, metrics: GatewayMetrics):
        self.router, self.journal, self.metrics = router, journal, metrics
        self.links: set[FrontendLink] = set()
        self._rng = random.SystemRandom()

    def attach(self, name: str) -> FrontendLink:
        link = FrontendLink(name)
        self.links.add(link)
        logger.info("frontend %s attached (%d attached)", name, len(self.links))
        return link

    def detach(self, link: FrontendLink) -> None:
        """The frontend's stream ended: its clients are gone with it, so its requests are cancelled."""
        self.links.discard(link)
        followers = list(link.followers.values())
        for follower in followers:
            follower.cancel()
        logger.info("frontend %s detached; %d request(s) cancelled", link.name, len(followers))

    def submit(self, link: FrontendLink, sub: Submission) -> None:
        """Admit a frontend's request; a refusal goes back to it as that request's error."""
        if sub.handle in link.followers:
            link.pending.errors[sub.handle] = InvalidArgument(f"handle {sub.handle} is already in use on this stream")
            link.ready.set()
            return
        request = Request(sub.request_id or uuid.uuid4().hex, tuple(sub.prompt_token_ids), self._seeded(sub.params),
                          time.monotonic())
        tracker = self.metrics.track()
        follower = Follower(
            self.router, self.journal, request,
            emit=partial(self._token, link, sub.handle, tracker),
            end=partial(self._end, link, sub.handle, tracker),
            admitted=tracker.admitted,
        )
        link.followers[sub.handle] = follower
        try:
            follower.start()
        except StagemeshError as err:
            self._end(link, sub.handle, tracker, err)

    def cancel(self, link: FrontendLink, handle: int) -> None:
        follower = link.followers.get(handle)
        if follower is not None:
            follower.cancel()

    def _seeded(self, params: SamplingParams) -> SamplingParams:
        """The request's seed, drawn here when the client gave none, so the journal holds it."""
        if params.seed is not None:
            return params
        return dataclasses.replace(params, seed=self._rng.randrange(SEED_RANGE))

    @staticmethod
    def _token(link: FrontendLink, handle: int, tracker: RequestTracker, event: TokenEvent) -> None:
        pending = link.pending
        if event.token_id is not None:
            pending.handles.append(handle)
            pending.token_ids.append(event.token_id)
            tracker.token()
        if event.finish_reason is not None:
            pending.finished[handle] = event.finish_reason
        link.ready.set()

    @staticmethod
    def _end(link: FrontendLink, handle: int, tracker: RequestTracker, err: StagemeshError | None) -> None:
        link.followers.pop(handle, None)
        tracker.outcome = "ok" if err is None else err.code.lower()
        tracker.done()
        if err is not None:
            link.pending.errors[handle] = err
            link.ready.set()
