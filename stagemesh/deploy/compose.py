"""`stagemesh compose` and `stagemesh topology`: the plan `stagemesh up` would start, as a docker
compose deployment of GPU-pinned services (where each worker runs: ``stagemesh.deploy.compose_plan``).

NOTE: over 400 lines: the renderer (``compose_document``), the process command lines that the
Kubernetes renderer (``stagemesh.deploy.k8s_objects``) shares with it, and the two commands'
flags and ``run_*``. The commands belong in a module of their own (as ``up.py`` is to
``launch.py``); the move waits for a change that carries ``k8s.py``'s and the tests' imports.
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import shlex
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from stagemesh.deploy.compose_plan import DEFAULT_GPUS, TARGETS, Host, Layout, Worker, in_container, plan, workers
from stagemesh.deploy.compose_secrets import DEFAULT_DIR as DEFAULT_SECRETS_DIR
from stagemesh.deploy.compose_secrets import secure, secure_redis, top_level
from stagemesh.deploy.hub import ModelSource, add_model_arguments, resolve_model
from stagemesh.runtime.api_keys import read_key_file

GATEWAY_PORT = 50051
"""The client port (``stagemesh.v1.Gateway``) inside a frontend's container."""
SCHEDULING_PORT = 50052
"""The gateway's ``Scheduling`` port, which the frontends reach (not published)."""
HTTP_PORT = 8080
"""The gateway's HTTP port inside its container (``deploy/prometheus.yml`` scrapes ``gateway:8080``)."""
REDIS_PORT = 6379
API_KEYS_SECRET = "api_keys"
"""The compose secret holding the frontends' API keys (``--api-key-file``)."""
MODEL_DIR = "/model"
"""Where every container sees the checkpoint (mounted read-only)."""
REDIS_IMAGE = "redis:7.4"
PROMETHEUS_IMAGE = "prom/prometheus:v2.54.1"
GRAFANA_IMAGE = "grafana/grafana:11.2.0"
TOPOLOGY_WAIT_S = "600"
"""Workers wait this long for the topology (on a second host, the first may start later)."""
HEALTHCHECK = {"interval": "10s", "timeout": "5s", "retries": 3, "start_period": "15m"}
"""start_period: loading a large checkpoint takes minutes; failures then do not count."""


# --- rendering -----------------------------------------------------------------------------


@dataclass(frozen=True)
class Render:
    """How the compose file names images, paths and ports."""

    image: str = "stagemesh:latest"
    model_mount: str = "./model"
    """Host directory mounted read-only at ``/model`` (relative: to the compose file)."""
    model_dir: str = MODEL_DIR
    """The checkpoint directory inside the containers: ``/model``, or for a Hugging Face repo (whose
    cache folder is mounted, so that its snapshot's symlinks into ``blobs/`` resolve) its snapshot."""
    model_args: tuple[str, ...] = ()
    """The header's ``--model`` (and ``--revision``) when the model was given as a repo id; empty:
    ``--model model_mount``."""
    for_host: str | None = None
    """With ``hosts``: render this host's file (default: the first host's)."""
    port: int = GATEWAY_PORT
    """Host port of the client gRPC (the first frontend's; replica ``i`` publishes ``port + i``)."""
    frontends: int = 1
    """Replicas of the frontend service (``docker compose up --scale frontend=N`` changes it later,
    within the published port range)."""
    http_port: int = HTTP_PORT
    """Host port of the gateway's HTTP (dashboard, /metrics)."""
    secrets_dir: str | None = DEFAULT_SECRETS_DIR
    """`stagemesh certs DIR`'s directory on the compose host (relative: to the compose file): the mesh's
    certificates and the Redis password, mounted as compose secrets (``compose_secrets``); None:
    ``--insecure``, no TLS between the services and no Redis password."""
    api_key_file: str | None = None
    """A file of API keys on the compose host (one a line; relative: to the compose file), given to
    the frontends as the compose secret ``api_keys``; None: no keys (any client may call)."""


