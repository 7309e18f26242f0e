"""`stagemesh render --target k8s`: the plan `stagemesh up` and `stagemesh compose` would start, as
Kubernetes manifests in a kustomize folder — one file per component and a ``kustomization.yaml``
that lists them and makes the Secrets from `stagemesh certs` files (``k8s_secrets``).

What is in each file: ``k8s_objects``. Where each worker is reached (its Service): the planner,
``compose_plan.plan`` with ``target="k8s"``; the gateway pod's init container runs the same plan
(`stagemesh topology --target k8s`) and writes it to Redis.

NOTE: object names are fixed (``stagemesh-...``) because the topology names the workers'
Services: kustomize's ``namePrefix``/``nameSuffix`` would rename the Services but not the
addresses. Two meshes go in two namespaces (``--namespace``).
"""

from __future__ import annotations

import argparse
import shlex
import sys
from pathlib import Path
from typing import Any

from stagemesh.deploy import k8s_objects as objects
from stagemesh.deploy import k8s_secrets as sec
from stagemesh.deploy.compose import (
    add_layout_arguments,
    add_target_arguments,
    layout_args,
    layout_from_args,
    yaml_dumper,
)
from stagemesh.deploy.compose_plan import Layout, plan, workers
from stagemesh.deploy.k8s_objects import Manifests
from stagemesh.mesh.store import stage_worker_id
from stagemesh.runtime.api_keys import read_key_file

KUSTOMIZATION = "kustomization.yaml"


def render(layout: Layout, how: Manifests) -> dict[str, str]:
    """File name -> YAML text of every manifest and of ``kustomization.yaml``."""
    if layout.target != "k8s":
        raise ValueError(f"render needs a layout with target k8s, not {layout.target!r}")
    topology = plan(layout)
    tp = {stage_worker_id(c.index, s.index): s.tp for c in topology.chains for s in c.stages}
    documents = {"redis.yaml": objects.redis(layout, how), "gateway.yaml": objects.gateway(layout, how),
                 "frontend.yaml": objects.frontend(layout, how)}
    for found in workers(topology):
        documents[f"{found.name}.yaml"] = objects.worker(found, tp.get(found.name, 1), layout, how)
    documents["disruption-budgets.yaml"] = objects.disruption_budgets(layout)
    top = header(layout, how)
    files = {name: top + dump_all(docs) for name, docs in documents.items()}
    files[KUSTOMIZATION] = top + dump_all([kustomization(list(documents), how)])
    return files


def kustomization(resources: list[str], how: Manifests) -> dict[str, Any]:
    doc: dict[str, Any] = {"apiVersion": "kustomize.config.k8s.io/v1beta1", "kind": "Kustomization"}
    if how.namespace:
        doc["namespace"] = how.namespace
    doc["resources"] = resources
    if how.secure:
        doc["secretGenerator"] = sec.secret_generator(how.secrets_dir, how.api_key_file)
    return doc


def dump_all(documents: list[dict[str, Any]]) -> str:
    import yaml

    return yaml.dump_all(documents, Dumper=yaml_dumper(), sort_keys=False, width=160)


def write(out: Path, files: dict[str, str]) -> list[Path]:
    """Write ``files`` into ``out`` (made if missing; files of an earlier render are replaced)."""
    out.mkdir(parents=True, exist_ok=True)
    written = []
    for name, text in files.items():
        (out / name).write_text(text)
        written.append(out / name)
    return written


def header(layout: Layout, how: Manifests) -> str:
    args = ["stagemesh", "render", *layout_args(layout, str(layout.model)), *render_args(how), "--out", "DIR"]
    return (
        "# A stagemesh deployment on Kubernetes, rendered by `stagemesh render`; render it again rather than edit it:\n"
        f"#   {shlex.join(args)}\n"
        "# Apply the folder with `kubectl apply -k DIR` (README.md, Kubernetes).\n"
    )


def render_args(how: Manifests) -> list[str]:
    """The flags that give ``how`` (those not at their defaults)."""
    defaults = Manifests()
    flags = {"--image": "image", "--model-pvc": "model_pvc", "--model-host-path": "model_host_path",
             "--frontends": "frontends", "--frontend-service-type": "frontend_service_type",
             "--secrets-dir": "secrets_dir", "--api-key-file": "api_key_file", "--namespace": "namespace",
             "--redis-storage": "redis_storage", "--redis-memory": "redis_memory", "--storage-class": "storage_class", "--worker-cpu": "worker_cpu",
             "--worker-memory": "worker_memory", "--startup-minutes": "startup_minutes"}
    args = []
    for flag, field in flags.items():
        value = getattr(how, field)
        if value != getattr(defaults, field) and value is not None and not (field == "model_pvc" and how.model_host_path):
            args += [flag, str(value)]
    if not how.secure:
        args.append("--insecure")
    return args


