"""``python -m stage_worker.tp_rank``: TP rank r > 0 of one stage, started by the stage's rank 0.

It joins the stage's TP group, loads its slice of the stage's weights, then runs every step
rank 0 broadcasts until rank 0 says stop (exit 0). It serves no gRPC and never talks to Redis
or to other stages. A step failing with anything but a StagemeshError ends it (exit 1): its
peers may be waiting at a collective it will never reach, and rank 0 sees the exit at once.
It dies with rank 0 (PR_SET_PDEATHSIG, set first thing).
"""

from __future__ import annotations

import argparse
import json
import logging

from stage_worker.build import StageOptions, build_runner
from stage_worker.decode import decode_step
from stage_worker.stage import weight_bytes
from stage_worker.topology import StagePlace, place_from_dict
from stage_worker.tp import all_gather_int, join_group, leave_group, receive_step, tp_backend
from stagemesh.errors import StagemeshError
from stagemesh.runners.stage import StageRunner
from stagemesh.runtime import cpus
from stagemesh.runtime.procs import follow_parent
from stagemesh.runtime.startup import StartupError
from stagemesh.v1 import stage_pb2

log = logging.getLogger(__name__)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m stage_worker.tp_rank", description="One TP rank (> 0) of a stage.")
    p.add_argument("--rank", type=int, required=True, help="this rank, 1..tp-1")
    p.add_argument("--parent-pid", type=int, required=True, help="rank 0's pid: this process dies with it")
    p.add_argument("--init-method", required=True, help="rank 0's rendezvous, e.g. tcp://127.0.0.1:29500")
    p.add_argument("--place", required=True, help="the stage's StagePlace as JSON")
    p.add_argument("--options", required=True, help="the worker's StageOptions as JSON")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    follow_parent(args.parent_pid)
    place = place_from_dict(json.loads(args.place))
    opts = StageOptions(**json.loads(args.options))
    logging.basicConfig(
        level=opts.log_level.upper(),
        format=f"%(asctime)s %(levelname)s stage-{place.name}-r{args.rank} %(name)s: %(message)s",
    )
    try:
        cpus.take(opts.cpus, args.rank, opts.threads)
    except StartupError as err:
        log.error("tp rank %d of stage %s cannot start: %s", args.rank, place.name, err)
        return 1
    device = place.devices[args.rank]
    backend = tp_backend(device, opts.tp_backend or place.tp_backend)
    group = join_group(args.rank, place.tp, args.init_method, backend, device)
    runner = build_runner(place, opts, device, group.tp)
    all_gather_int(weight_bytes(runner), group.control)
    log.info("tp rank %d of %d of stage %s ready on %s", args.rank, place.tp, place.name, device)
    serve_steps(runner, place, group.control)
    leave_group()
    log.info("tp rank %d of stage %s stopped", args.rank, place.name)
    return 0


def serve_steps(runner: StageRunner, place: StagePlace, control) -> None:
    """Run each step rank 0 broadcasts, in order, until it broadcasts STOP."""
    while (data := receive_step(control)) is not None:
        # rank 0 encoded it (before the last stage, with the unread sampling parameters as zeros)
        step = decode_step(stage_pb2.StageRequest.FromString(data), place.name, samples=place.spec.is_last)
        try:
            runner.step(step.plan, step.hidden)
        except StagemeshError as err:
            # NOTE: raised before any collective and on rank 0 alike, which answers it; the ranks stay in step.
            log.info("step %d failed as on rank 0: %s", step.plan.step_id, err)


if __name__ == "__main__":
    raise SystemExit(main())