def render(layout: Layout, how: Render) -> str:
    """The compose file (YAML text, with a header saying how to render it again)."""
    import yaml

    body = yaml.dump(compose_document(layout, how), Dumper=yaml_dumper(), sort_keys=False, width=160)
    return header(layout, how) + body


def yaml_dumper() -> type:
    """The YAML style of rendered files (compose's and Kubernetes'): every object spelled out, flat lists on one line."""
    import yaml

    class Dumper(yaml.SafeDumper):
        def ignore_aliases(self, data: Any) -> bool:  # every service spelled out, no &anchors
            return True

        def represent_list(self, data: list) -> Any:  # argv and ports on one line: [a, b]
            flat = all(isinstance(item, (str, int)) for item in data)
            return self.represent_sequence("tag:yaml.org,2002:seq", data, flow_style=flat)

    Dumper.add_representer(list, Dumper.represent_list)
    return Dumper


def compose_document(layout: Layout, how: Render) -> dict[str, Any]:
    """The compose file as a dict: the first host's services, or another host's workers."""
    first = layout.hosts[0].name if layout.hosts else None
    here = how.for_host or first
    if layout.hosts and here not in {h.name for h in layout.hosts}:
        raise ValueError(f"--for-host {here} is not one of --hosts {','.join(h.name for h in layout.hosts)}")
    if not layout.hosts and how.for_host:
        raise ValueError("--for-host needs --hosts")
    topology = plan(layout)
    mine = [w for w in workers(topology) if layout.locate(w.gpus[0])[0] == here]
    redis_url = f"redis://{'redis' if here == first else first}:{REDIS_PORT}/0"
    services: dict[str, Any] = {}
    if here == first:
        services["redis"] = _redis(layout)
        services["planner"] = _planner(layout, how)
    for worker in mine:
        services[worker.name] = _worker(worker, layout, how, redis_url, local=here == first)
    if here == first:
        services["gateway"] = _gateway(layout, how, [w.name for w in mine])
        services["frontend"] = _with_api_keys(_frontend(layout, how), how)
        services["prometheus"] = _prometheus()
        services["grafana"] = _grafana()
    if how.secrets_dir:
        services = {name: _secured(name, service) for name, service in services.items()}
    doc: dict[str, Any] = {"name": "stagemesh", "services": services}
    if how.secrets_dir:
        doc["secrets"] = top_level(services, how.secrets_dir)
    if here == first:
        doc["volumes"] = {"redis-data": {}}
        if how.api_key_file:
            doc.setdefault("secrets", {})[API_KEYS_SECRET] = {"file": how.api_key_file}
    return doc


def _redis(layout: Layout) -> dict[str, Any]:
    service = {
        "image": REDIS_IMAGE,
        "command": ["redis-server", "--appendonly", "yes"],
        "volumes": [{"type": "volume", "source": "redis-data", "target": "/data"}],
        "healthcheck": {"test": ["CMD", "redis-cli", "ping"], "interval": "5s", "timeout": "3s", "retries": 5},
        "restart": "unless-stopped",
    }
    if layout.hosts:  # the other hosts' workers reach it here
        service["ports"] = [f"{REDIS_PORT}:{REDIS_PORT}"]
    return service


def _planner(layout: Layout, how: Render) -> dict[str, Any]:
    """One-shot: writes the topology (container devices, advertised addresses) and exits 0."""
    return {
        "image": how.image,
        "command": ["stagemesh", "topology", *layout_args(layout, how.model_dir),
                    "--redis-url", f"redis://redis:{REDIS_PORT}/0"],
        "volumes": [_model_volume(how)],
        "depends_on": {"redis": {"condition": "service_healthy"}},
        "restart": "no",
    }


