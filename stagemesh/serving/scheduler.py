"""The pure scheduler: requests in, step plans out, step results back in, token events out.

NOTE: admission is exact and conservative. A sequence reserves KV blocks for every token it
could ever hold (prompt + resumed tokens + the new tokens it may still generate) before it
runs, so a running sequence never runs out of KV blocks and nothing is ever preempted. A
request that could never fit is refused at ``add``; one that fits later waits (FCFS).

Each plan is one micro-batch. Up to ``num_slots`` plans are in flight at once; a sequence in
an in-flight plan is *busy* until that plan's ``update`` (or ``fail``). Within a plan, decode
chunks (one token) come first, then prefill chunks cut to the token budget (chunked prefill).
No await, no clock reads, no I/O: the same object drives the in-process engine and the mesh.

NOTE: overlap (``SchedulerConfig.overlap``). Once every slot is in flight (or nothing else is
ready), one more plan may go with the sequences of the OLDEST in-flight plan, whose tokens come
back first: each one's next prefill chunk or, after a sampling chunk, a decode whose token is
``PENDING_TOKEN`` ("the token you are sampling for me now"). The chain's first stage fills it
in (from its own sample, or from the last stage's answer it relays), so it goes from one step
straight into the next. A sequence is never more than two plans deep nor looks ahead past
``max_new_tokens``; after a stop token the lookahead's token is dropped and its KV freed.
Steps must be applied (``update``/``fail``) in the order they were scheduled.

NOTE: just over 400 lines, a fifth of them docstrings: one pure object (admission, plans,
results, aborts) whose parts share the ``_Sequence`` state; split, each part would reach into it.
"""

from __future__ import annotations

import logging
import math
import random
from collections import deque
from dataclasses import dataclass, field

from stagemesh.errors import InvalidArgument, ResourceExhausted
from stagemesh.serving.blocks import BlockAllocator, blocks_needed
from stagemesh.serving.params import SEED_RANGE, sample_row, spec_from_fields
from stagemesh.serving.types import (
    PENDING_TOKEN,
    Request,
    SeqChunk,
    StepPlan,
    StepResult,
    TokenEvent,
    TokenLogprobs,
    seq_chunk,
    token_event,
)

logger = logging.getLogger(__name__)



@dataclass(frozen=True, kw_only=True)
class SchedulerConfig:
    """Limits of one chain's scheduler."""

    block_size: int = 16
    """Tokens per KV-cache block (the same on every stage)."""
    num_blocks: int
    """KV blocks available on EVERY stage of the chain: the minimum over its stages."""
    max_num_seqs: int = 256
    """Sequences in one step (one micro-batch) at most."""
    max_num_batched_tokens: int = 512
    """Tokens in one step at most (decode tokens plus prefill chunks)."""
    num_slots: int = 1
    """Micro-batches in flight at once; the mesh uses its number of stages."""
    max_model_len: int
    """The model's context: a prompt plus its generated tokens never exceed it."""
    eos_token_ids: tuple[int, ...] = ()
    """The model's end-of-sequence ids: generation stops after one (unless ``ignore_eos``)."""
    max_waiting: int = 1024
    """Requests waiting for admission at most; one more is refused as ``queue full``."""
    overlap: bool = False
    """Schedule one more step than ``num_slots`` while they are in flight (see the module NOTE);
    the chain's first stage must fill in ``PENDING_TOKEN``."""

    def __post_init__(self) -> None:
        for name in ("block_size", "num_blocks", "max_num_seqs", "max_num_batched_tokens",
                     "num_slots", "max_model_len", "max_waiting"):
            value = getattr(self, name)
            if not isinstance(value, int) or value <= 0:
                raise ValueError(f"SchedulerConfig.{name}={value!r} must be a positive integer")
        bad = [t for t in self.eos_token_ids if not isinstance(t, int) or t < 0]
        if bad:
            raise ValueError(f"SchedulerConfig.eos_token_ids has {bad}; token ids must be integers >= 0")

    @property
    def kv_budget_tokens(self) -> int:
        return self.num_blocks * self.block_size


