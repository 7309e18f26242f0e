"""What the pipeline runs each step on: ``LocalStage`` (tp = 1) or ``TPStage`` (rank 0 of T).

Both take a ``StageStep`` (decoded once, by the servicer) and return the runner's output: hidden
states for the next stage, or the sampled tokens on the last stage.
"""

from __future__ import annotations

import logging
import os
from typing import Any, Callable

import torch

from stage_worker.build import StageOptions, build_runner
from stage_worker.decode import StageStep, encode_step
from stage_worker.ranks import RankProcesses, rank_command
from stage_worker.topology import StagePlace
from stage_worker.tp import RankGroup, all_gather_int, join_group, leave_group, send_step, send_stop, tp_backend
from stagemesh.errors import StagemeshError, Unavailable
from stagemesh.model.moe import Experts
from stagemesh.runners.stage import StageRunner
from stagemesh.runtime.load_progress import reporter
from stagemesh.runtime.net import free_port
from stagemesh.serving.types import StepResult

log = logging.getLogger(__name__)

RANK_DEATH_WAIT_S = 1.0
"""After a collective failed, how long to wait for the rank death that usually explains it."""
RANK_STOP_S = 5.0
"""On shutdown, how long the ranks get to leave after the STOP broadcast before they are killed."""


def dead_rank_error(name: str, rank: int, code: int) -> Unavailable:
    return Unavailable(f"tp rank {rank} of stage {name} died (exit code {code}); the stage cannot run steps")


class LocalStage:
    """A stage that runs whole in this process (tp = 1)."""

    def __init__(self, runner: StageRunner, name: str):
        self.runner, self.name = runner, name
        self._weight_bytes = weight_bytes(runner)
        """Counted once: walking the model's modules at every heartbeat showed in a stage's profile."""

    def step(self, step: StageStep) -> torch.Tensor | StepResult:
        return self.runner.step(step.plan, step.hidden)

    def failure(self) -> Unavailable | None:
        return None

    def figures(self) -> dict[str, Any]:
        return {"rank_pids": [os.getpid()], "rank_weight_bytes": [self._weight_bytes]}

    def close(self) -> None:
        pass


class DeferredExpertErrors:
    """Rank 0's remote experts on a tensor-parallel stage, whose failure waits for the step's end.

    NOTE: an expert worker that fails a call (it died, or missed its deadline, and no replica
    could take its rows) raises in the middle of the step, on rank 0 only, while the other
    ranks go on to the MoE block's all-reduce: rank 0 would skip it and the group would hang for
    good (seen when a SIGSTOPped rank 0 woke up to both replicas' deadlines passed). Instead
    the layer gets zeros, every collective of the step runs on every rank, and ``TPStage``
    raises the error after the step, whose output is discarded."""

    def __init__(self, experts: Experts):
        self.experts = experts
        self.failed: StagemeshError | None = None

    def __call__(self, layer: int, x: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
        if self.failed is None:
            try:
                return self.experts(layer, x, counts)
            except StagemeshError as err:
                self.failed = err
        return torch.zeros_like(x)

    def take_failure(self) -> StagemeshError | None:
        failed, self.failed = self.failed, None
        return failed


class TPStage:
    """Rank 0 of a tensor-parallel stage: every step goes to all ranks; only rank 0's output is used.

    NOTE: errors. A StagemeshError from ``runner.step`` (a full KV cache) is raised before any
    collective and by every rank alike, so the ranks stay in step and the error is answered;
    a remote expert's failure is raised after the step (``DeferredExpertErrors``). Any other
    error may leave the ranks waiting at different collectives: the group is broken for good,
    and so is the stage (``failure`` says why; the worker then goes unhealthy).
    """

    def __init__(
        self, runner: StageRunner, group: RankGroup, ranks: RankProcesses, name: str, rank_weight_bytes: list[int],
        experts: DeferredExpertErrors | None = None,
    ):
        self.runner, self.group, self.ranks, self.name = runner, group, ranks, name
        self.rank_weight_bytes = rank_weight_bytes
        """Parameter bytes of each rank, rank 0's first."""
        self.experts = experts
        self._broken: Unavailable | None = None

    def step(self, step: StageStep) -> torch.Tensor | StepResult:
        if (failure := self.failure()) is not None:
            raise Unavailable(failure.message)
        try:
            # every rank runs this step with us: the plan as we run it (pending tokens filled in)
            send_step(encode_step(step.plan, step.hidden).SerializeToString(), self.group.control)
            out = self.runner.step(step.plan, step.hidden)
        except StagemeshError:
            raise
        except Exception as err:
            self._broken = self._why_broken(err)
            raise Unavailable(self._broken.message) from err
        if self.experts is not None and (failed := self.experts.take_failure()) is not None:
            raise failed
        return out

    def failure(self) -> Unavailable | None:
        """Why this stage can never run a step again (a rank died, the group broke), or None."""
        dead = self.ranks.first_dead()
        return dead_rank_error(self.name, *dead) if dead else self._broken

    def _why_broken(self, err: Exception) -> Unavailable:
        dead = self.ranks.wait_dead(RANK_DEATH_WAIT_S)  # a peer's death is what usually fails a collective
        if dead is not None:
            return dead_rank_error(self.name, *dead)
        log.error("stage %s: a tensor-parallel step failed; the ranks may be out of step", self.name, exc_info=err)
        return Unavailable(f"the tp group of stage {self.name} broke: {err}")

    def figures(self) -> dict[str, Any]:
        return {"rank_pids": [os.getpid(), *self.ranks.pids.values()], "rank_weight_bytes": self.rank_weight_bytes}

    def close(self) -> None:
        """Tell the ranks to stop, wait for them (killing what is left), leave the group."""
        intact = self.failure() is None
        if intact:
            send_stop(self.group.control)
        self.ranks.stop(RANK_STOP_S)
        if intact:  # NOTE: leaving a broken group may block on the dead peer
            leave_group()


def launch_tp(
    place: StagePlace, opts: StageOptions, experts: Experts | None = None, stopped_limit_s: float = 0.0
) -> tuple[RankProcesses, Callable[[], TPStage]]:
    """Start ranks 1..T-1 (call on the main thread); the callable joins them as rank 0 and
    loads this rank's weights (call it on the step thread). It returns once every rank has loaded.
    ``stopped_limit_s``: a rank stopped (SIGSTOP) this long is killed (the worker's ``--liveness-s``; 0: never)."""
    backend = tp_backend(place.devices[0], opts.tp_backend or place.tp_backend)
    init_method = f"tcp://127.0.0.1:{free_port()}"
    ranks = RankProcesses([rank_command(place, opts, rank, init_method) for rank in range(1, place.tp)],
                          stopped_limit_s=stopped_limit_s)

    def build() -> TPStage:
        group = join_group(0, place.tp, init_method, backend, place.devices[0])
        deferred = DeferredExpertErrors(experts) if experts is not None else None
        runner = build_runner(place, opts, place.devices[0], group.tp, deferred, reporter(log, "layers"))
        per_rank = all_gather_int(weight_bytes(runner), group.control)  # returns once every rank has loaded
        log.info("stage %s: %d tp ranks on %s over %s, weight bytes per rank %s",
                 place.name, place.tp, list(place.devices), backend, per_rank)
        return TPStage(runner, group, ranks, place.name, per_rank, deferred)

    return ranks, build


def weight_bytes(runner: StageRunner) -> int:
    """Bytes of this rank's parameters."""
    return sum(p.numel() * p.element_size() for p in runner.model.parameters())