def _worker(worker: Worker, layout: Layout, how: Render, redis_url: str, local: bool) -> dict[str, Any]:
    port = worker.address.rpartition(":")[2]
    service: dict[str, Any] = {
        "image": how.image,
        "command": worker_command(worker, layout.deployment, redis_url),
        "volumes": [_model_volume(how)],
        "deploy": {"resources": {"reservations": {"devices": [{
            "driver": "nvidia",
            "device_ids": [str(layout.locate(gpu)[1]) for gpu in worker.gpus],
            "capabilities": ["gpu"],
        }]}}},
        "healthcheck": _health(f"127.0.0.1:{port}"),
        "restart": "unless-stopped",
    }
    if len(worker.gpus) > 1:
        service["shm_size"] = "2gb"  # NCCL between the TP ranks goes through /dev/shm (docker's default: 64 MB)
    if layout.hosts:
        service["ports"] = [f"{port}:{port}"]
    if local:
        service["depends_on"] = {
            "redis": {"condition": "service_healthy"},
            "planner": {"condition": "service_completed_successfully"},
        }
    return service


def _gateway(layout: Layout, how: Render, local_workers: list[str]) -> dict[str, Any]:
    depends = {"redis": {"condition": "service_healthy"}}
    depends.update({name: {"condition": "service_healthy"} for name in local_workers})
    return {
        "image": how.image,
        "command": gateway_command(layout.deployment, f"redis://redis:{REDIS_PORT}/0"),
        "volumes": [_model_volume(how)],
        "healthcheck": _health(f"127.0.0.1:{SCHEDULING_PORT}"),
        "depends_on": depends,
        "restart": "unless-stopped",
    }


def _frontend(layout: Layout, how: Render) -> dict[str, Any]:
    """The client-facing service: ``how.frontends`` replicas, each on its own host ports of two
    ranges: gRPC, and HTTP (the OpenAI API, and the gateway's dashboard and /metrics passed through)."""
    return {
        "image": how.image,
        "command": frontend_command(layout.deployment, f"redis://redis:{REDIS_PORT}/0", gateway="gateway"),
        "ports": [f"{_host_ports(how.port, how.frontends)}:{GATEWAY_PORT}",
                  f"{_host_ports(how.http_port, how.frontends)}:{HTTP_PORT}"],
        "volumes": [_model_volume(how)],
        "deploy": {"replicas": how.frontends},
        "healthcheck": _health(f"127.0.0.1:{GATEWAY_PORT}"),
        "depends_on": {"gateway": {"condition": "service_healthy"}},
        "restart": "unless-stopped",
    }


def worker_command(worker: Worker, deployment: str, redis_url: str) -> list[str]:
    """A worker's argv (shared with the Kubernetes manifests, ``stagemesh.deploy.k8s``)."""
    return ["python", "-m", worker.module_args[0], "--redis-url", redis_url, "--deployment", deployment,
            *worker.module_args[1:], "--topology-wait-s", TOPOLOGY_WAIT_S]


def gateway_command(deployment: str, redis_url: str) -> list[str]:
    """The gateway's argv: ``Scheduling`` on ``SCHEDULING_PORT``, HTTP on ``HTTP_PORT``, every interface."""
    return ["python", "-m", "gateway", "--redis-url", redis_url, "--deployment", deployment,
            "--host", "0.0.0.0", "--port", str(SCHEDULING_PORT), "--http-port", str(HTTP_PORT)]


def frontend_command(deployment: str, redis_url: str, *, gateway: str) -> list[str]:
    """A frontend's argv: clients on ``GATEWAY_PORT`` and ``HTTP_PORT``; ``gateway``: the gateway's host name."""
    return ["python", "-m", "frontend", "--redis-url", redis_url, "--deployment", deployment,
            "--gateway", f"{gateway}:{SCHEDULING_PORT}", "--host", "0.0.0.0", "--port", str(GATEWAY_PORT),
            "--topology-wait-s", TOPOLOGY_WAIT_S, "--http-port", str(HTTP_PORT), "--gateway-http", f"{gateway}:{HTTP_PORT}"]


def _secured(name: str, service: dict[str, Any]) -> dict[str, Any]:
    """``service`` with the secrets its role needs (``compose_secrets``); monitoring holds none."""
    if name == "redis":
        return secure_redis(service)
    if name in ("prometheus", "grafana"):
        return service
    role = {"planner": None, "gateway": "gateway", "frontend": "frontend"}.get(name, name.partition("-")[0])
    return secure(service, role, probe=name != "frontend")  # a frontend's check asks its client port


