"""A frozen expert worker costs a batch a re-send, not the expert timeout: ``RemoteExperts``
against two expert workers on real ephemeral ports (stub runners), one of them stalled through
its fault seam. Its rows go to the other replica once the deadline that follows the measured
answer time passes, or as soon as the placement marks it down, whichever comes first."""

from __future__ import annotations

import asyncio
import time

import torch

from stage_worker.remote_experts import EXPERT_DEADLINE, RemoteExperts
from stagemesh.mesh.store import ExpertReplica
from stagemesh.runtime.deadline import Deadline, DeadlinePolicy
from stagemesh.runtime.faults import Stall
from tests.expert_worker.test_faults import LAYER, ScalingRunner, serve_expert

FAST = DeadlinePolicy(floor_s=0.3, multiple=1.0, first_s=20.0, ceiling_s=20.0, min_samples=4)
FREEZE = Stall(stall_s=1.5, for_s=60.0)
"""Longer than any deadline here; short enough that stopping the frozen worker's thread is quick."""
X = torch.arange(12.0).reshape(6, 2)  # [R, H]: 3 rows for expert 0, 3 for expert 1
COUNTS = torch.tensor([3, 3])


def _expected() -> torch.Tensor:
    return ScalingRunner().run(LAYER, (0, 1), (3, 3), X)


class Placement:
    """Stands in for the store: the placement the gateway publishes, changed by the test."""

    def __init__(self, replicas: list[ExpertReplica]):
        self.replicas = replicas

    async def get_placement(self, chain: int) -> list[ExpertReplica]:
        return self.replicas


async def _two_experts(deadline: Deadline, body):
    """e0 frozen (stalled) and e1 healthy, each holding experts 0 and 1 of ``LAYER``."""
    (s0, a0, e0), (s1, a1, e1) = [await serve_expert(w, enabled=True) for w in (0, 1)]
    e0.faults.seam.inject(FREEZE)
    replicas = [ExpertReplica(f"expert-c0-e{w}", a, {LAYER: [0, 1]}) for w, a in ((0, a0), (1, a1))]
    remote = RemoteExperts("c0-s0", replicas, asyncio.get_running_loop(), deadline=deadline)
    try:
        return await body(remote, replicas)
    finally:
        await remote.close()
        for server, servicer in ((s0, e0), (s1, e1)):
            await server.stop(None)
            await asyncio.to_thread(servicer.close)


def test_a_frozen_workers_rows_go_to_the_other_replica_once_its_deadline_passes():
    deadline = Deadline(FAST)
    for _ in range(FAST.min_samples):
        deadline.observe(0.02, 6)  # measured before: p99 20 ms for 6 rows

    async def body(remote, replicas):
        t0 = time.monotonic()
        out = await asyncio.to_thread(remote, LAYER, X, COUNTS)
        return out, time.monotonic() - t0, remote.retries

    out, took, retries = asyncio.run(_two_experts(deadline, body))
    assert torch.equal(out, _expected())
    assert retries == 1 and took < 1.2, took  # 0.32 s deadline, then the re-send


def test_a_batch_out_on_a_worker_the_placement_marks_down_is_resent_at_once():
    async def body(remote, replicas):
        placement = Placement(replicas)
        follow = asyncio.create_task(remote.follow_placement(placement, 0, interval_s=0.05))
        t0 = time.monotonic()
        call = asyncio.ensure_future(asyncio.to_thread(remote, LAYER, X, COUNTS))
        await asyncio.sleep(0.3)
        placement.replicas = [ExpertReplica(r.worker_id, r.address, r.experts, live=r.worker_id != "expert-c0-e0")
                              for r in replicas]
        out = await call
        follow.cancel()
        return out, time.monotonic() - t0

    # not warmed up: the deadline would be the 20 s first-answer allowance
    out, took = asyncio.run(_two_experts(Deadline(FAST), body))
    assert torch.equal(out, _expected()) and took < 1.2, took


def test_the_default_policy_fences_a_frozen_expert_within_seconds_once_warm():
    deadline = Deadline(EXPERT_DEADLINE)
    assert deadline.limit(8) == EXPERT_DEADLINE.first_s == 30.0  # warm-up: as before
    for _ in range(EXPERT_DEADLINE.min_samples):
        deadline.observe(0.15, 8)  # the slowest p99 measured on the CI VM
    assert deadline.limit(8) < 2.0
