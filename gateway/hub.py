"""The gateway's frontends: each one's requests, followed across chains, each step's token
events sent to each frontend as ONE message, and requests that outlive their frontend.

NOTE: the cost per streamed token. An engine hands a step's events to their requests' consumers
synchronously, in one run of the event loop; here a consumer only appends the token to its
frontend's pending ``Events`` (two array appends) and sets that frontend's ``ready`` event. The
frontend's writer (``gateway.scheduling``) wakes once after the step and sends everything
pending in one ``EventBatch``: one gRPC message per step per frontend, not one per token per
client. A writer that falls behind sends several steps' events in its next message.

NOTE: resume. A request is not its frontend's stream: each one has a ``Tap`` saying where its
events go, and a frontend whose stream ends (it died, or its link broke) leaves its requests
running as *orphans* for ``resume_window_s``. A ``resume`` submission of the same request id,
from any frontend, re-points the tap and sends every token generated so far again from index 0
(the frontend skips what its client has). A resume for a request that ended within the window
gets its recorded outcome; one the gateway never knew (it restarted, and the journal lacked it)
is started from the submission's prompt and known tokens, with its seed: the same tokens follow.
An orphan nobody takes up within the window is cancelled.
"""

from __future__ import annotations

import asyncio
import logging
import random
import time
import uuid
from collections import OrderedDict
from dataclasses import dataclass
from functools import partial

from gateway.failover import Follower
from gateway.journal import JournalWriter, params_doc, params_from_doc
from gateway.metrics import GatewayMetrics, RequestTracker
from gateway.router import Router
from stagemesh.errors import InvalidArgument, StagemeshError, Unavailable
from stagemesh.mesh.store import JournalEntry
from stagemesh.serving.params import with_seed
from stagemesh.serving.types import Request, TokenEvent, TokenLogprobs
from stagemesh.wire.codec.scheduling import Events, Submission

logger = logging.getLogger(__name__)

RESUME_WINDOW_S = 30.0
"""How long a request whose frontend left keeps running for a client to take it up again, and
how long a finished one's outcome is kept for a client that missed its end."""
RECENT_MAX = 4096
"""Finished outcomes kept at most (the oldest go first)."""
SWEEP_S = 1.0


class FrontendLink:
    """One frontend's ``Connect`` stream as the gateway sees it."""

    def __init__(self, name: str):
        self.name = name
        """The frontend's name (its peer address until its first message names it)."""
        self.pid = 0
        """Its process id as its first message gives it (0: not yet known)."""
        self.spare = False
        """A warm spare frontend, linked but serving no client until a serving one exits."""
        self.taken = 0
        """Requests it submitted (new, resumed or resubmitted) since it attached: how the client
        port's connections spread over the frontends."""
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

    def send_tokens(self, handle: int, token_ids: list[int], logprobs: list[TokenLogprobs | None] | None = None
                    ) -> None:
        """``logprobs``: one per token (None where not known), when the request asked for them."""
        pending = self.pending
        first = len(pending.handles)
        pending.handles.extend([handle] * len(token_ids))
        pending.token_ids.extend(token_ids)
        for i, lp in enumerate(logprobs or ()):
            if lp is not None:
                pending.logprobs[first + i] = lp
        self.ready.set()

    def send_end(self, handle: int, reason: str | None, err: StagemeshError | None) -> None:
        if err is not None:
            self.pending.errors[handle] = err
        else:
            self.pending.finished[handle] = reason or "stop"
        self.ready.set()


@dataclass(eq=False)
class Tap:
    """Where one request's events go: a frontend's link and its handle there; no link while no
    frontend holds the request (an orphan, since ``orphaned_at``)."""

    link: FrontendLink | None
    handle: int
    tracker: RequestTracker
    orphaned_at: float = 0.0


@dataclass(frozen=True)
class Outcome:
    """A finished request as a late resume gets it."""

    prompt_token_ids: tuple[int, ...]
    token_ids: tuple[int, ...]
    finish_reason: str | None
    error: StagemeshError | None
    at: float
    logprobs: tuple[TokenLogprobs | None, ...] | None = None


