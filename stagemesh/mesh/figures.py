"""The figures a worker publishes with each heartbeat, each declared once. Torch-free.

A stage worker publishes ``StageFigures``, an expert worker ``ExpertFigures``. In Redis each
figure is one field of the worker's metrics hash holding its JSON value (``Store.heartbeat``),
so ``to_json`` / ``from_json`` map a figure name to a JSON value. Readers: the gateway's
status document (``WorkerLoad``, the figures the ``WorkerStatus.load`` proto carries), its
Prometheus exposition (each figure field's ``metric`` and ``help``, ``gateway.mesh_collector``)
and ``stagemesh bench`` (busy time over a run).

NOTE: a figure a worker did not publish (yet) reads None: Prometheus then gets no sample
(never a made-up 0) while the status document reads 0.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, fields, replace
from typing import Any

GAUGE, COUNTER, HISTOGRAM = "gauge", "counter", "histogram"
LABELLED = "labelled"
"""A figure exported as one sample per item (a TP rank, an expert), with the item as a label."""


def figure(help: str, kind: str | None = None, metric: str | None = None) -> Any:
    """A figure: None until published. ``help`` documents it and its Prometheus series; ``kind``
    (GAUGE, COUNTER, HISTOGRAM, LABELLED) says how it is exported (None: it is not); ``metric``
    names the series after the role's prefix when the figure's own name does not."""
    return field(default=None, metadata={"help": help, "kind": kind, "metric": metric})


@dataclass(frozen=True)
class WorkerFigures:
    """What every worker publishes; see ``StageFigures`` and ``ExpertFigures``."""

    PREFIX = "stagemesh_worker_"
    """Its Prometheus series' prefix (each role has its own)."""

    time: float | None = figure("Unix time of the heartbeat that published these figures.")
    busy_s: float | None = figure("Seconds spent computing since the worker started.")

    def to_json(self) -> dict[str, Any]:
        """figure name -> JSON value, the figures not published left out. The values are not copied
        (they are JSON values already, made for this report): ``asdict``'s deep copy of a stage's 256
        busy intervals was most of a heartbeat's ~1 ms."""
        return {f.name: value for f in fields(self) if (value := getattr(self, f.name)) is not None}

    @classmethod
    def from_json(cls, doc: dict[str, Any]):
        """The figures of ``doc`` (figure name -> JSON value); names this role does not publish are ignored."""
        names = {f.name for f in fields(cls)}
        return cls(**{name: value for name, value in doc.items() if name in names})

    @classmethod
    def exported(cls, kind: str) -> list[str]:
        """The figures exported to Prometheus as series of ``kind``."""
        return [f.name for f in fields(cls) if f.metadata["kind"] == kind]

    @classmethod
    def series(cls, name: str) -> tuple[str, str]:
        """(Prometheus series name, help text) of figure ``name``."""
        declared = next(f.metadata for f in fields(cls) if f.name == name)
        metric = declared["metric"] or name
        return (metric if metric.startswith("stagemesh_") else cls.PREFIX + metric), declared["help"]

    @property
    def intervals(self) -> list:
        """The ``[t0, t1]`` of its recent steps (stages only; none for other roles)."""
        return []


@dataclass(frozen=True)
class StageFigures(WorkerFigures):
    """What a stage worker publishes with each heartbeat (the rates cover the time since the last)."""

    PREFIX = "stagemesh_stage_"
    """Its Prometheus series' prefix."""

    time: float | None = figure("Unix time of the stage's last heartbeat figures.", GAUGE,
                                "last_heartbeat_timestamp_seconds")
    busy_fraction: float | None = figure("Share of the last heartbeat window spent running steps.", GAUGE)
    queue_depth: int | None = figure("Steps received and not yet answered.", GAUGE)
    kv_blocks_used: int | None = figure("KV-cache blocks holding sequences.", GAUGE)
    kv_blocks_total: int | None = figure("KV-cache blocks allocated.", GAUGE, "kv_blocks_capacity")
    """NOTE: its series is ``..._kv_blocks_capacity``: Prometheus reserves ``_total`` for counters."""
    running_sequences: int | None = figure("Sequences whose KV cache the stage holds.", GAUGE)
    steps: int | None = figure("Steps (micro-batches) run since the stage started.", COUNTER)
    steps_failed: int | None = figure("Steps that failed since the stage started.", COUNTER)
    tokens_processed: int | None = figure("Tokens run through the stage since it started.", COUNTER, "tokens")
    bytes_sent: int | None = figure("Activation bytes sent to the next stage since it started.", COUNTER)
    micro_batches_per_s: float | None = figure("Steps per second over the last heartbeat window.")
    tokens_per_s: float | None = figure("Tokens per second over the last heartbeat window.")
    step_latency: dict | None = figure("Duration of the stage's steps (``stagemesh.runtime.histogram``).",
                                       HISTOGRAM, "step_latency_seconds")
    busy_intervals: list | None = figure("Wall-clock [t0, t1] of the stage's last 256 steps.")
    busy_steps: list | None = figure("Step id of each of ``busy_intervals``, in the same order.")
    rank_pids: list | None = figure("Process id of each tensor-parallel rank, rank 0's first.")
    rank_weight_bytes: list | None = figure("Weight bytes held by each tensor-parallel rank.", LABELLED,
                                             "weight_bytes")
    expert_bytes_sent: int | None = figure("Bytes of rows sent to expert workers since the stage started.")
    expert_rows_sent: int | None = figure("Rows sent to expert workers since the stage started.")
    expert_retries: int | None = figure("Expert batches sent again to another replica since the stage started.")

    @property
    def intervals(self) -> list:
        return self.busy_intervals if isinstance(self.busy_intervals, list) else []

    @property
    def interval_steps(self) -> list:
        """The step id of each of ``intervals`` (None for each when the stage did not publish them)."""
        steps = self.busy_steps if isinstance(self.busy_steps, list) else []
        return steps if len(steps) == len(self.intervals) else [None] * len(self.intervals)


