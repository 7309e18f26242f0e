"""The stage's side of expert parallelism: ``RemoteExperts`` runs a MoE layer's experts on expert workers.

NOTE: threads. ``SparseMoE`` calls ``RemoteExperts`` on the stage's step thread, inside
synchronous torch code. The streams to the expert workers (grpc.aio ``Expert.Run``, one
long-lived ``ForwardStream`` per worker) live on the worker process's event loop. One call
splits the layer's grouped rows by owning worker (``stagemesh.mesh.placement.split_rows``), hands
the loop ONE coroutine (``asyncio.run_coroutine_threadsafe``) that sends every worker its
request at once and gathers the answers, and blocks on its result. So a MoE layer of a
micro-batch costs one round trip, all workers in parallel, never one per token or expert.

NOTE: failures. The placement (which worker holds which expert, which are live) is the
gateway's, read from Redis every ``POLL_S`` (``follow_placement``). When a worker's answer is
UNAVAILABLE (it died, drained, its stream broke, it did not answer within the deadline, or the
placement marked it down while its batch was out), its rows are sent again, in the same call,
to other live replicas of the same experts, and the worker is avoided for ``AVOID_S`` (until
the gateway has caught up). Only when an expert with rows has no replica left does the step
fail: ``UNAVAILABLE`` naming the expert and layer.

NOTE: the deadline. A frozen expert worker (SIGSTOP) keeps its stream open, so only a
deadline finds it: ``EXPERT_DEADLINE``, which follows the measured answer time of this
stage's expert batches (``stagemesh.runtime.faults.Deadline``), scaled by the rows sent.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import threading
import time
from functools import partial
from typing import Any

import torch

from stagemesh.errors import Internal, StagemeshError, Unavailable
from stagemesh.mesh.placement import NoReplica, Share, grouped_spans, holders, split_rows
from stagemesh.mesh.store import ExpertReplica, Store
from stagemesh.runtime.deadline import Deadline, DeadlinePolicy
from stagemesh.runtime.tls import MeshTLS
from stagemesh.v1 import expert_pb2, expert_pb2_grpc
from stagemesh.wire.codec.experts import ExpertBatch, expert_output_from_pb, expert_request_to_pb, failed_expert_to_pb
from stagemesh.wire.streams import ForwardStream, StreamRpc

log = logging.getLogger(__name__)

EXPERT_RUN = StreamRpc(
    "Run",
    lambda channel: expert_pb2_grpc.ExpertStub(channel).Run,
    lambda step_id, err: failed_expert_to_pb(step_id, err),
)
EXPERT_DEADLINE = DeadlinePolicy(floor_s=1.0, multiple=4.0, first_s=30.0, ceiling_s=30.0)
"""How long one expert batch (a micro-batch's rows of one layer) may take before its worker
counts as frozen and its rows go to another replica.

NOTE: measured on the 2-core CI VM, tiny Mixtral on CPU, tp=2 x ep=2 (2 replicas) x dp=2,
16-32 greedy streams: a batch answers in 7 ms at p50 and 25-30 ms at p99 on a quiet VM (the
slowest of 800: 60 ms), 72 ms at p99 while other work loaded the cores; a batch can wait
behind another stage's on the worker's one compute thread. 1 s + 4 × p99 allows 1.1-1.3 s:
over ten times the slowest healthy answer seen, and well inside the gateway's step deadline
(``gateway.chain_client.STEP_DEADLINE``, 2 s and up), so a frozen expert worker costs its
batch a re-send, not the chain. Until 8 batches are measured a batch gets the 30 s of before."""
AVOID_S = 5.0
"""After a worker failed a batch, how long its replicas are passed over while others hold the experts."""
POLL_S = 1.0
"""How often the stage reads the placement from Redis."""


class RemoteExperts:
    """``Experts`` (see ``stagemesh.model.moe``) served by chain ``chain``'s expert workers."""

    def __init__(self, name: str, replicas: list[ExpertReplica], loop: asyncio.AbstractEventLoop,
                 *, deadline: Deadline | None = None, tls: MeshTLS | None = None):
        self.name = name
        self.tls = tls
        """The stage's mesh identity, which its calls to expert workers present (mTLS); None: plaintext."""
        """The stage's name in messages, e.g. ``c0-s1``."""
        self.replicas = replicas
        """The placement as last read: replaced whole by ``follow_placement`` (never mutated)."""
        self.deadline = deadline if deadline is not None else Deadline(EXPERT_DEADLINE)
        """How long a batch may take (event loop only)."""
        self._loop = loop
        self._links: dict[str, ForwardStream] = {}  # event loop only
        self._avoid: dict[str, float] = {}  # worker id -> monotonic time until which it is passed over (step thread)
        self._batch_ids = itertools.count(1)
        self._lock = threading.Lock()
        self.bytes_sent = 0
        """Bytes of rows (tensor payload) sent to expert workers, retries included."""
        self.rows_sent = 0
        self.retries = 0
        """Rounds that re-sent a failed worker's rows to other replicas."""

    # --- on the step thread ----------------------------------------------------------------

    def __call__(self, layer: int, x: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
        """x: [R, H] rows grouped by expert (``counts[e]`` for expert ``e``) -> their expert outputs, same order."""
        out = torch.empty_like(x)
        spans = grouped_spans(counts.tolist())
        failed: dict[str, str] = {}  # worker id -> why, in this call
        while spans:
            shares = self._split(layer, spans, failed)
            spans = []
            for worker, (share, result) in self._round(layer, x, shares).items():
                if isinstance(result, Unavailable):
                    failed[worker] = result.message
                    self._avoid[worker] = time.monotonic() + AVOID_S
                    spans += share.pieces
                else:
                    out[_rows(share, x.device)] = result.to(x.device, x.dtype)
            if spans:
                with self._lock:
                    self.retries += 1
                log.warning("stage %s: layer %d: resending %d rows to other replicas (%s)", self.name, layer,
                            sum(e - s for _, s, e in spans), "; ".join(failed.values()))
        return out

    def _split(self, layer: int, spans: list[tuple[int, int, int]], failed: dict[str, str]) -> dict[str, Share]:
        """Split ``spans`` over the live holders, preferring workers that have not failed lately."""
        now = time.monotonic()
        recent = frozenset(w for w, until in self._avoid.items() if until > now)
        loose = holders(self.replicas, layer, frozenset(failed))
        strict = holders(self.replicas, layer, recent | frozenset(failed))
        who = {expert: strict.get(expert) or workers for expert, workers in loose.items()}
        try:
            return split_rows(spans, who)
        except NoReplica as err:
            why = f"; tried: {'; '.join(failed.values())}" if failed else ""
            raise Unavailable(
                f"stage {self.name}: no live expert worker holds expert {err.expert} of layer {layer}{why}"
            ) from None

    def _round(self, layer: int, x: torch.Tensor, shares: dict[str, Share]) -> dict[str, tuple[Share, Any]]:
        """Send every share at once; worker id -> (share, its output [rows, H] or the Unavailable it got)."""
        addresses = {r.worker_id: r.address for r in self.replicas}
        requests = {}
        for worker, share in shares.items():
            batch = ExpertBatch(next(self._batch_ids), layer, tuple(share.expert_ids), tuple(share.counts),
                                x[_rows(share, x.device)])
            requests[worker] = (addresses[worker], expert_request_to_pb(batch))
        with self._lock:
            self.bytes_sent += sum(len(r.hidden.data) for _, r in requests.values())
            self.rows_sent += sum(s.num_rows for s in shares.values())
        backstop = self.deadline.policy.ceiling_s + 10  # _send_all answers within its deadline
        replies = asyncio.run_coroutine_threadsafe(self._send_all(requests), self._loop).result(backstop)
        return {worker: (shares[worker], self._decode(worker, replies[worker], shares[worker])) for worker in shares}

    def _decode(self, worker: str, reply: expert_pb2.ExpertResponse, share: Share) -> torch.Tensor | Unavailable:
        try:
            return expert_output_from_pb(reply, share.num_rows)
        except Unavailable as err:
            return err
        except StagemeshError as err:
            raise type(err)(f"stage {self.name}: expert worker {worker}: {err.message}") from None
        except ValueError as err:
            raise Internal(f"stage {self.name}: expert worker {worker} answered a malformed batch: {err}") from None

    # --- on the event loop -----------------------------------------------------------------

    async def _send_all(
        self, requests: dict[str, tuple[str, expert_pb2.ExpertRequest]]
    ) -> dict[str, expert_pb2.ExpertResponse]:
        """worker id -> (its address, its request) in; worker id -> its answer out (never raises).
        Every healthy answer's time feeds the deadline."""
        limit = self.deadline.limit(max(_rows_of(r) for _, r in requests.values()))
        start = self._loop.time()
        answers = {}
        for worker, (address, request) in requests.items():
            answers[worker] = answer = self._link(worker, address).send(request)
            answer.add_done_callback(partial(self._timed, start, _rows_of(request)))
        _, late = await asyncio.wait(answers.values(), timeout=limit)
        for worker, answer in answers.items():
            if answer in late:  # reset() answers it UNAVAILABLE at once
                self._links[worker].reset(f"it did not answer a batch within {limit:.2f} s "
                                          f"(deadline from its answer time: {self.deadline.describe()})")
        return {worker: answer.result() for worker, answer in answers.items()}

    def _timed(self, start: float, rows: int, answer: asyncio.Future[expert_pb2.ExpertResponse]) -> None:
        if not answer.cancelled() and not answer.result().HasField("error"):
            self.deadline.observe(self._loop.time() - start, rows)

    def _link(self, worker: str, address: str) -> ForwardStream:
        link = self._links.get(worker)
        if link is None or link.address != address:
            if link is not None:
                link.reset(f"the placement moved it to {address}")
            link = self._links[worker] = ForwardStream(address, partial(self._unreachable, worker, address), EXPERT_RUN,
                                                        tls=self.tls)
        return link

    def _unreachable(self, worker: str, address: str, detail: str) -> Unavailable:
        return Unavailable(f"expert worker {worker} at {address} is unreachable: {detail}")

    async def follow_placement(self, store: Store, chain: int, interval_s: float = POLL_S) -> None:
        """Keep ``replicas`` current from the gateway's placement in Redis (until cancelled)."""
        while True:
            try:
                replicas = await store.get_placement(chain)
            except StagemeshError as err:
                log.warning("stage %s: cannot read the expert placement: %s", self.name, err.message)
                replicas = []
            if replicas and replicas != self.replicas:
                down = [r.worker_id for r in replicas if not r.live]
                log.info("stage %s: expert placement changed; down: %s", self.name, down or "none")
                self._give_up_on({r.worker_id for r in replicas if not r.live} - self._down())
                self.replicas = replicas
            await asyncio.sleep(interval_s)

    def _down(self) -> set[str]:
        return {r.worker_id for r in self.replicas if not r.live}

    def _give_up_on(self, workers: set[str]) -> None:
        """Workers the gateway just marked down: a batch still out on one is answered UNAVAILABLE
        now (its rows go to another replica) rather than at its deadline."""
        for worker in workers:
            if (link := self._links.get(worker)) is not None:
                link.reset("the gateway marked it down")

    def figures(self) -> dict[str, Any]:
        with self._lock:
            return {"expert_bytes_sent": self.bytes_sent, "expert_rows_sent": self.rows_sent,
                    "expert_retries": self.retries}

    async def close(self) -> None:
        await asyncio.gather(*(link.close("the stage is shutting down") for link in self._links.values()))


def _rows_of(request: expert_pb2.ExpertRequest) -> int:
    return sum(request.counts)


def _rows(share: Share, device: torch.device) -> torch.Tensor:
    """The indices of a share's rows in the grouped rows, in the order they are sent."""
    return torch.cat([torch.arange(start, end, device=device) for _, start, end in share.pieces])