def _with_api_keys(service: dict[str, Any], how: Render) -> dict[str, Any]:
    """The frontend service reading ``how.api_key_file``'s keys from its secret (a file under
    ``/run/secrets``): never in the compose file, an environment variable or a command line."""
    if not how.api_key_file:
        return service
    return {**service, "command": [*service["command"], "--api-key-file", f"/run/secrets/{API_KEYS_SECRET}"],
            "secrets": [*service.get("secrets", ()), API_KEYS_SECRET]}


def _host_ports(first: int, replicas: int) -> str:
    """One host port per replica: ``first``, or the range from it."""
    return str(first) if replicas == 1 else f"{first}-{first + replicas - 1}"


def _prometheus() -> dict[str, Any]:
    return {
        "image": PROMETHEUS_IMAGE,
        "profiles": ["monitoring"],
        "volumes": [_bind("./deploy/prometheus.yml", "/etc/prometheus/prometheus.yml")],
        "ports": ["9090:9090"],
        "restart": "unless-stopped",
    }


def _grafana() -> dict[str, Any]:
    return {
        "image": GRAFANA_IMAGE,
        "profiles": ["monitoring"],
        "volumes": [
            _bind("./deploy/grafana/provisioning", "/etc/grafana/provisioning"),
            _bind("./deploy/grafana/stagemesh.json", "/var/lib/grafana/dashboards/stagemesh.json"),
        ],
        "ports": ["3000:3000"],
        "depends_on": {"prometheus": {"condition": "service_started"}},
        "restart": "unless-stopped",
    }


def _health(address: str) -> dict[str, Any]:
    return {"test": ["CMD", "stagemesh", "health", "--addr", address], **HEALTHCHECK}


def _model_volume(how: Render) -> dict[str, Any]:
    return _bind(how.model_mount, MODEL_DIR)


def _bind(source: str, target: str) -> dict[str, Any]:
    return {"type": "bind", "source": source, "target": target, "read_only": True}


def layout_args(layout: Layout, model: str) -> list[str]:
    """The command-line options that give ``layout`` with ``--model model`` (shared by `compose` and `topology`)."""
    args = ["--model", model, "--pp", str(layout.pp), "--tp", str(layout.tp), "--ep", str(layout.ep),
            "--dp", str(layout.dp), "--expert-replicas", str(layout.expert_replicas)]
    if layout.hosts:
        args += ["--hosts", ",".join(f"{h.name}:{h.gpus}" for h in layout.hosts)]
    elif layout.target == "compose":  # Kubernetes needs no GPU count (compose_plan.plan)
        args += ["--gpus", str(layout.gpus)]
    if layout.deployment != "default":
        args += ["--deployment", layout.deployment]
    if layout.dtype:
        args += ["--dtype", layout.dtype]
    if layout.kv_blocks is not None:
        args += ["--kv-blocks", str(layout.kv_blocks)]
    if layout.target != "compose":
        args += ["--target", layout.target]
    if layout.device != "cuda":
        args += ["--device", layout.device]
    return args


def header(layout: Layout, how: Render) -> str:
    args = layout_args(layout, how.model_mount)
    if how.model_args:
        args[:2] = how.model_args
    defaults = Render()
    for flag, value, default in (("--image", how.image, defaults.image), ("--for-host", how.for_host, None),
                                 ("--port", how.port, defaults.port), ("--http-port", how.http_port, defaults.http_port),
                                 ("--api-key-file", how.api_key_file, None),
                                 ("--secrets-dir", how.secrets_dir, defaults.secrets_dir)):
        if value != default and value is not None:
            args += [flag, str(value)]
    if how.secrets_dir is None:
        args.append("--insecure")
    return (
        "# A stagemesh deployment, rendered by `stagemesh compose`; render it again rather than edit it:\n"
        f"#   {shlex.join(['stagemesh', 'compose', *args])} > compose.yaml\n"
        f"# Build the image first (`docker build -t {how.image} .`), then `docker compose up -d`;\n"
        "# add `--profile monitoring` for Prometheus (:9090) and Grafana (:3000). See README.md.\n"
    )


# --- command line --------------------------------------------------------------------------


