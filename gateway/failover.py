"""One request's token stream across chains: from the chain it was admitted to, and on from
where it was on another chain when that one fails.

NOTE: exactly once, in order. Tokens reach the request's consumer only through ``Follower``,
which records each one (``emitted`` and the journal) as it passes. When the engine ends the
request with UNAVAILABLE (a step of it failed, or its chain left service and its engine
stopped), the tokens the consumer has seen are exactly ``emitted``. The request is then
re-admitted to a healthy chain (``Router.fail_over``) as ``Request(resume_token_ids=emitted)``,
read back from the journal (prompt, parameters with the seed, tokens so far): the scheduler
re-prefills prompt + emitted and samples on from index ``len(emitted)`` with the same seed, so
the next token is the one the failed chain would have given next (greedy or seeded), and none
is repeated. The engines stay unaware of all this: they only ever see new requests. A Cancel
that arrives while the request is between chains (``Router.abort``) ends it there with
CANCELLED.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
from collections.abc import Callable

from gateway.journal import JournalWriter, params_doc, params_from_doc
from gateway.router import ChainHandle, Router
from stagemesh.errors import StagemeshError, Unavailable
from stagemesh.serving.types import Request, TokenEvent, TokenLogprobs

logger = logging.getLogger(__name__)

MAX_RESUMES = 8
"""Chains one request may fail over to before it fails UNAVAILABLE for good."""


class Follower:
    """Follows one request across chains; ``emit`` gets its token events, each once and in order,
    then ``end`` is called once: with None when it finished, else with the error that ended it."""

    def __init__(
        self,
        router: Router,
        journal: JournalWriter,
        request: Request,
        emit: Callable[[TokenEvent], None],
        end: Callable[[StagemeshError | None], None],
        admitted: Callable[[int], None] = lambda chain: None,
    ):
        self.router, self.journal, self.request = router, journal, request
        self.emit, self.end, self.admitted = emit, end, admitted
        self.emitted: list[int] = list(request.resume_token_ids)
        """Every token of the request so far (those it was resumed with first)."""
        self.logprobs: list[TokenLogprobs | None] | None = (
            [None] * len(self.emitted) if request.params.logprobs else None)
        """With ``params.logprobs``: each emitted token's log-probabilities, for a resume to send
        again; None for the tokens it was resumed with (the journal keeps token ids only)."""
        self.finish_reason: str | None = None
        self.chain: ChainHandle | None = None
        self._engine = None
        self._resumes = 0
        self._moving: asyncio.Task | None = None
        self._ended = False

    def start(self) -> None:
        """Admit the request to a chain and queue it there; a refusal (no healthy chain, a bad
        request, a running id) raises here and nothing is left behind."""
        rid = self.request.request_id
        chain = self.router.admit(rid)
        # NOTE: the engine validates in ``add``, so a refused request's open and close land in the
        # same journal window and cancel out: it never reaches Redis.
        self.journal.open(rid, list(self.request.prompt_token_ids), params_doc(self.request.params), chain.chain_id,
                          tokens=self.emitted)
        try:
            self._run_on(chain, self.request)
        except BaseException:
            self.journal.close(rid)
            self.router.release(rid)
            raise

    def cancel(self) -> None:
        """Cancel the request wherever it is (running, waiting, or between chains)."""
        if not self._ended:
            self.router.abort(self.request.request_id)

    def _run_on(self, chain: ChainHandle, request: Request) -> None:
        self.chain, self._engine = chain, chain.engine
        self.admitted(chain.chain_id)
        chain.engine.add(request, self._consume)

    def _consume(self, item: TokenEvent | StagemeshError) -> None:
        if isinstance(item, TokenEvent):
            if item.token_id is not None:
                self.emitted.append(item.token_id)
                if self.logprobs is not None:
                    self.logprobs.append(item.logprobs)
                self.journal.append(self.request.request_id, item.token_id)
            self.emit(item)
            if item.finish_reason is not None:
                self.finish_reason = item.finish_reason
                self._finish(None)
        elif isinstance(item, Unavailable):
            self._moving = asyncio.get_running_loop().create_task(self._fail_over(item))
        else:
            self._finish(item)

    async def _fail_over(self, err: Unavailable) -> None:
        """Move the request to another chain (again, if the next one fails it at once)."""
        rid = self.request.request_id
        while True:
            if self._resumes == MAX_RESUMES:
                why = f"request {rid!r} failed on {self._resumes + 1} chains; the last: {err.message}"
                self._finish(Unavailable(why))
                return
            self._resumes += 1
            logger.warning("request %s: chain %d failed after %d tokens (%s); resuming it on another chain",
                           rid, self.chain.chain_id, len(self.emitted), err.message)
            try:
                chain = await self.router.fail_over(rid, self.chain, self._engine, err.message)
                request = await resumed(self.journal, self.request, self.emitted, chain.chain_id)
                self.router.raise_if_cancelled(rid)
            except StagemeshError as failure:  # no healthy chain in time, or cancelled meanwhile
                self._finish(failure)
                return
            try:
                self._run_on(chain, request)
                return
            except Unavailable as again:  # that chain's engine stopped meanwhile: on to the next
                err = again
            except StagemeshError as failure:
                self._finish(failure)
                return

    def _finish(self, err: StagemeshError | None) -> None:
        if self._ended:
            return
        self._ended = True
        self.journal.close(self.request.request_id)
        self.router.release(self.request.request_id)
        self.end(err)


async def resumed(journal: JournalWriter, request: Request, emitted: list[int], chain: int) -> Request:
    """``request`` as the journal has it, moved to ``chain``, with the tokens emitted so far to
    re-prefill. Should the journal disagree with what the client was sent (its writes were
    dropped while Redis was out), the gateway's own record wins."""
    entry = await journal.resume(request.request_id, chain)
    if entry is None or entry.prompt_token_ids != request.prompt_token_ids or entry.token_ids != tuple(emitted):
        logger.warning("request %s: the journal lacks what was streamed (%s); resuming from the gateway's record",
                       request.request_id, "no entry" if entry is None else f"{len(entry.token_ids)} of {len(emitted)} tokens")
        return dataclasses.replace(request, resume_token_ids=tuple(emitted))
    return Request(request.request_id, entry.prompt_token_ids, params_from_doc(entry.params), request.arrival_time,
                   resume_token_ids=entry.token_ids)
