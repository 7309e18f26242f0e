"""The Kubernetes manifests: `stagemesh render --target k8s` writes a kustomize folder from the same
planner as `stagemesh up` and `stagemesh compose`.

No cluster here: every rendered object is validated against the OpenAPI schemas of a Kubernetes
release by `kubernetes-validate` (a test extra; strict: an unknown field is an error), and, where
`kubectl` is installed, `kubectl kustomize` builds the folder (Secrets from files included) and
its output is validated too.
"""

from __future__ import annotations

import asyncio
import json
import shlex
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml
from grpc_health.v1 import health_pb2

from gateway.gateway import SCHEDULING_SERVICE
from stage_worker.topology import find_stage
from stagemesh.cli.commands import build_parser
from stagemesh.cli.commands import main as cli_main
from stagemesh.deploy.compose import layout_from_args
from stagemesh.deploy.compose_plan import Layout, plan, workers
from stagemesh.deploy.k8s import KUSTOMIZATION
from stagemesh.mesh.store import Store
from tests.cli_helpers import run_cli
from tests.deploy.test_compose import MOE, health_server  # noqa: F401 (a fixture)

K8S_VERSION = "1.34.0"
"""The Kubernetes release whose schemas every manifest must meet (kubernetes-validate ships 1.11 to 1.37)."""
LAYOUTS = {
    "pp2-tp2-dp2": ["--pp", "2", "--tp", "2", "--dp", "2"],
    "pp2-ep2-dp2": ["--pp", "2", "--ep", "2", "--dp", "2"],
    "cpu-pp2-ep2": ["--pp", "2", "--ep", "2", "--device", "cpu"],
}
MESH = ("gateway", "stage", "expert")
"""Components whose ports take only mesh certificates (probed by exec)."""


@pytest.fixture
def model(tmp_path: Path) -> Path:
    (tmp_path / "model").mkdir()
    (tmp_path / "model" / "config.json").write_text(json.dumps(MOE))
    return tmp_path / "model"


def render(model: Path, out: Path, *args: str) -> dict[str, list[dict]]:
    """`stagemesh render` into ``out``: file name -> its objects."""
    assert cli_main(["render", "--model", str(model), "--out", str(out), *args]) == 0
    return {p.name: [d for d in yaml.safe_load_all(p.read_text()) if d] for p in sorted(out.glob("*.yaml"))}


def objects(files: dict[str, list[dict]]) -> list[dict]:
    return [d for name, docs in files.items() if name != KUSTOMIZATION for d in docs]


def by_kind(files: dict[str, list[dict]], kind: str) -> dict[str, dict]:
    return {d["metadata"]["name"]: d for d in objects(files) if d["kind"] == kind}


def component(obj: dict) -> str:
    return obj["metadata"]["labels"]["app.kubernetes.io/component"]


def containers(workload: dict) -> list[dict]:
    spec = workload["spec"]["template"]["spec"]
    return [*spec.get("initContainers", ()), *spec["containers"]]


def validate(obj: dict) -> None:
    utils = pytest.importorskip("kubernetes_validate.utils", reason="pip install -e '.[test]' brings kubernetes-validate")
    utils.validate(obj, K8S_VERSION, strict=True)


def layout_of(model: Path, args: list[str]) -> Layout:
    parsed = build_parser().parse_args(["render", "--model", str(model), "--out", "unused", *args])
    return layout_from_args(parsed)


@pytest.fixture(params=list(LAYOUTS))
def rendered(request, model, tmp_path):
    """(layout args, layout, files) of each layout, secured, with API keys."""
    args = [*LAYOUTS[request.param], "--api-key-file", "api-keys"]
    out = tmp_path / "out"
    files = render(model, out, *args)
    return args, layout_of(model, args), files


# --- schema -------------------------------------------------------------------------------------


def test_every_rendered_object_meets_the_kubernetes_schemas(rendered):
    _, _, files = rendered
    found = objects(files)
    assert {d["kind"] for d in found} == {"StatefulSet", "Service", "Deployment", "PodDisruptionBudget"}
    for obj in found:
        validate(obj)


def test_the_validator_refuses_a_misspelt_field(model, tmp_path):
    """What the schema test is worth: a field Kubernetes does not know fails it."""
    refused = pytest.importorskip("kubernetes_validate.utils").ValidationError

    (deployment,) = [d for d in render(model, tmp_path / "out")["gateway.yaml"] if d["kind"] == "Deployment"]
    deployment["spec"]["template"]["spec"]["containers"][0]["livenesProbe"] = {"exec": {"command": ["true"]}}
    with pytest.raises(refused):
        validate(deployment)


