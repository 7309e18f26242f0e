"""`stagemesh bench`: the same seeded requests through a mesh and, to compare, through the
in-process engine and Hugging Face ``transformers``; throughput, latency, stage busy time,
pipeline bubble, per-step overhead, where the CPU goes and the fraction of the machine's
roofline, as a table or one JSON document.

The modules: ``workload`` (requests, arrivals, latency statistics), ``mesh`` (bring-up,
the SDK client load, stage figures from Redis), ``cpu`` (CPU per process from ``/proc``),
``local`` (in-process engine and transformers), ``roofline`` (FLOPs and bytes needed, machine
calibration), ``report``.
"""

from __future__ import annotations

import dataclasses
import json
import os
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from tqdm import tqdm

from stagemesh.cli.bench.report import comparisons, format_text, system_figures, workload_figures
from stagemesh.cli.bench.roofline import flops_needed, measure_machine, model_cost
from stagemesh.cli.bench.workload import BenchRequest, LoadShape, SystemRun, make_requests
from stagemesh.cli.connect import DEFAULT, Connect
from stagemesh.config import ModelConfig
from stagemesh.model import torch_thread

SYSTEMS = ("hf", "inprocess")
"""What ``--compare`` can name."""


@dataclass(frozen=True)
class BenchSpec:
    """One `stagemesh bench` run."""

    model: Path
    """Checkpoint directory: loaded by the mesh and the compared systems, read for the figures."""
    shape: LoadShape
    pp: int = 1
    """Pipeline stages of the mesh brought up for the run (ignored with ``addr``)."""
    tp: int = 1
    """Tensor-parallel ranks per stage of that mesh (ignored with ``addr``)."""
    dp: int = 1
    """Data-parallel chains of that mesh (ignored with ``addr``)."""
    addr: str | None = None
    """Benchmark the running mesh at this gateway instead of bringing one up."""
    redis_url: str | None = None
    """That mesh's Redis, for per-stage busy figures (only with ``addr``)."""
    compare: tuple[str, ...] = ()
    """Systems to run the same requests through as well: ``hf``, ``inprocess``."""
    mesh: bool = True
    """False (``--no-mesh``): run only the compared systems."""
    device: str = "cpu"
    calibrate_s: float = 3.0
    """Seconds of the roofline calibration (matmul or copy) at startup."""
    log_dir: Path | None = None
    """Where the workers of a mesh brought up for the run write their logs."""
    overlap: bool = True
    """Overlap scheduling in the mesh brought up, and in the in-process engine (pp=1 there)."""
    micro_batches: int | None = None
    """The mesh brought up's ``--micro-batches``; None: what ``stagemesh up`` picks."""
    cpu_bind: bool = True
    """Each worker of the mesh brought up on cores of its own (``stagemesh.runtime.cpus``)."""
    insecure: bool = False
    """The mesh brought up without mTLS between its processes or a Redis password (``--insecure``):
    the same run with and without it is what encrypting the activations costs."""
    connect: Connect = DEFAULT
    """How the client reaches the mesh at ``addr``: its API key and TLS (never in the JSON document)."""

    def __post_init__(self) -> None:
        unknown = set(self.compare) - set(SYSTEMS)
        if unknown:
            raise ValueError(f"--compare {','.join(sorted(unknown))}: choose among {','.join(SYSTEMS)}")
        if self.pp < 1 or self.tp < 1 or self.dp < 1:
            raise ValueError(f"--pp={self.pp}, --tp={self.tp} and --dp={self.dp} must be at least 1")
        if not self.mesh and not self.compare:
            raise ValueError("--no-mesh leaves nothing to run: add --compare hf,inprocess")
        if self.redis_url and not self.addr:
            raise ValueError("--redis-url goes with --addr (a mesh brought up here has its own Redis)")
        if self.micro_batches is not None and (self.addr or self.micro_batches < 1):
            raise ValueError(f"--micro-batches={self.micro_batches} must be at least 1, for a mesh brought up here "
                             "(not with --addr)")
        if self.calibrate_s <= 0:
            raise ValueError(f"--calibrate-s={self.calibrate_s} must be positive")

    @property
    def layout(self) -> str:
        if self.addr:
            return f"at {self.addr}"
        return (f"pp={self.pp} tp={self.tp}" + (f" dp={self.dp}" if self.dp > 1 else "")
                + (f" micro-batches={self.micro_batches}" if self.micro_batches else ""))


