"""What `stagemesh up` (and `stagemesh compose`) is asked for, and the topology planned from it.

``UpOptions`` is the request; ``plan_topology`` turns it into the ``Topology`` the launcher
writes to Redis (``write_topology``) and every worker reads its place from. Nothing here starts
a process: ``stagemesh.deploy.launch`` does that.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from stagemesh.config import ModelConfig, StageSpec
from stagemesh.deploy.supervise import RestartPolicy
from stagemesh.mesh.layout import (
    chain_devices,
    expert_devices,
    place_experts,
    split_layers,
    stage_devices,
    validate_layout,
)
from stagemesh.mesh.signing import Signer
from stagemesh.mesh.store import Store, expert_worker_id, stage_worker_id
from stagemesh.mesh.topology import Chain, ExpertWorker, Stage, Topology
from stagemesh.runtime import cpus
from stagemesh.runtime.api_keys import NO_KEYS, ApiKeys
from stagemesh.runtime.net import free_port
from stagemesh.runtime.procs import LIVENESS_S
from stagemesh.runtime.tls import ServingCert


@dataclass(frozen=True)
class UpOptions:
    """What `stagemesh up` was asked for."""

    model: Path
    pp: int = 1
    tp: int = 1
    """Tensor-parallel ranks per stage, one process and one device each."""
    dp: int = 1
    """Data-parallel chains: complete replicas (stages and expert workers), one after the other on the GPUs."""
    tp_backend: str | None = None
    """torch.distributed backend of the TP ranks; None: nccl on CUDA, gloo on CPU."""
    ep: int = 0
    """Expert worker processes per chain, one device each; 0 keeps the experts in the stages."""
    expert_replicas: int = 1
    """Expert workers that hold each expert (of each MoE layer); at most ``ep``."""
    device: str = "cpu"
    host: str = "127.0.0.1"
    port: int = 50051
    """The client port, served by every frontend (``stagemesh.v1.Gateway``)."""
    http_port: int | None = None
    """The HTTP port, served by every frontend: the OpenAI-compatible API, and the gateway's dashboard,
    ``/api/status``, ``/metrics`` and ``/healthz`` passed through from its own private HTTP port; None: none."""
    served_model_name: str | None = None
    """The model's name in the OpenAI API; None: the checkpoint directory's name."""
    frontends: int | None = None
    """Frontend processes sharing the client port; None: ``default_frontends()`` for this host."""
    spare_frontends: int = 0
    """Frontend processes more than ``frontends``, warm (loaded, linked to the gateway), that bind the
    client port only when a serving frontend exits (``frontend.frontend.Frontend._take_slot``)."""
    standby_gateway: bool = False
    """A second gateway process, warm, that takes over the moment the first exits (``gateway.lead``)."""
    standby_fence_s: float | None = None
    """With ``standby_gateway``: the standby kills a leader that answered no health check this long
    (frozen) and takes over; None: the gateway's default (10 s)."""
    redis_url: str | None = None
    deployment: str = "default"
    dtype: str | None = None
    kv_blocks: int | None = None
    log_dir: Path | None = None
    try_prompt: str | None = None
    """Once ready, send this prompt through the gateway and print the reply."""
    restart: bool = True
    """Restart a worker, the gateway or a frontend that exits (False: its exit stops the mesh)."""
    liveness_s: float = LIVENESS_S
    """Kill (to restart) a worker, the gateway or a frontend (with ``restart``) or the local Redis that
    served and then answered no health check this long (frozen: ``stagemesh.deploy.liveness``); 0: never."""
    overlap: bool = True
    """Overlap scheduling (the gateway's ``--no-overlap`` when False)."""
    micro_batches: int | None = None
    """The gateway's ``--micro-batches``; None: one per stage, fewer on CPU when the stages share
    too few cores to compute at once (``Mesh.micro_batches``)."""
    max_num_seqs: int | None = None
    """The gateway's ``--max-num-seqs`` (None: its default)."""
    max_waiting: int | None = None
    """The gateway's ``--max-waiting``: requests a chain queues before refusing RESOURCE_EXHAUSTED."""
    failover_wait_s: float | None = None
    """The gateway's ``--failover-wait-s``: how long a running request waits for a chain."""
    resume_window_s: float | None = None
    """The gateway's ``--resume-window-s``: how long a request whose frontend died waits to be resumed."""
    fault_injection: bool = False
    """Serve the workers' ``Admin.InjectFault`` (``--enable-fault-injection``): for chaos tests only."""
    cpu_bind: bool = True
    """Give each compute process cores of its own (``stagemesh.runtime.cpus``) when there are enough."""
    api_keys: ApiKeys = NO_KEYS
    """The keys the frontends ask clients for (``stagemesh.runtime.api_keys``); none: no check."""
    insecure: bool = False
    """No mTLS between the mesh's processes and no password on the local Redis (``--insecure``; the
    ready line says so). By default both are on, loopback included (``stagemesh.deploy.run_secrets``)."""
    tls_dir: Path | None = None
    """The mesh's certificates (`stagemesh certs DIR`); None: made for the run."""
    serving_cert: ServingCert | None = None
    """Server-side TLS on the frontends' client and HTTP ports (``--tls-cert``/``--tls-key``); None: plaintext."""
    restart_policy: RestartPolicy = RestartPolicy()
    gpus: int | None = None
    """GPUs the layout may book on CUDA; None counts this machine's visible ones (`stagemesh compose`
    plans for other machines)."""
    advertise: Callable[[str, list[str]], str] | None = None
    """(worker id, its devices) -> the ``host:port`` it listens on and peers reach it at; None:
    ``host`` and a free local port (`stagemesh compose` gives service or host names)."""