def test_the_kustomization_lists_every_file_and_nothing_else(rendered, tmp_path):
    _, _, files = rendered
    (kustomization,) = files[KUSTOMIZATION]
    assert sorted(kustomization["resources"]) == sorted(name for name in files if name != KUSTOMIZATION)


# --- the workloads ------------------------------------------------------------------------------


def test_each_stage_books_one_gpu_per_tp_rank_in_one_pod_and_each_expert_worker_one(rendered):
    _, layout, files = rendered
    topology = plan(layout)
    deployments = by_kind(files, "Deployment")
    stages = {f"stagemesh-stage-c{c.index}-s{s.index}": s.tp for c in topology.chains for s in c.stages}
    experts = {f"stagemesh-expert-c{c.index}-e{e.index}" for c in topology.chains for e in c.expert_workers}
    assert {n for n, d in deployments.items() if component(d) in ("stage", "expert")} == set(stages) | experts
    for name, deployment in deployments.items():
        (container,) = deployment["spec"]["template"]["spec"]["containers"]
        resources = container["resources"]
        wanted = stages.get(name, 1 if name in experts else 0) if layout.device == "cuda" else 0
        assert resources["requests"].get("nvidia.com/gpu", 0) == wanted, name
        assert resources["limits"].get("nvidia.com/gpu", 0) == wanted, name
        assert {"cpu", "memory"} <= set(resources["requests"]), name
        if name in stages or name in experts:
            assert deployment["spec"]["replicas"] == 1 and deployment["spec"]["strategy"]["type"] == "Recreate"


def test_the_services_are_the_addresses_the_planner_writes(rendered):
    """Every worker's topology address is a Service of that name and port that selects its pod."""
    _, layout, files = rendered
    services, deployments = by_kind(files, "Service"), by_kind(files, "Deployment")
    for worker in workers(plan(layout)):
        host, _, port = worker.address.rpartition(":")
        service = services[host]
        assert [p["port"] for p in service["spec"]["ports"]] == [int(port)]
        pod_labels = deployments[host]["spec"]["template"]["metadata"]["labels"]
        assert service["spec"]["selector"].items() <= pod_labels.items()
        (container,) = deployments[host]["spec"]["template"]["spec"]["containers"]
        assert [p["containerPort"] for p in container["ports"]] == [int(port)]


def test_the_gateways_planner_writes_the_same_plan_as_the_render(rendered, model):
    """The gateway pod's init container runs `stagemesh topology`: its arguments plan the same addresses."""
    _, layout, files = rendered
    gateway = by_kind(files, "Deployment")["stagemesh-gateway"]
    (planner,) = gateway["spec"]["template"]["spec"]["initContainers"]
    command = planner["command"]
    assert command[:2] == ["stagemesh", "topology"]
    argv = [str(model) if a == "/model" else a for a in command[1:]]
    in_cluster = layout_from_args(build_parser().parse_args(argv))
    assert [w.address for w in workers(plan(in_cluster))] == [w.address for w in workers(plan(layout))]
    assert (gateway["spec"]["replicas"], gateway["spec"]["strategy"]["type"]) == (1, "Recreate")


def test_every_pod_is_probed_with_a_startup_probe_long_enough_for_a_large_checkpoint(rendered):
    _, _, files = rendered
    for workload in [*by_kind(files, "Deployment").values()]:
        (container,) = workload["spec"]["template"]["spec"]["containers"]
        startup = container["startupProbe"]
        assert startup["periodSeconds"] * startup["failureThreshold"] >= 30 * 60
        for kind in ("startupProbe", "readinessProbe", "livenessProbe"):
            probe = container[kind]
            if component(workload) == "frontend":  # the client port: the kubelet's own gRPC probe
                assert probe["grpc"] == {"port": 50051, "service": "stagemesh.v1.Gateway"}
            else:  # a mesh port wants a client certificate, which the kubelet's probe cannot give
                command = probe["exec"]["command"]
                assert command[:4] == ["stagemesh", "health", "--addr", f"127.0.0.1:{container['ports'][0]['containerPort']}"]
                assert command[-2:] == ["--tls-role", component(workload)]
                # alive = answering: a stage waiting on its next stage is NOT_SERVING, not dead
                assert ("--alive" in command) == (kind == "livenessProbe")
                if component(workload) == "gateway" and kind != "livenessProbe":
                    assert command[4:6] == ["--service", SCHEDULING_SERVICE]


