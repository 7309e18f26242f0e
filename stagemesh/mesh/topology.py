"""The topology: where every worker of the deployment runs, as frozen dataclasses. Torch-free.

The launcher plans it (``stagemesh.deploy.up_plan.plan_topology``; compose's planner service
runs the same plan), ``Store.set_topology`` writes it to Redis as one JSON document, and every
worker and the gateway read it back (``Store.get_topology``)::

    {"model": "/abs/model/dir", "num_layers": 5, "block_size": 16, "dtype": null,
     "chains": [{"chain": 0,
        "stages": [{"stage": 0, "start_layer": 0, "end_layer": 3, "mlp_only_start": false,
                    "attn_only_end": false, "address": "127.0.0.1:41001", "device": "cuda:0", "tp": 2,
                    "devices": ["cuda:0", "cuda:1"], "tp_backend": null, "kv_blocks": null}, ...],
        "experts": [{"worker": 0, "address": "127.0.0.1:41005", "device": "cuda:2",
                     "experts": {"0": [0, 2], "1": [1, 3]}}, ...]}]}

In a stage, ``tp`` (default 1), ``devices`` (default ``[device] * tp``), ``device`` (default
``cpu``), ``tp_backend`` (default: nccl on CUDA, gloo on CPU), ``kv_blocks`` (default: sized
from a memory budget) and ``mlp_only_start`` / ``attn_only_end`` (default false, ``StageSpec``)
may be left out or null; so may a chain's ``experts`` (its experts then live in the stages).

NOTE: ``Topology.from_json`` is the one reader of the JSON: it turns the layer keys (strings in
JSON) into ints, checks the document, and names the bad key by its path, e.g. ``topology
chains[0].stages[1] lacks 'address'``. Everything else iterates the objects.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from stagemesh.config import StageSpec

_REQUIRED = object()
"""``_read``'s default for a key that must be present."""


@dataclass(frozen=True)
class Stage:
    """One pipeline stage of a chain: its layers, where it is reached, its devices."""

    index: int
    """Its place in the chain, 0 first (JSON ``stage``)."""
    start_layer: int
    """First global decoder layer it holds."""
    end_layer: int
    """One past the last global decoder layer it holds."""
    address: str
    """``host:port`` it serves ``Stage`` on and the stage before (or the gateway) reaches it at."""
    devices: tuple[str, ...] = ("cpu",)
    """Torch device of each tensor-parallel rank, rank 0's first."""
    mlp_only_start: bool = False
    """The first layer runs only its MLP (the stage before ran its attention)."""
    attn_only_end: bool = False
    """The last layer runs only its attention (the stage after runs its MLP)."""
    tp_backend: str | None = None
    """torch.distributed backend of the TP ranks; None: nccl on CUDA, gloo on CPU."""
    kv_blocks: int | None = None
    """KV-cache blocks to allocate; None sizes the cache from a memory budget."""

    @property
    def tp(self) -> int:
        """Tensor-parallel ranks: one per device."""
        return len(self.devices)

    @property
    def device(self) -> str:
        """Rank 0's device."""
        return self.devices[0]

    def spec(self, num_layers: int) -> StageSpec:
        """The layers it holds of a ``num_layers``-layer model."""
        return StageSpec(self.start_layer, self.end_layer, num_layers,
                         mlp_only_start=self.mlp_only_start, attn_only_end=self.attn_only_end)


@dataclass(frozen=True)
class ExpertWorker:
    """One expert worker of a chain and the MoE experts it holds."""

    index: int
    """Its number among the chain's expert workers (JSON ``worker``)."""
    address: str
    """``host:port`` it serves ``Expert`` on."""
    device: str = "cpu"
    """Torch device of its experts."""
    experts: Mapping[int, tuple[int, ...]] = field(default_factory=dict)
    """Global MoE layer -> the expert ids it holds there, increasing."""


