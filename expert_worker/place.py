"""Where one expert worker sits in the deployment, read from the topology document in Redis.

Each chain entry of the document may list expert workers (``stagemesh.deploy.launch`` plans them)::

    {"chain": 0, "stages": [...], "experts": [
        {"worker": 0, "address": "127.0.0.1:41005", "device": "cuda:2", "experts": {"0": [0, 2], "1": [1, 3]}},
        ...]}
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from stagemesh.mesh.store import expert_worker_id


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


def find_expert_worker(doc: dict[str, Any], chain: int, worker: int) -> ExpertPlace:
    """The place of expert worker ``worker`` of chain ``chain``; ValueError naming what is missing or wrong."""
    chains = {c.get("chain"): c for c in doc.get("chains", ())}
    if chain not in chains:
        raise ValueError(f"the topology has no chain {chain}; it has chains {sorted(chains)}")
    entries = {e.get("worker"): e for e in chains[chain].get("experts") or ()}
    if worker not in entries:
        raise ValueError(f"chain {chain} has expert workers {sorted(entries)}; there is no expert worker {worker}")
    entry = entries[worker]
    try:
        return ExpertPlace(
            chain=chain,
            worker=worker,
            address=entry["address"],
            device=entry.get("device") or "cpu",
            model=doc["model"],
            dtype=doc.get("dtype"),
            experts={int(layer): sorted(ids) for layer, ids in entry["experts"].items()},
        )
    except KeyError as err:
        raise ValueError(f"the topology entry of chain {chain} expert worker {worker} lacks the key {err}") from err