def add_layout_arguments(p: argparse.ArgumentParser, *, hosts: bool = True) -> None:
    """The layout options of `stagemesh compose`, `stagemesh topology` and `stagemesh render` (the same plan);
    ``hosts``: with ``--gpus`` / ``--hosts`` (Kubernetes places the pods itself)."""
    add_model_arguments(p, "the model planned against (its config.json)")
    p.add_argument("--pp", type=int, default=1, help="pipeline stages per chain")
    p.add_argument("--tp", type=int, default=1, help="tensor-parallel ranks (GPUs) per stage")
    p.add_argument("--ep", type=int, default=0, help="expert workers (one GPU each) per chain; 0 keeps experts in the stages")
    p.add_argument("--dp", type=int, default=1, help="data-parallel chains, each a complete replica")
    p.add_argument("--expert-replicas", type=int, default=1, help="expert workers holding each expert (at most --ep)")
    if hosts:
        where = p.add_mutually_exclusive_group()
        where.add_argument("--gpus", type=int, default=DEFAULT_GPUS, help=f"GPUs of the one host (default {DEFAULT_GPUS})")
        where.add_argument("--hosts", type=parse_hosts, default=(),
                           help="several hosts in GPU order, NAME:GPUS,NAME:GPUS; the first runs Redis and the gateway")
    p.add_argument("--deployment", default="default", help="name that keeps this mesh's Redis keys apart")
    p.add_argument("--dtype", choices=["float32", "bfloat16", "float16"], default=None,
                   help="dtype of the weights and KV cache (default: the checkpoint's)")
    p.add_argument("--kv-blocks", type=int, default=None, help="KV-cache blocks per stage (default: from a memory budget)")


def add_compose_arguments(p: argparse.ArgumentParser) -> None:
    add_layout_arguments(p)
    p.add_argument("--image", default=Render.image, help="the stagemesh image every service runs")
    p.add_argument("--model-mount", default=None, help="host directory mounted at /model (default: --model)")
    p.add_argument("--for-host", default=None, help="with --hosts: print this host's file (its workers only)")
    p.add_argument("--port", type=int, default=GATEWAY_PORT,
                   help="host port of the client gRPC (frontend replica i publishes --port + i)")
    p.add_argument("--frontends", type=int, default=Render.frontends, help="replicas of the frontend service")
    p.add_argument("--http-port", type=int, default=HTTP_PORT,
                   help="first host port of the frontends' HTTP: OpenAI API, dashboard and /metrics")
    p.add_argument("--api-key-file", default=None, metavar="FILE",
                   help="API keys (one a line, # comments) the frontends ask clients for, passed to them as a "
                        "compose secret (the file stays on the host; relative paths: to the compose file)")
    p.add_argument("--secrets-dir", default=DEFAULT_SECRETS_DIR, metavar="DIR",
                   help="the mesh's secrets made by `stagemesh certs DIR` (certificates, Redis password), mounted "
                        "as compose secrets (relative paths: to the compose file)")
    p.add_argument("--insecure", action="store_true",
                   help="no TLS between the services and no Redis password (no --secrets-dir)")


def add_topology_arguments(p: argparse.ArgumentParser) -> None:
    add_layout_arguments(p)
    p.add_argument("--redis-url", required=True, help="the deployment's Redis, e.g. redis://redis:6379/0")
    p.add_argument("--redis-password-file", type=Path, default=None, help="the Redis password, read from this file")
    from stagemesh.runtime.tls import add_tls_args  # grpc: only where the flag is parsed

    add_tls_args(p)  # its mesh.key signs the topology (stagemesh.mesh.signing)
    add_target_arguments(p)


def add_target_arguments(p: argparse.ArgumentParser, default: str = "compose") -> None:
    """Where the plan runs: how workers are addressed (compose services or Kubernetes Services), and on what."""
    p.add_argument("--target", choices=list(TARGETS), default=default,
                   help="compose: workers at SERVICE:PORT (or HOST:PORT with --hosts); k8s: at their Kubernetes Service")
    p.add_argument("--device", choices=["cuda", "cpu"], default="cuda",
                   help="where the workers compute (cpu: no GPUs booked; for Kubernetes tests and small models)")