@dataclass(frozen=True)
class Chain:
    """One data-parallel chain: a complete replica of the model on its own workers."""

    index: int
    """Its number, 0 first (JSON ``chain``)."""
    stages: tuple[Stage, ...]
    """Its stages in pipeline order (``stages[s].index == s``)."""
    expert_workers: tuple[ExpertWorker, ...] = ()
    """Its expert workers by number; empty when the stages hold the experts (JSON ``experts``)."""

    def stage(self, stage: int) -> Stage:
        if not 0 <= stage < len(self.stages):
            raise ValueError(f"chain {self.index} has stages 0..{len(self.stages) - 1}; there is no stage {stage}")
        return self.stages[stage]

    def expert_worker(self, worker: int) -> ExpertWorker:
        found = next((w for w in self.expert_workers if w.index == worker), None)
        if found is None:
            numbers = [w.index for w in self.expert_workers]
            raise ValueError(f"chain {self.index} has expert workers {numbers}; there is no expert worker {worker}")
        return found


@dataclass(frozen=True)
class Topology:
    """The deployment: the checkpoint it serves and its chains. See the module docstring for the JSON."""

    model: str
    """The checkpoint directory, as the workers see it."""
    num_layers: int
    """Decoder layers of the model."""
    chains: tuple[Chain, ...]
    """Its chains by number (``chains[c].index == c``)."""
    block_size: int = 16
    """Tokens per KV-cache block, the same on every stage."""
    dtype: str | None = None
    """Weights and activations dtype; None takes the checkpoint's."""

    def chain(self, chain: int) -> Chain:
        if not 0 <= chain < len(self.chains):
            raise ValueError(f"the topology has no chain {chain}; it has chains {[c.index for c in self.chains]}")
        return self.chains[chain]

    def to_json(self) -> str:
        doc = {"model": self.model, "num_layers": self.num_layers, "block_size": self.block_size,
               "dtype": self.dtype, "chains": [_chain_doc(c) for c in self.chains]}
        return json.dumps(doc)

    @classmethod
    def from_json(cls, text: str) -> Topology:
        """The topology of a JSON document; ValueError naming the bad key by its path."""
        doc = json.loads(text)
        _check_object(doc, "")
        num_layers = _read(doc, "num_layers", "", int)
        chains = tuple(_chain(c, f"chains[{i}]", num_layers) for i, c in enumerate(_read(doc, "chains", "", list)))
        _check_numbered([c.index for c in chains], "chains")
        return cls(
            model=_read(doc, "model", "", str),
            num_layers=num_layers,
            chains=tuple(sorted(chains, key=lambda c: c.index)),
            block_size=_read(doc, "block_size", "", int, 16),
            dtype=_read(doc, "dtype", "", str, None),
        )


# --- to JSON -------------------------------------------------------------------------------


def _chain_doc(chain: Chain) -> dict[str, Any]:
    return {"chain": chain.index, "stages": [_stage_doc(s) for s in chain.stages],
            "experts": [_expert_doc(w) for w in chain.expert_workers]}


def _stage_doc(stage: Stage) -> dict[str, Any]:
    return {"stage": stage.index, "start_layer": stage.start_layer, "end_layer": stage.end_layer,
            "mlp_only_start": stage.mlp_only_start, "attn_only_end": stage.attn_only_end,
            "address": stage.address, "device": stage.device, "tp": stage.tp, "devices": list(stage.devices),
            "tp_backend": stage.tp_backend, "kv_blocks": stage.kv_blocks}


def _expert_doc(worker: ExpertWorker) -> dict[str, Any]:
    return {"worker": worker.index, "address": worker.address, "device": worker.device,
            "experts": {str(layer): list(ids) for layer, ids in worker.experts.items()}}


# --- from JSON -----------------------------------------------------------------------------


