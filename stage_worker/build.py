"""How every rank of a stage builds its runner: from the place and the worker's options alone,
so that all ranks build the same stage (the same layers, the same number of KV blocks)."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

from stage_worker.topology import StagePlace
from stagemesh.model.moe import Experts, ExpertsOnRankZero
from stagemesh.model.parallel import TPGroup
from stagemesh.runners.stage import StageRunner
from stagemesh.runtime.load_progress import Progress


@dataclass(frozen=True)
class StageOptions:
    """The worker's command-line choices that its TP ranks must share."""

    kv_blocks: int | None = None
    """KV-cache blocks; None takes the topology's, then a memory budget."""
    kv_memory_mb: int | None = None
    """KV-cache budget in MiB when no block count is given."""
    threads: int | None = None
    """torch intra-op threads of each rank."""
    cpus: list[int] | None = None
    """The stage's cores (``--cpus``): rank r binds to the r-th ``threads`` of them; None: unbound."""
    tp_backend: str | None = None
    """torch.distributed backend; None takes the topology's, then nccl on CUDA / gloo on CPU."""
    log_level: str = "INFO"
    remote_experts: bool = False
    """The chain's routed experts run on expert workers (TP ranks > 0 then stand in with zeros)."""

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def build_runner(
    place: StagePlace, opts: StageOptions, device: str, tp: TPGroup = TPGroup(), experts: Experts | None = None,
    progress: Progress | None = None,
) -> StageRunner:
    """This rank's runner: its TP slice of the stage's layers on ``device``; ``experts``: the
    routed experts of its MoE layers when they run elsewhere (expert workers); ``progress``: told
    after each layer loaded (rank 0's, which the worker logs for `stagemesh up`)."""
    if experts is None and opts.remote_experts and tp.rank > 0:
        experts = ExpertsOnRankZero()
    return StageRunner(
        place.model,
        place.spec,
        device=device,
        dtype=place.dtype,
        tp=tp,
        kv_memory_bytes=opts.kv_memory_mb * 2**20 if opts.kv_memory_mb else None,
        num_kv_blocks=opts.kv_blocks or place.kv_blocks,
        block_size=place.block_size,
        experts=experts,
        progress=progress,
    )