@dataclass(eq=False)
class _Sequence:
    """One request's state inside the scheduler."""

    request: Request
    seq_id: int
    seed: int
    token_ids: list[int]
    """Prompt, resumed tokens, then tokens generated here."""
    num_prefill: int
    """Known tokens at admission (prompt + resumed) that must be prefilled."""
    max_generated: int
    """Generated tokens (resumed ones included) at which it finishes with ``length``."""
    num_blocks: int
    """KV blocks it reserves while admitted."""
    num_computed: int = 0
    """Tokens in the KV cache after the plans applied so far."""
    num_scheduled: int = 0
    """Tokens in the KV cache once the in-flight plans are applied too: where its next chunk starts."""
    num_generated: int = 0
    in_flight: int = 0
    """In-flight plans that hold a chunk of it (at most 2, with overlap)."""
    pending: int = 0
    """In-flight chunks that sample: tokens it has coming that ``token_ids`` does not hold yet."""
    last_step: int = -1
    """The step id of the latest plan that held a chunk of it."""
    aborted: bool = False
    reserved_blocks: list[int] = field(default_factory=list)
    sample_row: dict = field(default_factory=dict)
    """Its request's per-row sampling fields, taken once (``serving.params.sample_row``)."""

    @property
    def request_id(self) -> str:
        return self.request.request_id

    @property
    def in_decode(self) -> bool:
        """Its known tokens are all scheduled: what comes next is one token at a time."""
        return self.num_scheduled >= self.num_prefill