def parse_hosts(text: str) -> tuple[Host, ...]:
    hosts = []
    for item in text.split(","):
        name, _, gpus = item.strip().rpartition(":")
        if not name or not gpus.isdigit() or int(gpus) < 1:
            raise argparse.ArgumentTypeError(f"{item!r} is not NAME:GPUS (e.g. host-a:8)")
        hosts.append(Host(name, int(gpus)))
    if len({h.name for h in hosts}) != len(hosts):
        raise argparse.ArgumentTypeError(f"a host is named twice in {text!r}")
    return tuple(hosts)


def layout_from_args(args: argparse.Namespace, source: ModelSource | None = None) -> Layout:
    """The layout the flags give; ``source``: ``--model`` already resolved."""
    source = source or resolve_model(args.model, args.revision)
    return Layout(
        model=source.path, pp=args.pp, tp=args.tp, ep=args.ep, dp=args.dp, expert_replicas=args.expert_replicas,
        gpus=getattr(args, "gpus", DEFAULT_GPUS), hosts=tuple(getattr(args, "hosts", ())), deployment=args.deployment,
        dtype=args.dtype, kv_blocks=args.kv_blocks, target=getattr(args, "target", "compose"),
        device=getattr(args, "device", "cuda"),
    )


def run_compose(args: argparse.Namespace) -> int:
    """`stagemesh compose`: print the compose file."""
    source = resolve_model(args.model, args.revision)
    how = Render(image=args.image, model_mount=_relative(args.model_mount or args.model), for_host=args.for_host,
                 port=args.port, frontends=args.frontends, http_port=args.http_port,
                 api_key_file=_key_file(args.api_key_file),
                 secrets_dir=None if args.insecure else _relative(args.secrets_dir))

    if source.repo_id and not args.model_mount:
        how = _repo_mount(how, source)
    print(render(layout_from_args(args, source), how), end="")
    if how.secrets_dir and not Path(args.secrets_dir).is_dir():
        print(f"note: {args.secrets_dir} does not exist here: make it with `stagemesh certs {args.secrets_dir}` "
              "next to the compose file (see README.md, Security)", file=sys.stderr)
    return 0


def _repo_mount(how: Render, source: ModelSource) -> Render:
    """``how`` mounting a Hugging Face repo's cache folder at ``/model``, the workers reading its snapshot.

    NOTE: a snapshot's files are symlinks to ``../../blobs/...``: mounting the snapshot alone would
    leave them dangling inside the container, so the repo's whole folder is mounted."""
    snapshot = source.path.absolute()
    model_args = ("--model", source.repo_id) + (("--revision", source.revision) if source.revision else ())
    return dataclasses.replace(how, model_mount=str(snapshot.parent.parent),
                               model_dir=f"{MODEL_DIR}/snapshots/{snapshot.name}", model_args=model_args)


def _key_file(path: str | None) -> str | None:
    """``--api-key-file`` checked now (ValueError when it cannot be read or holds no key), as a bind source."""
    if path is None:
        return None
    read_key_file(path)
    return _relative(path)


def _relative(path: str) -> str:
    """``path`` as a bind source: a relative one spelled ``./…`` (compose resolves it next to the file)."""
    if Path(path).is_absolute() or path.startswith(("./", "../")):
        return path
    return f"./{path}"


def run_topology(args: argparse.Namespace) -> int:
    """`stagemesh topology` (the compose planner service): write the plan to Redis and exit."""
    from stagemesh.deploy.up_plan import write_topology
    from stagemesh.mesh.signing import load_signer
    from stagemesh.runtime.startup import redis_url_from_args

    layout = layout_from_args(args)
    topology = in_container(plan(layout))
    url = redis_url_from_args(args)  # with the password of --redis-password-file
    asyncio.run(write_topology(url, layout.deployment, topology, signer=load_signer(args.tls_dir)))
    print(f"topology of {len(workers(topology))} worker(s) in {len(topology.chains)} chain(s) "
          f"written to {args.redis_url} (deployment {layout.deployment!r})")
    return 0
