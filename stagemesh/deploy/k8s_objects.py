"""The Kubernetes objects of a stagemesh deployment, one builder per component (``stagemesh.deploy.k8s``
writes them out): Redis, the gateway (with the planner), the frontends, one Deployment and Service
per stage and expert worker, and the disruption budgets.

NOTE: probes. Kubernetes' native gRPC probe speaks plaintext and cannot present a client
certificate, and every mesh port (a worker's, the gateway's) takes only the mesh CA's
certificates (docs/security.md): the kubelet's probe would fail the handshake. So the mesh pods
are probed by exec, ``stagemesh health --addr 127.0.0.1:PORT --tls-dir ... --tls-role ROLE``, as
compose's health checks are — the probe also proves the pod's certificate works. The frontends'
client port is not a mesh port (API keys guard it, and ``grpc.health.v1`` answers without one):
they get the native ``grpc`` probe. A plaintext health-only port on the workers would allow
native probes everywhere, at the cost of one more open port per pod; not done. Startup and
readiness ask for SERVING; liveness only for an answer (``mesh_probes``).

NOTE: workers are Deployments of one replica with the Recreate strategy, not StatefulSets: a
worker's identity is its Service name and its ``--chain/--stage`` arguments, and it keeps no
volume. Recreate keeps two pods from booking a stage's GPUs at once during an update; on a node
lost, a Deployment starts the replacement at once (a StatefulSet waits until the node is
confirmed gone), and the old pod, NotReady, leaves the Service's endpoints.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from stagemesh.deploy import k8s_secrets as sec
from stagemesh.deploy.compose import (
    GATEWAY_PORT,
    HTTP_PORT,
    MODEL_DIR,
    REDIS_IMAGE,
    REDIS_PORT,
    SCHEDULING_PORT,
    frontend_command,
    gateway_command,
    layout_args,
    worker_command,
)
from stagemesh.deploy.compose_plan import K8S_PREFIX, WORKER_PORT, Layout, Worker

REDIS = f"{K8S_PREFIX}redis"
GATEWAY = f"{K8S_PREFIX}gateway"
FRONTEND = f"{K8S_PREFIX}frontend"
REDIS_URL = f"redis://{REDIS}:{REDIS_PORT}/0"
USER = 10001
"""The image's user (Dockerfile)."""
REDIS_USER = 999
"""The redis image's ``redis`` user."""
GPU = "nvidia.com/gpu"
FRONTEND_SERVICE = "stagemesh.v1.Gateway"
"""The service a frontend's native gRPC probe asks for."""
SCHEDULING_SERVICE = "stagemesh.v1.Scheduling"
"""The gateway's readiness: its ``Scheduling`` service, SERVING from start-up on (its "" is not while no chain serves)."""


@dataclass(frozen=True)
class Manifests:
    """How the manifests name images, volumes and sizes (the flags of `stagemesh render --target k8s`)."""

    image: str = "stagemesh:latest"
    model_pvc: str | None = f"{K8S_PREFIX}model"
    """A PersistentVolumeClaim holding the checkpoint (ReadOnlyMany, or ReadWriteOnce on one node), at ``/model``."""
    model_host_path: str | None = None
    """Instead of ``model_pvc``: a directory on every GPU node holding the checkpoint."""
    frontends: int = 1
    """Replicas of the frontend Deployment (``kubectl scale`` changes it later)."""
    frontend_service_type: str = "ClusterIP"
    secrets_dir: str | None = "secrets"
    """`stagemesh certs DIR`'s folder, relative to the kustomization; None: ``--insecure``."""
    api_key_file: str | None = None
    """A file of API keys relative to the kustomization, made a Secret for the frontends; None: no keys."""
    namespace: str | None = None
    redis_storage: str = "10Gi"
    redis_memory: str = "2Gi"
    """Redis's memory request and limit (the journal of open requests lives there)."""
    storage_class: str | None = None
    worker_cpu: str = "4"
    worker_memory: str = "32Gi"
    startup_minutes: int = 30
    """How long a pod may take to answer SERVING (loading a large checkpoint) before it is restarted."""

    @property
    def secure(self) -> bool:
        return self.secrets_dir is not None


# --- shared pieces -------------------------------------------------------------------------


def labels(layout: Layout, component: str, worker: str | None = None) -> dict[str, str]:
    """The selector labels of a component (and of one worker)."""
    found = {"app.kubernetes.io/name": "stagemesh", "app.kubernetes.io/instance": layout.deployment,
             "app.kubernetes.io/component": component}
    if worker:
        found["stagemesh.io/worker"] = worker
    return found