# --- command line --------------------------------------------------------------------------


def add_render_arguments(p: argparse.ArgumentParser) -> None:
    add_layout_arguments(p, hosts=False)
    add_target_arguments(p, default="k8s")
    d = Manifests()
    p.add_argument("--out", type=Path, required=True, help="the folder to write the manifests and kustomization.yaml in")
    p.add_argument("--image", default=d.image, help="the stagemesh image every pod runs")
    model = p.add_mutually_exclusive_group()
    model.add_argument("--model-pvc", default=d.model_pvc, metavar="CLAIM",
                       help="PersistentVolumeClaim holding the checkpoint, mounted read-only at /model")
    model.add_argument("--model-host-path", default=None, metavar="PATH",
                       help="instead: a directory on every node holding the checkpoint")
    p.add_argument("--frontends", type=int, default=d.frontends, help="replicas of the frontend Deployment")
    p.add_argument("--frontend-service-type", choices=["ClusterIP", "NodePort", "LoadBalancer"],
                   default=d.frontend_service_type, help="how clients reach the frontends' Service")
    p.add_argument("--secrets-dir", default=d.secrets_dir, metavar="DIR",
                   help="`stagemesh certs DIR`'s folder, relative to --out (kustomize makes the Secrets from it)")
    p.add_argument("--insecure", action="store_true", help="no mTLS between the pods and no Redis password")
    p.add_argument("--api-key-file", default=None, metavar="FILE",
                   help="API keys (one a line) the frontends ask for: a file relative to --out, made a Secret")
    p.add_argument("--namespace", default=None, help="the namespace of every object (kustomization's namespace)")
    p.add_argument("--redis-storage", default=d.redis_storage, help="size of Redis's volume (its append-only file)")
    p.add_argument("--redis-memory", default=d.redis_memory, help="Redis's memory request and limit")
    p.add_argument("--storage-class", default=None, help="storage class of Redis's volume (default: the cluster's)")
    p.add_argument("--worker-cpu", default=d.worker_cpu, help="CPU request of each stage and expert worker")
    p.add_argument("--worker-memory", default=d.worker_memory, help="memory request (and limit) of each worker")
    p.add_argument("--startup-minutes", type=int, default=d.startup_minutes,
                   help="how long a pod may load (a large checkpoint) before its startup probe gives up")


def manifests_from_args(args: argparse.Namespace) -> Manifests:
    secrets_dir = None if args.insecure else sec.inside(args.secrets_dir, "--secrets-dir")
    api_key_file = sec.inside(args.api_key_file, "--api-key-file") if args.api_key_file else None
    if api_key_file and secrets_dir is None:
        raise ValueError("--api-key-file needs the Secrets of a secured mesh: drop --insecure")
    return Manifests(
        image=args.image, model_pvc=None if args.model_host_path else args.model_pvc,
        model_host_path=args.model_host_path, frontends=args.frontends,
        frontend_service_type=args.frontend_service_type, secrets_dir=secrets_dir, api_key_file=api_key_file,
        namespace=args.namespace, redis_storage=args.redis_storage, redis_memory=args.redis_memory, storage_class=args.storage_class,
        worker_cpu=args.worker_cpu, worker_memory=args.worker_memory, startup_minutes=args.startup_minutes,
    )


def run_render(args: argparse.Namespace) -> int:
    """`stagemesh render`: write the manifests into ``--out``."""
    if args.target != "k8s":
        raise ValueError(f"render --target {args.target}: compose files come from `stagemesh compose`")
    how = manifests_from_args(args)
    layout = layout_from_args(args)
    written = write(args.out, render(layout, how))
    print(f"{len(written)} files in {args.out}; apply them with `kubectl apply -k {args.out}`")
    for missing in _missing_inputs(args.out, how):
        print(f"note: {missing}", file=sys.stderr)
    return 0


def _missing_inputs(out: Path, how: Manifests) -> list[str]:
    """What kustomize will need in ``out`` that is not there yet."""
    notes = []
    if how.secrets_dir and not (out / how.secrets_dir).is_dir():
        notes.append(f"{out / how.secrets_dir} does not exist: make it with `stagemesh certs {out / how.secrets_dir}`")
    if how.api_key_file:
        key_file = out / how.api_key_file
        if not key_file.is_file():
            notes.append(f"{key_file} does not exist: put the API keys there (one a line)")
        else:
            read_key_file(str(key_file))  # ValueError now, not at apply time, when it holds no key
    return notes
