"""One request's token stream across chains: from the chain it was admitted to, and on from
where it was on another chain when that one fails.

NOTE: exactly once, in order. Tokens reach the client only through ``resumable_events``,
which records each one (``emitted`` and the journal) as it passes. When the engine raises
UNAVAILABLE (a step of the request failed, or its chain left service and its engine stopped),
the tokens the client has seen are exactly ``emitted``. The request is then re-admitted to a
healthy chain (``Router.fail_over``) as ``Request(resume_token_ids=emitted)``, read back from
the journal (prompt, parameters with the seed, tokens so far): the scheduler re-prefills prompt
+ emitted and samples on from index ``len(emitted)`` with the same seed, so the next token is
the one the failed chain would have given next (greedy or seeded), and none is repeated. The
engine stays unaware of all this: it only ever sees new requests. A Cancel that arrives while
the request is between chains (``Router.abort``) ends it there with CANCELLED.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
from collections.abc import AsyncIterator, Callable

from gateway.journal import JournalWriter, params_doc, params_from_doc
from gateway.router import Router
from stagemesh.errors import Unavailable
from stagemesh.serving.types import Request, TokenEvent

logger = logging.getLogger(__name__)

MAX_RESUMES = 8
"""Chains one request may fail over to before it fails UNAVAILABLE for good."""


async def resumable_events(
    router: Router, journal: JournalWriter, request: Request, admitted: Callable[[int], None] = lambda chain: None
) -> AsyncIterator[TokenEvent]:
    """The request's token events, failing over between chains (see the module NOTE).

    ``admitted(chain)`` is called once the first chain is chosen. Unavailable when no chain
    is healthy (at once for a new request, after ``Router.failover_wait_s`` for a running one).
    """
    rid = request.request_id
    chain = router.admit(rid)
    admitted(chain.chain_id)
    # NOTE: the engine validates at the first __anext__, synchronously, so a refused request's
    # open and close land in the same journal window and cancel out: it never reaches Redis.
    journal.open(rid, list(request.prompt_token_ids), params_doc(request.params), chain.chain_id)
    emitted: list[int] = []
    try:
        for resumes in range(MAX_RESUMES + 1):
            engine = chain.engine
            try:
                async with contextlib.aclosing(engine.generate(request)) as events:
                    async for event in events:
                        if event.token_id is not None:
                            emitted.append(event.token_id)
                            journal.append(rid, event.token_id)
                        yield event
                return
            except Unavailable as err:
                if resumes == MAX_RESUMES:
                    raise Unavailable(f"request {rid!r} failed on {resumes + 1} chains; the last: {err.message}") from err
                logger.warning("request %s: chain %d failed after %d tokens (%s); resuming it on another chain",
                               rid, chain.chain_id, len(emitted), err.message)
                chain = await router.fail_over(rid, chain, engine, err.message)
                request = await resumed(journal, request, emitted, chain.chain_id)
                router.raise_if_cancelled(rid)
    finally:
        journal.close(rid)
        router.release(rid)


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