def _meta(name: str, layout: Layout, component: str, worker: str | None = None) -> dict[str, Any]:
    return {"name": name, "labels": labels(layout, component, worker)}


def _pod(containers: list[dict[str, Any]], volumes: list[dict[str, Any]], *, user: int = USER,
         init: list[dict[str, Any]] | None = None, gpu: bool = False) -> dict[str, Any]:
    """A pod spec: non-root, no API token, no Service environment variables (``STAGEMESH_*`` names are ours)."""
    spec: dict[str, Any] = {
        "securityContext": {"runAsNonRoot": True, "runAsUser": user, "runAsGroup": user, "fsGroup": user,
                            "seccompProfile": {"type": "RuntimeDefault"}},
        "automountServiceAccountToken": False,
        "enableServiceLinks": False,
        "terminationGracePeriodSeconds": 30,
    }
    if init:
        spec["initContainers"] = init
    spec["containers"] = containers
    if gpu:  # GPU node pools are commonly tainted so that only GPU pods land there
        spec["tolerations"] = [{"key": GPU, "operator": "Exists", "effect": "NoSchedule"}]
    spec["volumes"] = volumes
    return spec


def _container(name: str, image: str, command: list[str], mounts: list[dict[str, Any]],
               resources: dict[str, Any]) -> dict[str, Any]:
    return {
        "name": name, "image": image, "imagePullPolicy": "IfNotPresent", "command": command,
        "env": [{"name": "HOME", "value": "/tmp"}],  # caches (torch, triton) on the writable /tmp
        "resources": resources,
        "securityContext": {"allowPrivilegeEscalation": False, "readOnlyRootFilesystem": True,
                            "capabilities": {"drop": ["ALL"]}},
        "volumeMounts": mounts,
    }


def _resources(cpu: str, memory: str, gpus: int = 0) -> dict[str, Any]:
    """Requests, and a memory limit equal to them (no CPU limit: throttling would stall the step loops)."""
    extra = {GPU: gpus} if gpus else {}
    return {"requests": {"cpu": cpu, "memory": memory, **extra}, "limits": {"memory": memory, **extra}}


def _volumes(how: Manifests, role: str | None) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """(volumes, mounts) of a stagemesh pod: the checkpoint, /tmp and (secured) its role's secrets."""
    source = ({"hostPath": {"path": how.model_host_path, "type": "Directory"}} if how.model_host_path
              else {"persistentVolumeClaim": {"claimName": how.model_pvc, "readOnly": True}})
    volumes = [{"name": "model", **source}, {"name": "tmp", "emptyDir": {}}]
    mounts = [{"name": "model", "mountPath": MODEL_DIR, "readOnly": True}, {"name": "tmp", "mountPath": "/tmp"}]
    if how.secure and role:
        more_volumes, more_mounts = sec.mesh_volumes(role)
        volumes += more_volumes
        mounts += more_mounts
    return volumes, mounts


def _secured(command: list[str], how: Manifests) -> list[str]:
    return sec.mesh_flags(command) if how.secure else command


def _probes(ready: dict[str, Any], alive: dict[str, Any], how: Manifests) -> dict[str, Any]:
    """Startup (up to ``startup_minutes`` of loading) and readiness on ``ready``, liveness on ``alive``."""
    def probe(handler: dict[str, Any], period: int, failures: int) -> dict[str, Any]:
        return {**handler, "periodSeconds": period, "timeoutSeconds": 5, "failureThreshold": failures}

    return {"startupProbe": probe(ready, 10, how.startup_minutes * 6), "readinessProbe": probe(ready, 10, 3),
            "livenessProbe": probe(alive, 20, 3)}


def health_probe(port: int, role: str, how: Manifests, *extra: str) -> dict[str, Any]:
    """The exec probe of a mesh port (the module's NOTE: the kubelet's gRPC probe has no certificate)."""
    command = ["stagemesh", "health", "--addr", f"127.0.0.1:{port}", *extra]
    return {"exec": {"command": command + (sec.probe_flags(role) if how.secure else [])}}


def mesh_probes(port: int, role: str, how: Manifests, service: str = "") -> dict[str, Any]:
    """Ready: SERVING (of ``service``); alive: answering at all.

    NOTE: liveness asks only that the process answer (``--alive``): a stage is NOT_SERVING while
    its next stage is down, and the gateway's "" while no chain serves; restarting them for that
    would reload their weights and spread one failure down the chain."""
    ready = health_probe(port, role, how, *(("--service", service) if service else ()))
    return _probes(ready, health_probe(port, role, how, "--alive"), how)