def plan_topology(opts: UpOptions) -> Topology:
    """The topology: ``dp`` chains, each with its stages (layers, addresses, devices) and (with
    ``ep``) its expert workers with the experts each holds.

    Every chain is a complete replica on its own ports; on CUDA chain ``c`` takes the
    ``pp × tp + ep`` GPUs after chain ``c - 1``'s, so no GPU is booked twice. ValueError
    (before anything starts) when the model or the machine cannot take the layout.
    """
    if opts.standby_fence_s is not None and not (opts.standby_gateway and opts.standby_fence_s > 0):
        raise ValueError(f"--standby-fence-s {opts.standby_fence_s}: give it with --standby-gateway, and more than 0 s")
    if opts.liveness_s < 0:
        raise ValueError(f"--liveness-s {opts.liveness_s}: give how long a process may answer nothing, or 0: never")
    if opts.spare_frontends < 0:
        raise ValueError(f"--spare-frontends {opts.spare_frontends}: give how many spare frontends, or 0: none")
    config = ModelConfig.from_dir(opts.model)
    gpus = (visible_gpus() if opts.gpus is None else opts.gpus) if opts.device == "cuda" else None
    validate_layout(config, opts.pp, opts.tp, ep=opts.ep, dp=opts.dp, gpus=gpus)
    specs = split_layers(config, opts.pp)
    per_chain = chain_devices(opts.pp, opts.tp, opts.ep)
    return Topology(
        model=str(opts.model.resolve()),
        num_layers=config.num_hidden_layers,
        chains=tuple(_plan_chain(c, config, specs, opts, first_gpu=c * per_chain) for c in range(opts.dp)),
        block_size=16,
        dtype=opts.dtype,
    )


def _plan_chain(chain: int, config: ModelConfig, specs: list[StageSpec], opts: UpOptions, first_gpu: int) -> Chain:
    """One chain: its stages, then its expert workers on the GPUs after its stages'."""
    devices = stage_devices(opts.device, opts.pp, opts.tp, first_gpu)
    stages = tuple(
        Stage(
            index=i,
            start_layer=spec.start_layer,
            end_layer=spec.end_layer,
            address=_address(opts, stage_worker_id(chain, i), devices[i]),
            devices=tuple(devices[i]),
            mlp_only_start=spec.mlp_only_start,
            attn_only_end=spec.attn_only_end,
            tp_backend=opts.tp_backend,
            kv_blocks=opts.kv_blocks,
        )
        for i, spec in enumerate(specs)
    )
    return Chain(chain, stages, _plan_experts(config, opts, chain, first_gpu + opts.pp * opts.tp))


def _plan_experts(config: ModelConfig, opts: UpOptions, chain: int, first_gpu: int) -> tuple[ExpertWorker, ...]:
    """One chain's expert workers (none without ``ep``), on CUDA from GPU ``first_gpu`` on."""
    if not opts.ep:
        if opts.expert_replicas != 1:
            raise ValueError(f"expert replicas={opts.expert_replicas} needs expert workers: give --ep too")
        return ()
    held = place_experts(config, opts.ep, opts.expert_replicas)
    devices = expert_devices(opts.device, first_gpu, opts.ep)
    return tuple(
        ExpertWorker(w, _address(opts, expert_worker_id(chain, w), [devices[w]]), devices[w],
                     {layer: tuple(sorted(ids)) for layer, ids in sorted(experts.items())})
        for w, experts in enumerate(held)
    )


def _address(opts: UpOptions, worker_id: str, devices: list[str]) -> str:
    """Where worker ``worker_id`` listens and is reached: ``opts.advertise``'s answer, else ``host`` and a free port."""
    if opts.advertise is not None:
        return opts.advertise(worker_id, devices)
    return f"{opts.host}:{free_port()}"


def visible_gpus() -> int:
    import torch  # only the GPU path needs it

    return torch.cuda.device_count()


def default_frontends() -> int:
    """One frontend per 8 cores this process may use, at least 1 and at most 4: a frontend
    streams thousands of tokens per second per core, and the cores are the model's first."""
    return max(1, min(4, len(cpus.available()) // 8))


async def write_topology(url: str, deployment: str, topology: Topology, *, if_absent: bool = False,
                          signer: Signer | None = None) -> bool:
    """Write ``topology`` (with ``if_absent``, only where there is none that verifies); whether it
    wrote it. ``signer``: the mesh key's, which signs it (None: unsigned, ``--insecure``)."""
    store = await Store.connect(url, deployment, signer=signer)
    try:
        if if_absent:
            return await store.set_topology_if_absent(topology)
        await store.set_topology(topology)
        return True
    finally:
        await store.close()
