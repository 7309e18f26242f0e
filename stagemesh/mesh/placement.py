"""Expert placement: which expert worker holds which (layer, expert), and how a layer's rows split.

Torch-free. The launcher plans the placement into the topology (per chain, a list of expert
workers and the experts each holds); the gateway copies it to Redis and keeps each worker's
liveness current there (``Store.set_placement``); a stage reads it and, for every MoE layer
of every micro-batch, splits the rows grouped by expert between the live workers with
``split_rows``.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from stagemesh.mesh.store import ExpertReplica, expert_worker_id
from stagemesh.mesh.topology import Chain, ExpertWorker


def chain_replicas(chain: Chain) -> list[ExpertReplica]:
    """The expert workers the topology gives ``chain`` (all live); empty without expert workers."""
    return [_replica(chain.index, w) for w in chain.expert_workers]


def _replica(chain: int, worker: ExpertWorker) -> ExpertReplica:
    held = {layer: list(ids) for layer, ids in worker.experts.items()}
    return ExpertReplica(expert_worker_id(chain, worker.index), worker.address, held)


def holders(replicas: list[ExpertReplica], layer: int, exclude: frozenset[str] = frozenset()) -> dict[int, list[str]]:
    """Expert id -> the live workers (ids, sorted) that hold it in ``layer``, leaving out ``exclude``."""
    out: dict[int, list[str]] = {}
    for r in sorted(replicas, key=lambda r: r.worker_id):
        if r.live and r.worker_id not in exclude:
            for expert in r.experts.get(layer, ()):
                out.setdefault(expert, []).append(r.worker_id)
    return out


@dataclass
class Share:
    """One worker's part of one layer's rows grouped by expert."""

    pieces: list[tuple[int, int, int]] = field(default_factory=list)
    """``(expert, start, end)``: rows ``[start, end)`` of the grouped rows go to ``expert``; by
    increasing expert, then start. The rows sent are the pieces' rows, in this order."""

    @property
    def expert_ids(self) -> list[int]:
        """The experts it runs, increasing (what ``Expert.Run`` is told)."""
        return sorted({expert for expert, _, _ in self.pieces})

    @property
    def counts(self) -> list[int]:
        """Rows for each of ``expert_ids``."""
        rows: dict[int, int] = {}
        for expert, start, end in self.pieces:
            rows[expert] = rows.get(expert, 0) + end - start
        return [rows[e] for e in sorted(rows)]

    @property
    def num_rows(self) -> int:
        return sum(end - start for _, start, end in self.pieces)


class NoReplica(LookupError):
    """Rows were routed to an expert that no live worker holds."""

    def __init__(self, expert: int):
        super().__init__(f"no live worker holds expert {expert}")
        self.expert = expert


def grouped_spans(counts: list[int]) -> list[tuple[int, int, int]]:
    """``(expert, start, end)`` of each expert's rows when ``counts[e]`` rows of expert ``e`` come
    one expert after the other (``dispatch``'s order); experts without rows are left out."""
    spans, start = [], 0
    for expert, n in enumerate(counts):
        if n:
            spans.append((expert, start, start + n))
        start += n
    return spans


def split_rows(spans: list[tuple[int, int, int]], who: dict[int, list[str]]) -> dict[str, Share]:
    """Which rows each worker gets: the rows ``[start, end)`` of ``expert`` go to the workers
    ``who[expert]``, cut into near-equal consecutive pieces when it has several (replicas).

    NOTE: a worker's pieces are kept by increasing expert, so the rows it is sent are again
    grouped by increasing expert id, which is what an ``Expert.Run`` request says. Workers
    that get no rows get no share (and no request). Raises ``NoReplica`` for an expert with
    rows and no worker.
    """
    shares: dict[str, Share] = {}
    for expert, start, end in sorted(spans):
        workers = who.get(expert, [])
        if not workers:
            raise NoReplica(expert)
        for worker, size in zip(workers, _pieces(end - start, len(workers))):
            if size:
                shares.setdefault(worker, Share()).pieces.append((expert, start, start + size))
                start += size
    return shares


def _pieces(n: int, k: int) -> list[int]:
    """``n`` cut into ``k`` sizes that differ by at most one, the larger first."""
    base, extra = divmod(n, k)
    return [base + (i < extra) for i in range(k)]