@dataclass(frozen=True)
class ExpertFigures(WorkerFigures):
    """What an expert worker publishes with each heartbeat."""

    PREFIX = "stagemesh_expert_worker_"
    """Its Prometheus series' prefix."""

    busy_fraction: float | None = figure("Share of the last heartbeat window spent running experts.", GAUGE)
    queue_depth: int | None = figure("Expert batches received and not yet answered.", GAUGE)
    weight_bytes: int | None = figure("Weight bytes of the experts it holds.", GAUGE)
    batches: int | None = figure("Expert batches run since the worker started.", COUNTER)
    tokens_processed: int | None = figure("Token rows run through its experts since it started.", COUNTER, "tokens")
    expert_tokens: dict | None = figure('Token rows run by each expert: {"<layer>:<expert>": rows}.', LABELLED,
                                        "stagemesh_expert_tokens")
    """NOTE: its series is named in full (labels layer and expert), not after the prefix."""


FIGURES_BY_ROLE: dict[str, type[WorkerFigures]] = {"stage": StageFigures, "expert": ExpertFigures}


def figures_of(role: str, doc: dict[str, Any]) -> WorkerFigures:
    """A worker's figures as its role publishes them, from ``Store.get_metrics``' JSON values."""
    return FIGURES_BY_ROLE.get(role, WorkerFigures).from_json(doc)


@dataclass(frozen=True)
class WorkerLoad:
    """One worker's load as the status document shows it (``WorkerStatus.load`` on the wire).

    A field named as a figure is that figure as the worker last published it (0 when it did
    not); the step latency quantiles and the bubble are derived by the gateway.
    """

    queue_depth: int = 0
    running_sequences: int = 0
    kv_blocks_used: int = 0
    kv_blocks_total: int = 0
    busy_fraction: float = 0.0
    tokens_processed: int = 0
    step_latency_p50_s: float = 0.0
    """Median duration of the stage's last 256 steps."""
    step_latency_p99_s: float = 0.0
    micro_batches_per_s: float = 0.0
    tokens_per_s: float = 0.0
    bubble_fraction: float = 0.0
    """Share of the recent time its chain worked while this stage was idle (``gateway.stage_stats``)."""
    bytes_sent: int = 0
    expert_tokens: dict[str, int] = field(default_factory=dict)
    """Expert workers only: ``{"<layer>:<expert>": rows}``; left out of the document when empty."""

    @classmethod
    def of(cls, figures: WorkerFigures, latency: tuple[float, float] = (0.0, 0.0), bubble: float = 0.0) -> WorkerLoad:
        """The load of ``figures``, with what the gateway derives: the step ``latency`` (p50, p99)
        and the ``bubble``."""
        copied = {f.name: type(f.default)(_number(getattr(figures, f.name, None)))
                  for f in fields(cls) if f.name in LOAD_NUMBERS}
        tokens = getattr(figures, "expert_tokens", None)
        held = {key: int(_number(n)) for key, n in tokens.items()} if isinstance(tokens, dict) else {}
        return replace(cls(**copied, expert_tokens=held), step_latency_p50_s=latency[0],
                       step_latency_p99_s=latency[1], bubble_fraction=bubble)

    def to_json(self) -> dict[str, Any]:
        doc = asdict(self)
        if not self.expert_tokens:
            del doc["expert_tokens"]
        return doc


LOAD_NUMBERS = tuple(f.name for f in fields(WorkerLoad) if f.name != "expert_tokens")
"""The load's number fields, in proto order: the status codec's columns."""


def _number(value: Any) -> float:
    return value if isinstance(value, (int, float)) and not isinstance(value, bool) else 0