def test_redis_keeps_its_append_only_file_on_a_claim_and_its_password_off_every_command_line(rendered):
    _, _, files = rendered
    redis = by_kind(files, "StatefulSet")["stagemesh-redis"]
    (container,) = redis["spec"]["template"]["spec"]["containers"]
    assert container["command"][:2] == ["redis-server", "/run/secrets/redis/redis.conf"]
    assert "--appendonly" in container["command"] and "/data" in container["command"]
    assert {m["mountPath"] for m in container["volumeMounts"]} >= {"/data"}
    (claim,) = redis["spec"]["volumeClaimTemplates"]
    assert claim["metadata"]["name"] == "data"
    assert "REDISCLI_AUTH" in container["readinessProbe"]["exec"]["command"][-1]
    assert by_kind(files, "Service")["stagemesh-redis"]["spec"]["clusterIP"] == "None"
    for workload in objects(files):
        for c in containers(workload) if workload["kind"] in ("Deployment", "StatefulSet") else ():
            assert "--redis-password" not in c["command"], "the password file, never the password, on a command line"


def test_every_pod_runs_as_a_plain_user_without_an_api_token(rendered):
    _, _, files = rendered
    for workload in objects(files):
        if workload["kind"] not in ("Deployment", "StatefulSet"):
            continue
        pod = workload["spec"]["template"]["spec"]
        assert pod["securityContext"]["runAsNonRoot"] and pod["securityContext"]["runAsUser"] > 0
        assert pod["automountServiceAccountToken"] is False
        for c in containers(workload):
            assert c["securityContext"]["allowPrivilegeEscalation"] is False
            assert c["securityContext"]["capabilities"] == {"drop": ["ALL"]}


def test_disruption_budgets_keep_a_frontend_and_take_at_most_one_chain_at_a_time(model, tmp_path):
    for dp, allowed in (("2", 1), ("1", 0)):
        files = render(model, tmp_path / dp, "--pp", "2", "--dp", dp)
        budgets = by_kind(files, "PodDisruptionBudget")
        assert budgets["stagemesh-frontend"]["spec"]["minAvailable"] == 1
        assert budgets["stagemesh-workers"]["spec"]["maxUnavailable"] == allowed


def test_frontends_scale_behind_one_service_with_grpc_and_http(model, tmp_path):
    files = render(model, tmp_path / "out", "--frontends", "3", "--frontend-service-type", "LoadBalancer")
    frontend = by_kind(files, "Deployment")["stagemesh-frontend"]
    assert frontend["spec"]["replicas"] == 3 and "strategy" not in frontend["spec"]  # rolling updates
    service = by_kind(files, "Service")["stagemesh-frontend"]
    assert service["spec"]["type"] == "LoadBalancer"
    assert {p["name"]: p["port"] for p in service["spec"]["ports"]} == {"grpc": 50051, "http": 8080}


# --- secrets ------------------------------------------------------------------------------------


def _secret_values(directory: Path) -> list[str]:
    """Every secret value in `stagemesh certs`' folder: key bodies, mesh.key, the password."""
    values = []
    for path in directory.iterdir():
        text = path.read_text()
        if path.suffix == ".pem":
            continue  # certificates are public
        lines = [line for line in text.splitlines() if line and not line.startswith("-----")]
        values += [line.split()[-1] for line in lines]  # redis.conf: `requirepass VALUE`
    return values


def test_no_secret_value_is_in_any_rendered_file_and_kustomize_makes_them_from_files(model, tmp_path):
    out = tmp_path / "out"
    assert cli_main(["certs", str(out / "secrets")]) == 0
    (out / "api-keys").write_text("sk-test-key-1234567890\n")
    (out / "api-keys").chmod(0o600)
    files = render(model, out, "--pp", "2", "--ep", "2", "--dp", "2", "--api-key-file", "api-keys")
    values = [*_secret_values(out / "secrets"), "sk-test-key-1234567890"]
    assert len(values) >= 8
    for name in files:
        text = (out / name).read_text()
        assert not [v for v in values if v in text], name
    (kustomization,) = files[KUSTOMIZATION]
    generated = {g["name"]: g["files"] for g in kustomization["secretGenerator"]}
    assert generated["stagemesh-tls-stage"] == ["ca.pem=secrets/ca.pem", "stage.pem=secrets/stage.pem",
                                                "stage.key=secrets/stage.key", "mesh.key=secrets/mesh.key"]
    assert generated["stagemesh-api-keys"] == ["api-keys=api-keys"]
    for files_of_secret in generated.values():
        for entry in files_of_secret:
            assert (out / entry.partition("=")[2]).is_file(), entry


