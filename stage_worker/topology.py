"""Where one stage worker sits in the deployment, read from the topology document in Redis.

The launcher writes the document (``Store.set_topology``)::

    {"model": "/abs/model/dir", "num_layers": 5, "block_size": 16, "dtype": null,
     "chains": [{"chain": 0, "stages": [
        {"stage": 0, "start_layer": 0, "end_layer": 3, "address": "127.0.0.1:41001",
         "device": "cuda:0", "tp": 2, "devices": ["cuda:0", "cuda:1"], "tp_backend": null,
         "kv_blocks": null}, ...]}]}

``tp`` (default 1), ``devices`` (default ``[device] * tp``) and ``tp_backend`` (default: nccl
on CUDA, gloo on CPU) may be left out, and so may ``mlp_only_start`` / ``attn_only_end``
(default false: a boundary that cuts a layer between its attention and its MLP, ``StageSpec``).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

from stagemesh.config import StageSpec
from stagemesh.mesh.store import stage_worker_id


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


def find_stage(doc: dict[str, Any], chain: int, stage: int) -> StagePlace:
    """The place of stage ``stage`` of chain ``chain``; ValueError naming what is missing or wrong."""
    chains = {c.get("chain"): c for c in doc.get("chains", ())}
    if chain not in chains:
        raise ValueError(f"the topology has no chain {chain}; it has chains {sorted(chains)}")
    stages = sorted(chains[chain].get("stages", ()), key=lambda s: s.get("stage", -1))
    if [s.get("stage") for s in stages] != list(range(len(stages))):
        raise ValueError(f"chain {chain} stages must be numbered 0..n-1, got {[s.get('stage') for s in stages]}")
    if not 0 <= stage < len(stages):
        raise ValueError(f"chain {chain} has stages 0..{len(stages) - 1}; there is no stage {stage}")
    entry = stages[stage]
    tp = entry.get("tp") or 1
    devices = tuple(entry.get("devices") or [entry.get("device") or "cpu"] * tp)
    if len(devices) != tp:
        raise ValueError(f"chain {chain} stage {stage} has tp={tp} but {len(devices)} devices {list(devices)}")
    try:
        return StagePlace(
            chain=chain,
            stage=stage,
            num_stages=len(stages),
            spec=StageSpec(
                entry["start_layer"],
                entry["end_layer"],
                doc["num_layers"],
                mlp_only_start=bool(entry.get("mlp_only_start")),
                attn_only_end=bool(entry.get("attn_only_end")),
            ),
            address=entry["address"],
            device=devices[0],
            model=doc["model"],
            block_size=doc.get("block_size") or 16,
            dtype=doc.get("dtype"),
            kv_blocks=entry.get("kv_blocks"),
            next_address=stages[stage + 1]["address"] if stage + 1 < len(stages) else None,
            tp=tp,
            devices=devices,
            tp_backend=entry.get("tp_backend"),
        )
    except KeyError as err:
        raise ValueError(f"the topology entry of chain {chain} stage {stage} lacks the key {err}") from err


def place_to_dict(place: StagePlace) -> dict[str, Any]:
    """``place`` as JSON values (how rank 0 hands it to its TP rank processes)."""
    return dataclasses.asdict(place)


def place_from_dict(doc: dict[str, Any]) -> StagePlace:
    return StagePlace(**{**doc, "spec": StageSpec(**doc["spec"]), "devices": tuple(doc["devices"])})


def port_of(address: str) -> int:
    """The port of ``host:port`` (``[v6]:port`` included)."""
    host, sep, port = address.rpartition(":")
    if not sep or not port.isdigit():
        raise ValueError(f"address {address!r} is not host:port")
    return int(port)


def default_host(address: str) -> str:
    """Bind where the topology says peers reach us: loopback stays loopback, else every interface."""
    host = address.rpartition(":")[0].strip("[]")
    if host not in ("127.0.0.1", "localhost", "::1"):
        return "[::]"
    return f"[{host}]" if ":" in host else host
