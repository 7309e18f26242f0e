"""The per-step Python work of the front door and a stage, timed alone on one core.

What it times, for one decode step of ``--rows`` running sequences (each row one token):
the gateway's ``Scheduler.schedule`` (a plan: a ``SeqChunk`` and a ``SampleSpec`` per row),
``plan_to_pb`` (the StageRequest the gateway sends), a stage's ``plan_from_pb`` (the plan it
runs: the last stage's with the rows' sampling parameters, ``plan_from_pb_mid`` a stage's before
it, without them) and ``AttnMetadata.build`` (the attention metadata it builds once for all its layers, one
torch thread), the gateway's ``Scheduler.update`` (a ``TokenEvent`` per row) and its timing of each
streamed token (``RequestTracker.token``, with the folds that count the values into the TTFT / ITL
histograms and the dashboard's history once per run, as a scrape or a history sample would), and
its step deadline (``RemoteChain``'s ``Deadline``: the limit of the step sent and the answer
measured, once per step, spread over the rows). Printed as µs per
row, the median of ``--repeats`` runs of ``--steps`` steps each, so that two builds can be
compared in one sitting (``git stash`` / checkout between two runs)::

    python scripts/step_path_micro.py --rows 128
"""

from __future__ import annotations

import argparse
import gc
import statistics
import time

import torch

from gateway.chain_client import STEP_DEADLINE
from gateway.metrics import GatewayMetrics
from stagemesh.model.attention import AttnMetadata
from stagemesh.runtime.deadline import Deadline
from stagemesh.serving.scheduler import Scheduler, SchedulerConfig
from stagemesh.serving.types import Request, SamplingParams, StepResult
from stagemesh.v1 import stage_pb2
from stagemesh.wire.codec.messages import plan_from_pb, plan_to_pb

BLOCK = SchedulerConfig.block_size
"""Tokens per KV block: the default, which a stage's cache shares."""


def _decoding_scheduler(rows: int, steps: int) -> Scheduler:
    """A scheduler whose ``rows`` sequences are all past their (one-token) prefill, with room
    for ``steps`` more tokens each."""
    max_new = steps + 1
    config = SchedulerConfig(num_blocks=rows * (max_new // 16 + 2), max_num_seqs=rows, max_num_batched_tokens=rows,
                             max_model_len=max_new + 1)
    scheduler = Scheduler(config)
    for n in range(rows):
        scheduler.add(Request(f"r{n}", (7,), SamplingParams(max_new_tokens=max_new, ignore_eos=True, seed=n)))
    plan = scheduler.schedule(0.0)
    scheduler.update(plan, StepResult(plan.step_id, {c.seq_id: 5 for c in plan.chunks}))
    return scheduler


def _one_run(rows: int, steps: int) -> dict[str, float]:
    scheduler = _decoding_scheduler(rows, steps)
    names = ("schedule", "plan_to_pb", "plan_from_pb", "plan_from_pb_mid", "attn_metadata", "update", "token_timing",
             "step_deadline")
    spent = dict.fromkeys(names, 0.0)
    metrics = GatewayMetrics()
    trackers = [metrics.track() for _ in range(rows)]
    for tracker in trackers:
        tracker.admitted(0)
    deadline = Deadline(STEP_DEADLINE)
    for k in range(STEP_DEADLINE.window):  # a full window, as a gateway's after its first few seconds
        deadline.observe(0.004 + 0.001 * (k % 7), rows)
    for k in range(steps):
        t0 = time.perf_counter()
        plan = scheduler.schedule(0.0)
        t1 = time.perf_counter()
        wire = plan_to_pb(plan).SerializeToString()
        t2 = time.perf_counter()
        plan_from_pb(stage_pb2.StageRequest.FromString(wire))
        t3 = time.perf_counter()
        plan_from_pb(stage_pb2.StageRequest.FromString(wire), specs=False)
        t3b = time.perf_counter()
        tables = [list(range(-(-c.end // BLOCK))) for c in plan.chunks]  # as a stage's KV cache holds them
        t4 = time.perf_counter()
        chunks = plan.chunks
        AttnMetadata.build([c.start for c in chunks], [len(c.token_ids) for c in chunks], tables, BLOCK, "cpu")
        t5 = time.perf_counter()
        result = StepResult(plan.step_id, {c.seq_id: 5 for c in plan.chunks})
        t6 = time.perf_counter()
        scheduler.update(plan, result)
        t7 = time.perf_counter()
        for tracker in trackers:
            tracker.token()
        t8 = time.perf_counter()
        deadline.limit(plan.num_tokens)  # as ``RemoteChain`` asks: the first reading works the count out
        deadline.observe(0.004 + 0.001 * (k % 7), plan.num_tokens)
        t8b = time.perf_counter()
        for name, dt in zip(spent, (t1 - t0, t2 - t1, t3 - t2, t3b - t3, t5 - t4, t7 - t6, t8 - t7, t8b - t8)):
            spent[name] += dt
    t9 = time.perf_counter()
    metrics.latencies.take("0", "ttft"), metrics.latencies.take("0", "itl")
    spent["token_timing"] += time.perf_counter() - t9
    return {name: 1e6 * s / (steps * rows) for name, s in spent.items()}


def _untidied(run, *args):
    """``run(*args)`` with the garbage collector off: its passes would land on whichever piece
    happens to allocate when one is due, and move cost between the lines."""
    gc.collect()
    gc.disable()
    try:
        return run(*args)
    finally:
        gc.enable()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=128, help="running sequences, one row each per step")
    parser.add_argument("--steps", type=int, default=200, help="steps per run")
    parser.add_argument("--repeats", type=int, default=7, help="runs; the median is printed")
    args = parser.parse_args()
    torch.set_num_threads(1)
    runs = [_untidied(_one_run, args.rows, args.steps) for _ in range(args.repeats)]
    for name in runs[0]:
        print(f"{name:16s} {statistics.median(r[name] for r in runs):6.2f} µs per row")


if __name__ == "__main__":
    main()
