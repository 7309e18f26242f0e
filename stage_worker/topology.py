"""Where one stage worker sits in the deployment: its stage of the topology
(``stagemesh.mesh.topology``, read from Redis) with what the worker needs of the rest.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

from stagemesh.config import StageSpec
from stagemesh.mesh.store import stage_worker_id
from stagemesh.mesh.topology import Topology


@dataclass(frozen=True)
class StagePlace:
    """One stage of one chain, as the topology places it."""

    chain: int
    stage: int
    num_stages: int
    """Stages in this chain."""
    spec: StageSpec
    """The global decoder layers this stage holds."""
    address: str
    """``host:port`` this worker serves on."""
    device: str
    """Torch device of rank 0 (this process), e.g. ``cpu`` or ``cuda:1``."""
    model: str
    """The checkpoint directory."""
    block_size: int
    """Tokens per KV-cache block (the same on every stage)."""
    dtype: str | None
    """Weights and activations dtype; None takes the checkpoint's."""
    kv_blocks: int | None
    """KV-cache blocks to allocate; None sizes the cache from a memory budget."""
    next_address: str | None
    """``host:port`` of the next stage of the chain; None on the last stage."""
    tp: int = 1
    """Tensor-parallel ranks of this stage: this process (rank 0) and ``tp - 1`` rank processes."""
    devices: tuple[str, ...] = ("cpu",)
    """Torch device of each rank, rank 0's first."""
    tp_backend: str | None = None
    """torch.distributed backend of the ranks; None: nccl on CUDA, gloo on CPU."""

    @property
    def worker_id(self) -> str:
        """This worker's id in the Redis registry."""
        return stage_worker_id(self.chain, self.stage)

    @property
    def name(self) -> str:
        """How logs and error messages name this stage, e.g. ``c0-s1``."""
        return f"c{self.chain}-s{self.stage}"

    @property
    def next_name(self) -> str:
        return f"c{self.chain}-s{self.stage + 1}"


def find_stage(topology: Topology, chain: int, stage: int) -> StagePlace:
    """The place of stage ``stage`` of chain ``chain``; ValueError naming what is missing."""
    entry = topology.chain(chain).stage(stage)
    stages = topology.chain(chain).stages
    return StagePlace(
        chain=chain,
        stage=stage,
        num_stages=len(stages),
        spec=entry.spec(topology.num_layers),
        address=entry.address,
        device=entry.device,
        model=topology.model,
        block_size=topology.block_size,
        dtype=topology.dtype,
        kv_blocks=entry.kv_blocks,
        next_address=stages[stage + 1].address if stage + 1 < len(stages) else None,
        tp=entry.tp,
        devices=entry.devices,
        tp_backend=entry.tp_backend,
    )


def place_to_dict(place: StagePlace) -> dict[str, Any]:
    """``place`` as JSON values (how rank 0 hands it to its TP rank processes)."""
    return dataclasses.asdict(place)


def place_from_dict(doc: dict[str, Any]) -> StagePlace:
    return StagePlace(**{**doc, "spec": StageSpec(**doc["spec"]), "devices": tuple(doc["devices"])})