def _deployment(name: str, layout: Layout, component: str, pod: dict[str, Any], *, replicas: int = 1,
                recreate: bool = True, worker: str | None = None) -> dict[str, Any]:
    selector = labels(layout, component, worker)
    spec: dict[str, Any] = {"replicas": replicas, "selector": {"matchLabels": selector}}
    if recreate:
        spec["strategy"] = {"type": "Recreate"}
    spec["template"] = {"metadata": {"labels": selector}, "spec": pod}
    return {"apiVersion": "apps/v1", "kind": "Deployment", "metadata": _meta(name, layout, component, worker),
            "spec": spec}


def _service(name: str, layout: Layout, component: str, ports: dict[str, int], *, worker: str | None = None,
             kind: str = "ClusterIP", headless: bool = False) -> dict[str, Any]:
    spec: dict[str, Any] = {"type": kind}
    if headless:
        spec["clusterIP"] = "None"
    spec["selector"] = labels(layout, component, worker)
    spec["ports"] = [{"name": port_name, "port": port, "targetPort": port_name, "protocol": "TCP"}
                     for port_name, port in ports.items()]
    return {"apiVersion": "v1", "kind": "Service", "metadata": _meta(name, layout, component, worker), "spec": spec}


def _ports(ports: dict[str, int]) -> list[dict[str, Any]]:
    return [{"name": name, "containerPort": port, "protocol": "TCP"} for name, port in ports.items()]


# --- the components ------------------------------------------------------------------------


def redis(layout: Layout, how: Manifests) -> list[dict[str, Any]]:
    """A StatefulSet of one with its append-only file on a volume claim, and its headless Service.

    The password is ``requirepass`` in ``redis.conf`` from the Secret, given to ``redis-server`` as
    a file; its probe passes it in ``REDISCLI_AUTH`` — never on a command line."""
    command = ["redis-server", "--appendonly", "yes", "--dir", "/data"]
    check = "redis-cli ping | grep -q PONG"
    mounts: list[dict[str, Any]] = [{"name": "data", "mountPath": "/data"}]
    volumes: list[dict[str, Any]] = []
    if how.secure:
        command.insert(1, f"{sec.REDIS_DIR}/redis.conf")
        check = f'REDISCLI_AUTH="$(cat {sec.PASSWORD_TARGET})" {check}'
        mounts.append({"name": "redis-secret", "mountPath": sec.REDIS_DIR, "readOnly": True})
        volumes.append(sec.redis_volume())
    else:
        command += ["--protected-mode", "no"]  # no password: take connections from the other pods
    container = _container("redis", REDIS_IMAGE, command, mounts, _resources("500m", how.redis_memory))
    container.pop("env")
    container["ports"] = _ports({"redis": REDIS_PORT})
    handler = {"exec": {"command": ["sh", "-c", check]}}  # startup: up to 10 min replaying a long AOF
    container |= {"startupProbe": {**handler, "periodSeconds": 5, "timeoutSeconds": 3, "failureThreshold": 120},
                  "readinessProbe": {**handler, "periodSeconds": 5, "timeoutSeconds": 3, "failureThreshold": 3},
                  "livenessProbe": {**handler, "periodSeconds": 10, "timeoutSeconds": 3, "failureThreshold": 6}}
    claim: dict[str, Any] = {"accessModes": ["ReadWriteOnce"], "resources": {"requests": {"storage": how.redis_storage}}}
    if how.storage_class:
        claim["storageClassName"] = how.storage_class
    selector = labels(layout, "redis")
    stateful_set = {
        "apiVersion": "apps/v1", "kind": "StatefulSet", "metadata": _meta(REDIS, layout, "redis"),
        "spec": {
            "serviceName": REDIS, "replicas": 1, "selector": {"matchLabels": selector},
            "template": {"metadata": {"labels": selector}, "spec": _pod([container], volumes, user=REDIS_USER)},
            "volumeClaimTemplates": [{"metadata": {"name": "data"}, "spec": claim}],
        },
    }
    return [stateful_set, _service(REDIS, layout, "redis", {"redis": REDIS_PORT}, headless=True)]


