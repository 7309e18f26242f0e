"""The request journal, written in batches so that no token costs a Redis round trip.

NOTE: request handlers only record what happened (``open``, ``append``, ``close``); a
background task flushes everything recorded in the last ``interval_s`` at once: the closes,
then the opens, then every request's new tokens in one ``journal_append_many`` pipeline.
Closes go first because a close is only queued for a request whose open already reached
Redis, and a request id may be reused right after it finished. A request that opens and
ends within one window never reaches Redis at all. The journal is for failover, so a Redis
outage is logged and the batch dropped; it never fails a request. Flushes never overlap (a
lock): a request's open must reach Redis before its tokens.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
from typing import Any

from stagemesh.errors import StagemeshError
from stagemesh.mesh.store import JournalEntry, Store
from stagemesh.serving.types import SamplingParams

logger = logging.getLogger(__name__)

DEFAULT_FLUSH_INTERVAL_S = 0.1
"""NOTE: 100 ms, not a step. At 5 ms the flushes were the gateway's largest cost (12% of its
samples under 128 streams, py-spy), one Redis command for every token or two. Now a flush is one
script call for all requests (``Store.journal_append_many``), but its packing is still per
request in Python: at 50 ms it was ~13% of the gateway's busy samples (py-spy ``--native``,
session 16) with a token or two per request. At 100 ms each request carries twice the tokens,
and the gateway's CPU per streamed token relative to the bench client fell 5% (0.733 -> 0.697,
BENCHMARKS.md). Nothing waits on it: a failover flushes before it reads the journal
(``resume``), the gateway's own record wins when the two disagree, and after a gateway restart
the frontends resubmit the tokens they have; only a request whose gateway and frontend both
died regenerates (same seed) what its last 100 ms added."""


def params_doc(params: SamplingParams) -> dict[str, Any]:
    """The JSON form of sampling parameters, as journaled."""
    return {**dataclasses.asdict(params), "stop_token_ids": list(params.stop_token_ids)}


def params_from_doc(doc: dict[str, Any]) -> SamplingParams:
    """Sampling parameters back from their journaled form."""
    return SamplingParams(**{**doc, "stop_token_ids": tuple(doc.get("stop_token_ids", ()))})


class JournalWriter:
    """Buffers journal writes and flushes them together every ``interval_s`` seconds."""

    def __init__(self, store: Store, *, interval_s: float = DEFAULT_FLUSH_INTERVAL_S):
        self._store = store
        self._interval_s = interval_s
        self._opens: dict[str, tuple[list[int], dict[str, Any], int]] = {}
        self._tokens: dict[str, list[int]] = {}
        self._closes: list[str] = []
        self._dirty = asyncio.Event()
        self._lock = asyncio.Lock()
        self._stopping = False
        self._failing = False
        self._task: asyncio.Task | None = None

    def start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(self._run(), name="journal-writer")

    async def stop(self) -> None:
        """Flush what is buffered and end the background task."""
        self._stopping = True
        self._dirty.set()
        if self._task is not None:
            await self._task
            self._task = None

    # --- what handlers record --------------------------------------------------------

    def open(self, request_id: str, prompt_token_ids: list[int], params: dict[str, Any], chain: int,
             tokens: list[int] = ()) -> None:
        """A new request; ``tokens``: those it already has (a request taken over or resumed)."""
        self._opens[request_id] = (list(prompt_token_ids), params, chain)
        self._tokens.pop(request_id, None)
        if tokens:
            self._tokens[request_id] = list(tokens)
        self._dirty.set()

    def append(self, request_id: str, token_id: int) -> None:
        self._tokens.setdefault(request_id, []).append(token_id)
        self._dirty.set()

    def close(self, request_id: str) -> None:
        self._tokens.pop(request_id, None)
        if self._opens.pop(request_id, None) is None:  # its open already went out
            self._closes.append(request_id)
            self._dirty.set()

    @property
    def lock(self) -> asyncio.Lock:
        """Held while a flush runs (``gateway.keeper`` rewrites the journal under it)."""
        return self._lock

    def forget(self, request_ids) -> None:
        """Drop what is buffered for these requests: a rewrite of their whole entries supersedes it."""
        ids = set(request_ids)
        for rid in ids:
            self._opens.pop(rid, None)
            self._tokens.pop(rid, None)
        self._closes = [rid for rid in self._closes if rid not in ids]

    async def resume(self, request_id: str, chain: int) -> JournalEntry | None:
        """The request's entry with everything recorded so far, after moving it to ``chain``
        (its old chain failed); None when Redis cannot give it."""
        await self.flush()
        try:
            await self._store.journal_move(request_id, chain)
            return await self._store.journal_get(request_id)
        except (StagemeshError, KeyError) as err:
            logger.warning("journal entry of %s unavailable for failover: %s", request_id, err)
            return None

    # --- flushing --------------------------------------------------------------------

    async def _run(self) -> None:
        while not self._stopping:
            await self._dirty.wait()
            if not self._stopping:
                await asyncio.sleep(self._interval_s)  # gather a window's worth of writes
            try:
                await self.flush()
            except Exception:  # a bug here must not end journaling for the gateway's lifetime
                logger.exception("journal flush failed")

    async def flush(self) -> None:
        """Write everything recorded so far (closes, opens, then tokens)."""
        async with self._lock:
            await self._flush()

    async def _flush(self) -> None:
        closes, opens, tokens = self._closes, self._opens, self._tokens
        self._closes, self._opens, self._tokens = [], {}, {}
        self._dirty.clear()
        if not (closes or opens or tokens):
            return
        try:
            if closes:  # one pipeline for all of them: no Redis connection per request
                await self._store.journal_close_many(closes)
            if opens:
                await self._store.journal_open_many(opens)
            if tokens:
                await self._store.journal_append_many(tokens)
        except StagemeshError as err:
            if not self._failing:
                logger.warning("journal writes dropped (failover cannot resume these requests): %s", err)
            self._failing = True
            return
        if self._failing:
            logger.info("journal writes reach Redis again")
        self._failing = False