class FrontendHub:
    """Takes the frontends' submissions and cancels, and routes their requests' events back."""

    def __init__(self, router: Router, journal: JournalWriter, metrics: GatewayMetrics,
                 resume_window_s: float = RESUME_WINDOW_S):
        self.router, self.journal, self.metrics = router, journal, metrics
        self.resume_window_s = resume_window_s
        self.links: set[FrontendLink] = set()
        self.running: dict[str, tuple[Follower, Tap]] = {}
        """Every request the gateway runs, by id, whichever frontend holds it (or none)."""
        self.recent: OrderedDict[str, Outcome] = OrderedDict()
        self._rng = random.SystemRandom()
        """Seeds of requests that came without one (frontends draw them; this is the backstop),
        so the journal holds every request's seed."""
        self._sweeper: asyncio.Task | None = None

    def start(self) -> None:
        self._sweeper = asyncio.create_task(self._sweep(), name="orphan-sweeper")

    async def stop(self) -> None:
        if self._sweeper is not None:
            self._sweeper.cancel()
            await asyncio.gather(self._sweeper, return_exceptions=True)

    # --- frontends -------------------------------------------------------------------

    def attach(self, name: str) -> FrontendLink:
        link = FrontendLink(name)
        self.links.add(link)
        logger.info("frontend %s attached (%d attached)", name, len(self.links))
        return link

    def frontends(self) -> list[dict]:
        """The attached frontends for the status document: name, pid (None: not known), open
        requests, requests taken since it attached, whether it is a spare."""
        return sorted(({"name": link.name, "pid": link.pid or None, "requests": len(link.followers),
                        "taken": link.taken, "spare": link.spare} for link in self.links), key=lambda f: f["name"])

    def detach(self, link: FrontendLink) -> None:
        """The frontend's stream ended: its requests run on as orphans until taken up again."""
        self.links.discard(link)
        now = time.monotonic()
        for follower in link.followers.values():
            _, tap = self.running.get(follower.request.request_id, (None, None))
            if tap is not None and tap.link is link:
                tap.link, tap.orphaned_at = None, now
        logger.info("frontend %s detached; its %d request(s) wait %.0f s to be resumed",
                    link.name, len(link.followers), self.resume_window_s)
        link.followers.clear()

    # --- requests --------------------------------------------------------------------

    def submit(self, link: FrontendLink, sub: Submission) -> None:
        """Admit (or, for a resume, take up) a frontend's request; a refusal goes back to it as
        that request's error."""
        if sub.handle in link.followers:
            link.send_end(sub.handle, None, InvalidArgument(f"handle {sub.handle} is already in use on this stream"))
            return
        link.taken += 1
        prompt = tuple(sub.prompt_token_ids)
        if sub.resume and sub.request_id:
            if self._take_up(link, sub.handle, sub.request_id, prompt):
                return
        known = tuple(sub.known_token_ids) if sub.resume else ()
        request = Request(sub.request_id or uuid.uuid4().hex, prompt, with_seed(sub.params, self._rng),
                          time.monotonic(), resume_token_ids=known)
        self._start(request, Tap(link, sub.handle, self.metrics.track()))

    def adopt(self, entries: list[JournalEntry]) -> int:
        """Take over the open requests a previous gateway journaled: each runs on from its
        journaled tokens as an orphan until its frontend resubmits it (or the window ends).
        Returns how many were taken over."""
        adopted, now = 0, time.monotonic()
        for entry in entries:
            if entry.request_id in self.running:
                continue
            request = Request(entry.request_id, entry.prompt_token_ids, params_from_doc(entry.params), now,
                              resume_token_ids=entry.token_ids)
            adopted += self._start(request, Tap(None, 0, self.metrics.track(), orphaned_at=now))
        return adopted

    def cancel(self, link: FrontendLink, handle: int) -> None:
        follower = link.followers.get(handle)
        if follower is not None:
            follower.cancel()

    def _start(self, request: Request, tap: Tap) -> bool:
        """Run a new request; False (its error sent) when it is refused."""
        if request.request_id in self.running:
            err = InvalidArgument(f"request id {request.request_id!r} is already running; use a new id")
            if tap.link is not None:
                tap.link.send_end(tap.handle, None, err)
            return False
        follower = Follower(
            self.router, self.journal, request,
            emit=partial(self._token, tap),
            end=partial(self._end, request.request_id, tap),
            admitted=tap.tracker.admitted,
        )
        self.running[request.request_id] = (follower, tap)
        if tap.link is not None:
            tap.link.followers[tap.handle] = follower
            if follower.emitted:  # a resume: its tokens come again from index 0
                tap.link.send_tokens(tap.handle, follower.emitted, follower.logprobs)
        try:
            follower.start()
        except StagemeshError as err:
            self._end(request.request_id, tap, err, follower)
            return False
        return True

    def _take_up(self, link: FrontendLink, handle: int, request_id: str, prompt: tuple[int, ...]) -> bool:
        """Re-point a running or recently finished request to ``link``; False when the gateway does
        not know it (the caller starts it)."""
        if (running := self.running.get(request_id)) is not None:
            follower, tap = running
            if follower.request.prompt_token_ids != prompt:
                link.send_end(handle, None, _other_prompt(request_id))
                return True
            if tap.link is not None and tap.link is not link:
                tap.link.followers.pop(tap.handle, None)
                tap.link.send_end(tap.handle, None, Unavailable(f"request {request_id!r} was taken up elsewhere"))
            tap.link, tap.handle = link, handle
            link.followers[handle] = follower
            link.send_tokens(handle, follower.emitted, follower.logprobs)
            return True
        if (done := self.recent.get(request_id)) is not None:
            if done.prompt_token_ids != prompt:
                link.send_end(handle, None, _other_prompt(request_id))
                return True
            link.send_tokens(handle, list(done.token_ids), done.logprobs)
            link.send_end(handle, done.finish_reason, done.error)
            return True
        return False

    @staticmethod
    def _token(tap: Tap, event: TokenEvent) -> None:
        link = tap.link
        if event.token_id is not None:
            tap.tracker.token()
            if link is not None:
                pending = link.pending
                if event.logprobs is not None:
                    pending.logprobs[len(pending.handles)] = event.logprobs
                pending.handles.append(tap.handle)
                pending.token_ids.append(event.token_id)
        if link is not None:
            if event.finish_reason is not None:
                link.pending.finished[tap.handle] = event.finish_reason
            link.ready.set()

    def _end(self, request_id: str, tap: Tap, err: StagemeshError | None, follower: Follower | None = None) -> None:
        follower = follower or self.running[request_id][0]
        if self.running.get(request_id, (None,))[0] is follower:
            del self.running[request_id]
        tap.tracker.outcome = "ok" if err is None else err.code.lower()
        tap.tracker.done()
        if tap.link is not None:
            tap.link.followers.pop(tap.handle, None)
            if err is not None:
                tap.link.send_end(tap.handle, None, err)
        logprobs = None if follower.logprobs is None else tuple(follower.logprobs)
        self._remember(request_id, Outcome(follower.request.prompt_token_ids, tuple(follower.emitted),
                                           follower.finish_reason, err, time.monotonic(), logprobs))

    def _remember(self, request_id: str, outcome: Outcome) -> None:
        recent = self.recent
        recent.pop(request_id, None)
        recent[request_id] = outcome
        while len(recent) > RECENT_MAX:
            recent.popitem(last=False)

    # --- orphans ---------------------------------------------------------------------

    async def _sweep(self) -> None:
        while True:
            await asyncio.sleep(SWEEP_S)
            self.sweep(time.monotonic())

    def sweep(self, now: float) -> None:
        """Cancel the orphans nobody took up within the window; forget outcomes older than it."""
        horizon = now - self.resume_window_s
        for follower, tap in list(self.running.values()):
            if tap.link is None and tap.orphaned_at < horizon:
                logger.info("request %s: no frontend took it up within %.0f s; cancelling it",
                            follower.request.request_id, self.resume_window_s)
                follower.cancel()
        recent = self.recent
        while recent and next(iter(recent.values())).at < horizon:
            recent.popitem(last=False)

    def journal_snapshot(self) -> dict[str, tuple[list[int], dict, int, list[int]]]:
        """Every running request as the journal holds it: id -> (prompt, params, chain, tokens),
        to write back into a Redis that lost it (``gateway.keeper``)."""
        return {
            rid: (list(f.request.prompt_token_ids), params_doc(f.request.params),
                  f.chain.chain_id if f.chain is not None else 0, list(f.emitted))
            for rid, (f, _) in self.running.items()
        }


def _other_prompt(request_id: str) -> InvalidArgument:
    return InvalidArgument(f"request id {request_id!r} belongs to a request with another prompt; "
                           "resume with the original prompt, or use a new id for a new request")