class Scheduler:
    """Continuous batching over micro-batch slots with exact, up-front KV reservation."""

    def __init__(self, config: SchedulerConfig):
        self.config = config
        self._blocks = BlockAllocator(config.num_blocks)
        self._waiting: deque[_Sequence] = deque()
        self._running: list[_Sequence] = []
        self._by_request: dict[str, _Sequence] = {}
        self._by_seq: dict[int, _Sequence] = {}
        self._in_flight: dict[int, StepPlan] = {}
        self._pending_free: list[int] = []
        self._next_seq_id = 0
        self._next_step_id = 0
        self._rng = random.SystemRandom()

    # --- requests in ---------------------------------------------------------------

    def add(self, request: Request) -> list[TokenEvent]:
        """Queue a validated request. Returns events produced at once: normally none; one
        end-only event (``stop`` or ``length``) when a resumed request has ended already."""
        if request.request_id in self._by_request:
            raise InvalidArgument(f"request id {request.request_id!r} is already running; use a new id")
        seq = self._new_sequence(request)
        if request.resume_token_ids:  # it may have ended before it moved: its last token says so
            reason = self._finish_reason(seq, request.resume_token_ids[-1])
            if reason is not None:
                return [TokenEvent(request.request_id, None, seq.num_generated, reason)]
        self._check_fits(seq)
        if len(self._waiting) >= self.config.max_waiting:
            raise ResourceExhausted(
                f"queue full: {len(self._waiting)} requests are waiting (max_waiting="
                f"{self.config.max_waiting}); retry later or add chains"
            )
        self._next_seq_id += 1
        self._waiting.append(seq)
        self._by_request[request.request_id] = seq
        return []

    def _new_sequence(self, request: Request) -> _Sequence:
        p, cfg = request.params, self.config
        num_prompt, num_resumed = len(request.prompt_token_ids), len(request.resume_token_ids)
        max_generated = min(p.max_new_tokens, cfg.max_model_len - num_prompt)
        # prompt + resumed + (max_generated - resumed) new tokens: every token it can ever hold.
        reserve = num_prompt + max_generated
        return _Sequence(
            request=request,
            seq_id=self._next_seq_id,
            seed=p.seed if p.seed is not None else self._rng.randrange(SEED_RANGE),
            token_ids=[*request.prompt_token_ids, *request.resume_token_ids],
            num_prefill=num_prompt + num_resumed,
            max_generated=max_generated,
            num_generated=num_resumed,
            num_blocks=blocks_needed(reserve, cfg.block_size),
            sample_row=sample_row(p),
        )

    def _check_fits(self, seq: _Sequence) -> None:
        if seq.num_blocks > self.config.num_blocks:
            tokens = len(seq.request.prompt_token_ids) + seq.max_generated
            raise ResourceExhausted(
                f"request needs {tokens} tokens of KV cache ({seq.num_blocks} blocks) but the chain "
                f"holds {self.config.kv_budget_tokens} tokens ({self.config.num_blocks} blocks); "
                "lower max_new_tokens, shorten the prompt, or give the stages more KV memory"
            )

    def seed_of(self, request_id: str) -> int:
        """The seed of a waiting or running request (drawn at ``add`` when it had none)."""
        return self._by_request[request_id].seed

    def seq_id_of(self, request_id: str) -> int:
        """The sequence id of a waiting or running request."""
        return self._by_request[request_id].seq_id

    # --- plans out -----------------------------------------------------------------

    def schedule(self, now: float) -> StepPlan | None:
        """The next micro-batch, or None when every slot is in flight or there is nothing to do.

        ``now`` is the caller's clock; nothing here depends on it yet (deadlines will).
        """
        if len(self._in_flight) >= self.config.num_slots + self.config.overlap:
            return None
        self._admit()
        share = min(self.config.max_num_seqs, math.ceil(len(self._running) / self.config.num_slots))
        ready = [s for s in self._running if not (s.in_flight or s.aborted)]
        if self.config.overlap and (len(self._in_flight) >= self.config.num_slots or not ready):
            oldest = next(iter(self._in_flight), None)
            ready += [s for s in self._running if self._looks_ahead(s, oldest)]  # the extra plan
        chunks = self._decode_chunks(ready, share)
        budget = self.config.max_num_batched_tokens - len(chunks)
        chunks += self._prefill_chunks(ready, share - len(chunks), budget)
        if not chunks and not self._pending_free:
            return None
        plan = StepPlan(self._next_step_id, tuple(chunks), tuple(self._pending_free))
        self._next_step_id += 1
        self._pending_free = []
        self._in_flight[plan.step_id] = plan
        return plan

    def _looks_ahead(self, seq: _Sequence, oldest: int | None) -> bool:
        """Whether ``seq``, in flight, may have a lookahead chunk in the next plan (overlap);
        ``oldest`` is the step id of the oldest plan in flight."""
        if seq.aborted or seq.in_flight != 1 or seq.last_step != oldest:
            return False
        # One chunk in flight, in the oldest plan: the next prefill chunk is known already; a
        # decode after a sampling chunk takes the pending token, unless that token is its last by length.
        return seq.pending == 0 or seq.num_generated + seq.pending < seq.max_generated

    def _admit(self) -> None:
        """Move waiting requests to running, first come first served, while blocks allow."""
        while self._waiting and self._blocks.can_allocate(self._waiting[0].num_blocks):
            seq = self._waiting.popleft()
            seq.reserved_blocks = self._blocks.allocate(seq.num_blocks)
            self._running.append(seq)
            self._by_seq[seq.seq_id] = seq

    def _decode_chunks(self, ready: list[_Sequence], max_seqs: int) -> list[SeqChunk]:
        budget = min(max_seqs, self.config.max_num_batched_tokens)
        decodes = [s for s in ready if s.in_decode][: max(budget, 0)]
        return [self._chunk(s, 1) for s in decodes]

    def _prefill_chunks(self, ready: list[_Sequence], max_seqs: int, budget: int) -> list[SeqChunk]:
        chunks: list[SeqChunk] = []
        for seq in (s for s in ready if not s.in_decode):
            if len(chunks) >= max_seqs or budget <= 0:
                break
            n = min(seq.num_prefill - seq.num_scheduled, budget)
            chunks.append(self._chunk(seq, n))
            budget -= n
        return chunks

    def _chunk(self, seq: _Sequence, n: int) -> SeqChunk:
        """The next ``n`` unscheduled tokens (the pending one as ``PENDING_TOKEN``), sampling
        when they reach the last token it will know; marks them in flight."""
        start = seq.num_scheduled
        tokens = tuple(seq.token_ids[start : start + n]) or (PENDING_TOKEN,)
        sample = None
        if start + n == len(seq.token_ids) + seq.pending:
            sample = spec_from_fields(seq.sample_row, seed=seq.seed, index=seq.num_generated + seq.pending)
            seq.pending += 1
        seq.num_scheduled += n
        seq.in_flight += 1
        seq.last_step = self._next_step_id
        return seq_chunk(seq.seq_id, start, tokens, sample)

    # --- results back --------------------------------------------------------------

    def update(self, plan: StepPlan, result: StepResult) -> list[TokenEvent]:
        """Apply one step's sampled tokens; returns the token events in chunk order."""
        self._check_result(plan, result)
        del self._in_flight[plan.step_id]
        events: list[TokenEvent] = []
        for chunk in plan.chunks:
            seq = self._landed(chunk)
            if seq is None:
                continue
            seq.num_computed += len(chunk.token_ids)
            if seq.aborted:
                if not seq.in_flight:
                    self._finish(seq)
            elif chunk.sample is not None:
                events.append(self._append_token(seq, result.tokens[chunk.seq_id], result.logprobs.get(chunk.seq_id)))
        return events

    def _landed(self, chunk: SeqChunk) -> _Sequence | None:
        """The sequence of a chunk whose plan came back, no longer in flight there; None when it
        finished meanwhile (a stop token or a failure in an earlier plan: the chunk was a lookahead)."""
        seq = self._by_seq.get(chunk.seq_id)
        if seq is None:
            return None
        seq.in_flight -= 1
        if chunk.sample is not None:
            seq.pending -= 1
        return seq

    def _check_result(self, plan: StepPlan, result: StepResult) -> None:
        """Refuse a result that does not answer an in-flight plan, before changing any state."""
        if plan.step_id not in self._in_flight:
            raise ValueError(f"step {plan.step_id} is not in flight; update() each plan once")
        if result.step_id != plan.step_id:
            raise ValueError(f"result of step {result.step_id} given for plan of step {plan.step_id}")
        missing = [c.seq_id for c in plan.chunks if c.sample is not None and c.seq_id not in result.tokens]
        if missing:
            raise ValueError(f"step {plan.step_id} returned no token for sequences {missing}: the chain is broken")

    def _append_token(self, seq: _Sequence, token: int, logprobs: TokenLogprobs | None = None) -> TokenEvent:
        seq.token_ids.append(token)
        seq.num_generated += 1
        reason = self._finish_reason(seq, token)
        if reason is not None:
            self._finish(seq)
        return token_event(seq.request_id, token, seq.num_generated - 1, reason, logprobs)

    def _finish_reason(self, seq: _Sequence, token: int) -> str | None:
        p = seq.request.params
        if token in p.stop_token_ids or (not p.ignore_eos and token in self.config.eos_token_ids):
            return "stop"
        if seq.num_generated >= seq.max_generated:
            return "length"
        return None

    def _finish(self, seq: _Sequence) -> None:
        """Release a running sequence's reservation and queue its KV cache to be freed."""
        self._running.remove(seq)
        del self._by_seq[seq.seq_id]
        self._by_request.pop(seq.request_id, None)
        self._blocks.free(seq.reserved_blocks)
        seq.reserved_blocks = []
        self._pending_free.append(seq.seq_id)

    # --- cancellation and failure ----------------------------------------------------

    def abort(self, request_id: str) -> bool:
        """Drop a request wherever it is; False when it is not known (finished or never added)."""
        seq = self._by_request.pop(request_id, None)
        if seq is None:
            return False
        if seq in self._waiting:
            self._waiting.remove(seq)
        elif seq.in_flight:
            seq.aborted = True  # released when its plan comes back; its token is dropped
        else:
            self._finish(seq)
        return True

    def fail(self, plan: StepPlan) -> list[str]:
        """A plan's step failed: finish its sequences; returns their request ids to report.

        The plan's frees are queued again, since a broken chain may not have applied them
        (a stage must treat freeing an unknown sequence id as a no-op).
        """
        if self._in_flight.pop(plan.step_id, None) is None:
            raise ValueError(f"step {plan.step_id} is not in flight; fail() each plan once")
        failed: list[str] = []
        for chunk in plan.chunks:
            seq = self._landed(chunk)
            if seq is None:
                continue
            if not seq.aborted:
                failed.append(seq.request_id)
            self._finish(seq)  # a lookahead chunk of it in a later plan is then dropped there
        self._pending_free.extend(plan.free)
        logger.warning("step %d failed; finished requests %s", plan.step_id, failed)
        return failed

    # --- introspection -------------------------------------------------------------

    @property
    def num_waiting(self) -> int:
        return len(self._waiting)

    @property
    def num_running(self) -> int:
        return len(self._running)

    @property
    def num_in_flight(self) -> int:
        return len(self._in_flight)

    @property
    def kv_blocks_used(self) -> int:
        return self._blocks.num_used

    @property
    def kv_blocks_waiting(self) -> int:
        """KV blocks the waiting requests will reserve when they are admitted."""
        return sum(s.num_blocks for s in self._waiting)

    @property
    def queued_tokens(self) -> int:
        """Known tokens not computed yet: the prefill still ahead of waiting and running sequences."""
        return sum(max(0, s.num_prefill - s.num_computed) for s in (*self._waiting, *self._running))

    def cached_seq_ids(self) -> list[int]:
        """Sequence ids whose KV cache a stage may still hold: every admitted sequence, those
        queued to be freed, and those the in-flight plans free (a chain that lost those plans
        may never have applied them). Sorted."""
        ids = {*self._by_seq, *self._pending_free}
        for plan in self._in_flight.values():
            ids.update(plan.free)
        return sorted(ids)

    def has_unfinished(self) -> bool:
        return bool(self._waiting or self._running)