def test_each_pod_mounts_only_its_own_roles_certificate(rendered):
    _, _, files = rendered
    for workload in objects(files):
        if workload["kind"] != "Deployment":
            continue
        secrets = {v["secret"]["secretName"] for v in workload["spec"]["template"]["spec"]["volumes"] if "secret" in v}
        tls = {s for s in secrets if s.startswith("stagemesh-tls-")}
        assert tls == {f"stagemesh-tls-{component(workload)}"}


@pytest.mark.skipif(shutil.which("kubectl") is None, reason="kubectl is not installed: `kubectl kustomize` is not run")
def test_kubectl_kustomize_builds_the_folder_and_its_output_meets_the_schemas(model, tmp_path):
    out = tmp_path / "out"
    assert cli_main(["certs", str(out / "secrets")]) == 0
    render(model, out, "--pp", "2", "--tp", "2", "--dp", "2", "--namespace", "llm")
    proc = subprocess.run(["kubectl", "kustomize", str(out)], capture_output=True, text=True, timeout=60, check=False)
    assert proc.returncode == 0, proc.stderr
    built = [d for d in yaml.safe_load_all(proc.stdout) if d]
    for obj in built:
        validate(obj)
        assert obj["metadata"]["namespace"] == "llm"
    secrets = {d["metadata"]["name"] for d in built if d["kind"] == "Secret"}
    for workload in (d for d in built if d["kind"] in ("Deployment", "StatefulSet")):
        for volume in workload["spec"]["template"]["spec"].get("volumes", ()):
            if "secret" in volume:  # kustomize's hashed name: the pods follow new certificates
                assert volume["secret"]["secretName"] in secrets


# --- the command line ---------------------------------------------------------------------------


def test_stagemesh_health_alive_exits_0_while_the_server_answers_serving_or_not(health_server):  # noqa: F811
    address, set_status = health_server
    set_status(health_pb2.HealthCheckResponse.NOT_SERVING)
    assert run_cli("health", "--addr", address, "--alive").returncode == 0
    assert run_cli("health", "--addr", address).returncode == 1
    assert run_cli("health", "--addr", address, "--service", "stagemesh.v1.Scheduling").returncode == 1  # unknown
    from stagemesh.runtime.net import free_port

    assert run_cli("health", "--addr", f"127.0.0.1:{free_port()}", "--alive").returncode == 1  # nothing listens


def test_the_header_command_renders_the_same_files(model, tmp_path):
    files = render(model, tmp_path / "a", "--pp", "2", "--ep", "2", "--image", "reg/stagemesh:1", "--model-host-path",
                   "/data/model", "--insecure", "--device", "cpu")
    line = (tmp_path / "a" / "gateway.yaml").read_text().splitlines()[1]
    argv = shlex.split(line.lstrip("# "))
    assert argv[:2] == ["stagemesh", "render"] and argv[-2:] == ["--out", "DIR"]
    again = render(model, tmp_path / "b", *argv[2:-2])
    assert again == files
    assert "secret" not in json.dumps(objects(files))  # --insecure: no Secret mounted, no flag reading one


def test_secret_paths_outside_the_folder_are_refused(model, tmp_path, capsys):
    for flag, value in (("--secrets-dir", "/etc/stagemesh"), ("--api-key-file", "../keys")):
        assert cli_main(["render", "--model", str(model), "--out", str(tmp_path / "out"), flag, value]) == 1
        assert "inside --out" in capsys.readouterr().err


def test_render_compose_points_to_stagemesh_compose(model, tmp_path, capsys):
    assert cli_main(["render", "--target", "compose", "--model", str(model), "--out", str(tmp_path)]) == 1
    assert "stagemesh compose" in capsys.readouterr().err


def test_the_planner_writes_service_addresses_on_kubernetes(model, redis_url):
    argv = ["topology", "--model", str(model), "--pp", "2", "--tp", "2", "--dp", "2", "--target", "k8s",
            "--redis-url", redis_url, "--deployment", "k8s-test"]
    assert cli_main(argv) == 0
    doc = asyncio.run(_read_topology(redis_url, "k8s-test"))
    stage = find_stage(doc, 1, 0)
    assert (stage.devices, stage.address) == (("cuda:0", "cuda:1"), "stagemesh-stage-c1-s0:50100")
    assert stage.next_address == "stagemesh-stage-c1-s1:50100"


async def _read_topology(url: str, deployment: str):
    store = await Store.connect(url, deployment)
    try:
        return await store.get_topology()
    finally:
        await store.close()


def test_a_cpu_plan_is_for_kubernetes_only(model, capsys):
    argv = ["topology", "--model", str(model), "--device", "cpu", "--redis-url", "redis://127.0.0.1:1/0"]
    assert cli_main(argv) == 1
    assert "--device cpu needs --target k8s" in capsys.readouterr().err