def _chain(doc: Any, path: str, num_layers: int) -> Chain:
    _check_object(doc, path)
    stages = [_stage(s, f"{path}.stages[{i}]", num_layers) for i, s in enumerate(_read(doc, "stages", path, list))]
    _check_numbered([s.index for s in stages], f"{path}.stages")
    workers = [_expert_worker(w, f"{path}.experts[{i}]") for i, w in enumerate(_read(doc, "experts", path, list, []))]
    numbers = [w.index for w in workers]
    if len(set(numbers)) != len(numbers):
        raise ValueError(f"topology {path}.experts numbers its workers {numbers}: each number once")
    return Chain(_read(doc, "chain", path, int), tuple(sorted(stages, key=lambda s: s.index)),
                 tuple(sorted(workers, key=lambda w: w.index)))


def _stage(doc: Any, path: str, num_layers: int) -> Stage:
    _check_object(doc, path)
    tp = _read(doc, "tp", path, int, 1)
    devices = tuple(_read(doc, "devices", path, list, None) or [_read(doc, "device", path, str, "cpu")] * tp)
    if len(devices) != tp or not all(isinstance(d, str) for d in devices):
        raise ValueError(f"topology {path} has tp={tp} but {len(devices)} devices {list(devices)}: one per rank")
    stage = Stage(
        index=_read(doc, "stage", path, int),
        start_layer=_read(doc, "start_layer", path, int),
        end_layer=_read(doc, "end_layer", path, int),
        address=_read(doc, "address", path, str),
        devices=devices,
        mlp_only_start=_read(doc, "mlp_only_start", path, bool, False),
        attn_only_end=_read(doc, "attn_only_end", path, bool, False),
        tp_backend=_read(doc, "tp_backend", path, str, None),
        kv_blocks=_read(doc, "kv_blocks", path, int, None),
    )
    try:
        stage.spec(num_layers)
    except ValueError as err:
        raise ValueError(f"topology {path}: {err}") from err
    return stage


def _expert_worker(doc: Any, path: str) -> ExpertWorker:
    _check_object(doc, path)
    held = _read(doc, "experts", path, dict)
    experts = {_layer(key, f"{path}.experts"): _expert_ids(ids, f"{path}.experts.{key}") for key, ids in held.items()}
    return ExpertWorker(
        index=_read(doc, "worker", path, int),
        address=_read(doc, "address", path, str),
        device=_read(doc, "device", path, str, "cpu"),
        experts=dict(sorted(experts.items())),
    )


def _layer(key: str, path: str) -> int:
    """A layer key of JSON (a string) as the int it names: the one place this happens."""
    try:
        return int(key)
    except ValueError:
        raise ValueError(f"topology {path} has the key {key!r}: keys are layer numbers") from None


def _expert_ids(ids: Any, path: str) -> tuple[int, ...]:
    if not isinstance(ids, list) or not all(_is_int(e) for e in ids):
        raise ValueError(f"topology {path} is {ids!r}: must be a list of expert ids")
    return tuple(sorted(ids))


def _read(doc: dict, key: str, path: str, kind: type, default: Any = _REQUIRED) -> Any:
    """``doc[key]``, which must be a ``kind``; ``default`` when it is absent or null."""
    value = doc.get(key)
    if value is None:
        if default is _REQUIRED:
            raise ValueError(f"{_where(path)} lacks {key!r}")
        return default
    if not (_is_int(value) if kind is int else isinstance(value, kind)):
        raise ValueError(f"{_where(f'{path}.{key}' if path else key)} is {value!r}: must be {kind.__name__}")
    return value


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _check_object(doc: Any, path: str) -> None:
    if not isinstance(doc, dict):
        raise ValueError(f"{_where(path)} is {type(doc).__name__}: must be an object")


def _check_numbered(numbers: list[int], path: str) -> None:
    if sorted(numbers) != list(range(len(numbers))):
        raise ValueError(f"topology {path} must be numbered 0..n-1, got {numbers}")


def _where(path: str) -> str:
    return f"topology {path}" if path else "topology"
