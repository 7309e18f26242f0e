"""Where one expert worker sits in the deployment: its entry of the topology
(``stagemesh.mesh.topology``, read from Redis) with what the worker needs of the rest.
"""

from __future__ import annotations

from dataclasses import dataclass

from stagemesh.mesh.store import expert_worker_id
from stagemesh.mesh.topology import Topology


@dataclass(frozen=True)
class ExpertPlace:
    """One expert worker of one chain, as the topology places it."""

    chain: int
    worker: int
    """Its index among the chain's expert workers."""
    address: str
    """``host:port`` it serves ``Expert`` on."""
    device: str
    """Torch device of its experts, e.g. ``cpu`` or ``cuda:2``."""
    model: str
    """The checkpoint directory."""
    dtype: str | None
    """Weights and activations dtype; None takes the checkpoint's."""
    experts: dict[int, list[int]]
    """Global MoE layer -> the expert ids it holds."""

    @property
    def worker_id(self) -> str:
        """Its id in the Redis registry, e.g. ``expert-c0-e1``."""
        return expert_worker_id(self.chain, self.worker)

    @property
    def name(self) -> str:
        """How logs and error messages name it, e.g. ``c0-e1``."""
        return f"c{self.chain}-e{self.worker}"


def find_expert_worker(topology: Topology, chain: int, worker: int) -> ExpertPlace:
    """The place of expert worker ``worker`` of chain ``chain``; ValueError naming what is missing."""
    entry = topology.chain(chain).expert_worker(worker)
    return ExpertPlace(
        chain=chain,
        worker=worker,
        address=entry.address,
        device=entry.device,
        model=topology.model,
        dtype=topology.dtype,
        experts={layer: list(ids) for layer, ids in entry.experts.items()},
    )