def run_bench(spec: BenchSpec) -> dict:
    """Runs the benchmark and returns its JSON document (see ``report``)."""
    config = ModelConfig.from_dir(spec.model)
    cost = model_cost(spec.model)
    reserved = (*config.eos_token_ids, *(() if config.bos_token_id is None else (config.bos_token_id,)))
    requests = make_requests(spec.shape, config.vocab_size, reserved)
    flops = flops_needed(cost, requests)
    load_before = os.getloadavg()[0]
    # NOTE: every torch computation of this process (calibration, the in-process engine,
    # transformers) runs on one thread: see ``stagemesh.model.torch_thread``.
    machine = torch_thread.call(measure_machine, spec.device, spec.calibrate_s)
    runs = []
    if spec.mesh:
        runs.append(_run_mesh(spec, requests))
    if "inprocess" in spec.compare:
        from stagemesh.cli.bench.local import run_inprocess

        runs.append(run_inprocess(spec.model, requests, device=spec.device, overlap=spec.overlap, bar=_bar("inprocess", requests)))
    if "hf" in spec.compare:
        from stagemesh.cli.bench.local import run_hf

        runs.append(torch_thread.call(run_hf, spec.model, requests, device=spec.device, dtype=config.dtype,
                                      bar=_bar("hf", requests)))
    # NOTE: other processes on the machine skew every figure; the 1-minute load average, before
    # and after, tells a reader whether the machine was quiet.
    machine["load_average_1m"] = [load_before, os.getloadavg()[0]]
    systems = {r.name: system_figures(r, flops, cost, machine) for r in runs}
    ratios, agree = comparisons(systems)
    return {
        "config": _config_json(spec),
        "model": {"family": config.family, "hidden_size": config.hidden_size, "vocab_size": config.vocab_size,
                  "dtype": config.dtype, **cost.to_json()},
        "workload": workload_figures(requests, spec.shape, flops),
        "machine": machine,
        "systems": systems,
        "ratios": ratios,
        "greedy_match": agree,
    }


def _run_mesh(spec: BenchSpec, requests: list[BenchRequest]) -> SystemRun:
    from stagemesh.cli.bench.mesh import mesh_up, run_mesh

    bar = _bar(f"mesh {spec.layout}", requests)
    if spec.addr:
        return run_mesh("mesh", spec.addr, spec.redis_url, requests, spec.shape, bar, connect=spec.connect)
    up = mesh_up(
        spec.model, pp=spec.pp, tp=spec.tp, dp=spec.dp, device=spec.device, log_dir=spec.log_dir, overlap=spec.overlap,
        micro_batches=spec.micro_batches, cpu_bind=spec.cpu_bind, insecure=spec.insecure,
    )
    with up as (addr, redis_url, procs):
        return run_mesh("mesh", addr, redis_url, requests, spec.shape, bar, procs)


def _bar(label: str, requests: list[BenchRequest]) -> Callable[[], tqdm]:
    """A progress bar (stderr) of the output tokens, opened by the runner when its timed part starts."""
    total = sum(r.output_len for r in requests)
    return lambda: tqdm(total=total, desc=label, unit="tok", file=sys.stderr, mininterval=0.5)


def _config_json(spec: BenchSpec) -> dict:
    doc = {k: v for k, v in dataclasses.asdict(spec).items() if k not in ("shape", "connect")}
    doc.update(dataclasses.asdict(spec.shape), model=str(spec.model), log_dir=spec.log_dir and str(spec.log_dir))
    doc["compare"] = list(spec.compare)
    doc["layout"] = spec.layout
    return doc


def run(spec: BenchSpec, as_json: bool) -> int:
    """`stagemesh bench`: the figures to stdout (table, or one JSON document with ``as_json``)."""
    try:
        doc = run_bench(spec)
    except RuntimeError as e:  # a mesh that would not come up, a system that failed requests
        print(f"error: {e}", file=sys.stderr)
        return 1
    print(json.dumps(doc) if as_json else format_text(doc))
    return 0
