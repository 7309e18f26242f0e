"""The expert MLPs one expert worker holds, and the batches it runs through them. No gRPC here.

Each MoE layer the worker serves is a ``LocalExperts`` of just its experts (TP = 1): only
those experts' tensors are read from the checkpoint. A batch is one layer's rows of one step
grouped by expert, as a stage's ``dispatch`` grouped them; the answer is each row's
unweighted expert output in the same order (the stage weights and combines).
"""

from __future__ import annotations

import logging
import threading
import time
from collections import Counter
from collections.abc import Callable
from functools import cached_property
from pathlib import Path

import torch

from stagemesh.config import ModelConfig
from stagemesh.errors import InvalidArgument
from stagemesh.mesh.figures import ExpertFigures
from stagemesh.model.loader import CheckpointReader
from stagemesh.model.moe import LocalExperts
from stagemesh.model.parallel import TPGroup
from stagemesh.runners.stage import resolve_dtype

log = logging.getLogger(__name__)


class ExpertRunner:
    """Runs grouped rows through the experts this worker holds: ``run(layer, expert_ids, counts, x)``."""

    def __init__(
        self, model_dir: str | Path, experts: dict[int, list[int]], *, device: str = "cpu", dtype: str | None = None,
        progress: Callable[[int, int], None] | None = None,
    ):
        """``progress(done, total)``: called after each MoE layer's experts loaded."""
        self.config = ModelConfig.from_dir(model_dir)
        self.device = torch.device(device)
        self.dtype = resolve_dtype(dtype, self.config)
        reader = CheckpointReader(model_dir)
        self.layers: dict[int, LocalExperts] = {}
        for layer, ids in sorted(experts.items()):
            if not self.config.is_moe_layer(layer):
                raise ValueError(
                    f"layer {layer} is not a MoE layer of {model_dir}; its MoE layers are {self.config.moe_layers}"
                )
            with torch.device(self.device):
                local = LocalExperts(self.config, sorted(ids), TPGroup()).to(self.dtype)
            local.load(reader, layer)
            self.layers[layer] = local.eval()
            if progress is not None:
                progress(len(self.layers), len(experts))
        self.figures = ExpertCounters()

    @cached_property
    def weight_bytes(self) -> int:
        """Counted once (the experts are fixed once loaded): each heartbeat reads it."""
        return sum(p.numel() * p.element_size() for p in self.parameters())

    def parameters(self):
        for local in self.layers.values():
            yield from local.parameters()

    @torch.inference_mode()
    def run(self, layer: int, expert_ids: tuple[int, ...], counts: tuple[int, ...], x: torch.Tensor) -> torch.Tensor:
        """x: [sum(counts), H] grouped by ``expert_ids`` (increasing) -> the experts' outputs, same rows."""
        local = self._layer(layer)
        if x.dim() != 2 or x.shape[1] != self.config.hidden_size or not x.dtype.is_floating_point:
            raise InvalidArgument(
                f"expert worker got rows of {str(x.dtype).removeprefix('torch.')} {list(x.shape)}; it needs a floating "
                f"tensor of [rows, {self.config.hidden_size}] (hidden_size)"
            )
        index = {e: i for i, e in enumerate(local.expert_ids)}
        missing = [e for e in expert_ids if e not in index]
        if missing:
            raise InvalidArgument(
                f"expert worker holds experts {local.expert_ids} of layer {layer}, not {missing}; "
                f"the stage's placement is stale"
            )
        local_counts = [0] * len(local.expert_ids)  # the grouped order is the same: both increasing
        for e, n in zip(expert_ids, counts):
            local_counts[index[e]] = n
        t_start = time.time()
        out = local(x.to(self.device, self.dtype), local_counts)  # [R, H]
        self.figures.record(layer, expert_ids, counts, t_start, time.time())
        return out

    def _layer(self, layer: int) -> LocalExperts:
        local = self.layers.get(layer)
        if local is None:
            raise InvalidArgument(
                f"expert worker holds no experts of layer {layer}; it holds layers {sorted(self.layers)}"
            )
        return local


class ExpertCounters:
    """What the heartbeat's figures count: the compute thread writes them, the event loop reads them."""

    def __init__(self) -> None:
        self.batches = 0
        self.rows = 0
        self.busy_s = 0.0
        self.expert_tokens: Counter[str] = Counter()
        """``"layer:expert"`` -> rows run through that expert: the load figure expert balancing needs."""
        self._lock = threading.Lock()
        self._last_report = (time.time(), 0.0)

    def record(self, layer: int, expert_ids, counts, t_start: float, t_end: float) -> None:
        with self._lock:
            self.batches += 1
            self.rows += sum(counts)
            self.busy_s += t_end - t_start
            for e, n in zip(expert_ids, counts):
                self.expert_tokens[f"{layer}:{e}"] += n

    def report(self) -> ExpertFigures:
        """The figures; the busy fraction covers the time since the previous report."""
        now = time.time()
        with self._lock:
            busy_s, tokens = self.busy_s, dict(self.expert_tokens)
            batches, rows = self.batches, self.rows
        last_time, last_busy = self._last_report
        self._last_report = (now, busy_s)
        return ExpertFigures(
            time=now,
            batches=batches,
            tokens_processed=rows,
            busy_s=busy_s,
            busy_fraction=min(1.0, (busy_s - last_busy) / max(now - last_time, 1e-6)),
            expert_tokens=tokens,
        )