def gateway(layout: Layout, how: Manifests) -> list[dict[str, Any]]:
    """One gateway (Recreate: never two at once; Kubernetes restarts it), with the planner as its
    init container: it writes the signed topology to Redis before the gateway starts.

    NOTE: an init container, not a Job: a Job's pod template cannot change once created, and it
    names kustomize's hashed Secrets, so new certificates would make `kubectl apply -k` fail on it.
    Rewriting the same plan at each gateway start is harmless (it is the same signed document)."""
    volumes, mounts = _volumes(how, "gateway")
    planner_command = ["stagemesh", "topology", *layout_args(layout, MODEL_DIR), "--redis-url", REDIS_URL]
    planner = _container("planner", how.image, _secured(planner_command, how), mounts, _resources("250m", "512Mi"))
    container = _container("gateway", how.image, _secured(gateway_command(layout.deployment, REDIS_URL), how),
                           mounts, _resources("2", "4Gi"))
    container["ports"] = _ports({"scheduling": SCHEDULING_PORT, "http": HTTP_PORT})
    container |= mesh_probes(SCHEDULING_PORT, "gateway", how, SCHEDULING_SERVICE)  # frontends connect while no chain serves
    pod = _pod([container], volumes, init=[planner])
    return [_deployment(GATEWAY, layout, "gateway", pod),
            _service(GATEWAY, layout, "gateway", {"scheduling": SCHEDULING_PORT, "http": HTTP_PORT})]


def frontend(layout: Layout, how: Manifests) -> list[dict[str, Any]]:
    """The client-facing Deployment (scale it freely) behind one Service: gRPC and HTTP."""
    volumes, mounts = _volumes(how, "frontend")
    command = _secured(frontend_command(layout.deployment, REDIS_URL, gateway=GATEWAY), how)
    if how.api_key_file:
        volume, mount, path = sec.api_keys_volume()
        volumes, mounts, command = [*volumes, volume], [*mounts, mount], [*command, "--api-key-file", path]
    container = _container("frontend", how.image, command, mounts, _resources("2", "4Gi"))
    container["ports"] = _ports({"grpc": GATEWAY_PORT, "http": HTTP_PORT})
    native = {"grpc": {"port": GATEWAY_PORT, "service": FRONTEND_SERVICE}}
    container |= _probes(native, native, how)
    pod = _pod([container], volumes)
    pod["topologySpreadConstraints"] = [{  # replicas on different nodes when there are some
        "maxSkew": 1, "topologyKey": "kubernetes.io/hostname", "whenUnsatisfiable": "ScheduleAnyway",
        "labelSelector": {"matchLabels": labels(layout, "frontend")}}]
    ports = {"grpc": GATEWAY_PORT, "http": HTTP_PORT}
    return [_deployment(FRONTEND, layout, "frontend", pod, replicas=how.frontends, recreate=False),
            _service(FRONTEND, layout, "frontend", ports, kind=how.frontend_service_type)]


def worker(found: Worker, tp: int, layout: Layout, how: Manifests) -> list[dict[str, Any]]:
    """One stage (all its ``tp`` ranks in one pod, so a TP group never spans nodes) or expert
    worker: a Deployment of one booking its GPUs, and the Service its topology address names."""
    role = found.module_args[0].partition("_")[0]  # stage_worker -> stage
    name = f"{K8S_PREFIX}{found.name}"
    volumes, mounts = _volumes(how, role)
    if tp > 1:  # the TP ranks' collectives go through /dev/shm (a container's default: 64 MB)
        volumes.append({"name": "shm", "emptyDir": {"medium": "Memory", "sizeLimit": "2Gi"}})
        mounts.append({"name": "shm", "mountPath": "/dev/shm"})
    gpus = tp if layout.device == "cuda" else 0
    command = _secured(worker_command(found, layout.deployment, REDIS_URL), how)
    container = _container(role, how.image, command, mounts, _resources(how.worker_cpu, how.worker_memory, gpus))
    container["ports"] = _ports({"grpc": WORKER_PORT})
    container |= mesh_probes(WORKER_PORT, role, how)
    pod = _pod([container], volumes, gpu=gpus > 0)
    return [_deployment(name, layout, role, pod, worker=found.name),
            _service(name, layout, role, {"grpc": WORKER_PORT}, worker=found.name)]


def disruption_budgets(layout: Layout) -> list[dict[str, Any]]:
    """At least one frontend stays; voluntary evictions take one worker at a time, and none when
    there is one chain (any worker down is the whole mesh down: drain after scaling out, or by hand)."""
    workers = {"matchLabels": {k: v for k, v in labels(layout, "").items() if k != "app.kubernetes.io/component"},
               "matchExpressions": [{"key": "app.kubernetes.io/component", "operator": "In",
                                     "values": ["stage", "expert"]}]}
    return [
        {"apiVersion": "policy/v1", "kind": "PodDisruptionBudget", "metadata": _meta(FRONTEND, layout, "frontend"),
         "spec": {"minAvailable": 1, "selector": {"matchLabels": labels(layout, "frontend")}}},
        {"apiVersion": "policy/v1", "kind": "PodDisruptionBudget",
         "metadata": {"name": f"{K8S_PREFIX}workers", "labels": labels(layout, "workers")},
         "spec": {"maxUnavailable": 1 if layout.dp > 1 else 0, "selector": workers}},
    ]
