"""The gateway's HTTP side on a real pp=2 mesh: /metrics after traffic, /api/status against the
gRPC status document, and the dashboard page in a real headless Chromium.

NOTE: the mesh is started with ``stagemesh.deploy.launch.Mesh`` (what `stagemesh up` runs) rather than
the `up` command, because `up` stops the whole mesh once one of its children exits, and the
last test kills a stage worker to see the page show it DOWN. When `stagemesh up` has expert
parallelism (``UpOptions.ep``), the mesh is a Qwen2-MoE model with ``ep=2`` so that expert
workers are on the page too; until then it is a Llama model.
"""

from __future__ import annotations

import dataclasses
import json
import time
import urllib.request

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from prometheus_client.parser import text_string_to_metric_families

from stagemesh import Client
from stagemesh.cli.commands import main as cli_main
from stagemesh.deploy.launch import Mesh, UpOptions
from stagemesh.deploy.redis_server import free_port
from tests.checkpoints import make_hf_checkpoint
from tests.integration.browser import headless_chromium

pytestmark = pytest.mark.slow

HAS_EP = "ep" in {f.name for f in dataclasses.fields(UpOptions)}
TIMING = {"heartbeat_age_s", "busy_fraction", "micro_batches_per_s", "tokens_per_s", "bubble_fraction"}
"""Status fields that move with the clock between two reads of an idle mesh."""
REQUESTS = 4
ROWS_JS = """return Array.from(document.querySelectorAll('#workers tr.worker'))
                    .map(r => [r.dataset.address, r.dataset.health, r.innerText]);"""
EXPERT_LOAD_JS = "return document.querySelectorAll('#workers tr[data-role=expert] [data-expert]').length;"
TOKENS = 6


@pytest.fixture(scope="module")
def mesh(tmp_path_factory):
    root = tmp_path_factory.mktemp("dashboard")
    family, extra = ("qwen2_moe", {"ep": 2}) if HAS_EP else ("llama", {})
    model = make_hf_checkpoint(family, root / "model", num_layers=4)
    opts = UpOptions(model=model, pp=2, port=free_port(), http_port=free_port(), log_dir=root / "logs", **extra)
    mesh = Mesh(opts)
    try:
        mesh.start()
        mesh.wait_ready(timeout=120)
        yield mesh
    finally:
        mesh.stop()


def _get(mesh: Mesh, path: str) -> bytes:
    with urllib.request.urlopen(f"http://{mesh.opts.host}:{mesh.opts.http_port}{path}", timeout=10) as reply:
        assert reply.status == 200
        return reply.read()


def _health(address: str) -> int | None:
    with grpc.insecure_channel(address) as channel:
        try:
            return health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=2).status
        except grpc.RpcError:
            return None


def _without_timing(value):
    if isinstance(value, dict):
        return {k: None if k in TIMING else _without_timing(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_without_timing(v) for v in value]
    return value


def test_metrics_after_traffic_and_api_status_is_the_grpc_document(mesh, capsys):
    with Client(mesh.gateway_address, timeout=60) as client:
        for n in range(REQUESTS):
            client.generate(token_ids=list(range(3, 8 + n)), max_new_tokens=TOKENS, ignore_eos=True)
    time.sleep(1.5)  # one heartbeat: the stages' figures reach Redis

    families = {f.name: f for f in text_string_to_metric_families(_get(mesh, "/metrics").decode())}
    samples = [(s.name, s.labels, s.value) for f in families.values() for s in f.samples]

    def value(name: str, **labels) -> float:
        found = [v for n, lab, v in samples if n == name and labels.items() <= lab.items()]
        assert found, f"no sample {name}{labels}"
        return sum(found)

    assert value("stagemesh_requests_total", outcome="ok") == REQUESTS
    assert value("stagemesh_time_to_first_token_seconds_count", chain="0") == REQUESTS
    assert value("stagemesh_inter_token_latency_seconds_count", chain="0") == REQUESTS * (TOKENS - 1)
    for stage in ("0", "1"):
        assert value("stagemesh_stage_up", chain="0", stage=stage) == 1
        assert value("stagemesh_stage_step_latency_seconds_count", chain="0", stage=stage) >= REQUESTS * TOKENS
        assert value("stagemesh_stage_kv_blocks_capacity", chain="0", stage=stage) > 0
        assert value("stagemesh_stage_kv_blocks_used", chain="0", stage=stage) == 0
        assert value("stagemesh_stage_queue_depth", chain="0", stage=stage) == 0
        assert 0 <= value("stagemesh_stage_busy_fraction", chain="0", stage=stage) <= 1
        assert value("stagemesh_stage_weight_bytes", chain="0", stage=stage, tp_rank="0") > 0
    assert value("stagemesh_stage_bytes_sent_total", chain="0", stage="0") > 0
    assert value("stagemesh_stage_bytes_sent_total", chain="0", stage="1") == 0  # the last stage sends tokens only

    api = json.loads(_get(mesh, "/api/status"))
    assert cli_main(["status", "--addr", mesh.gateway_address, "--json"]) == 0
    grpc_doc = json.loads(capsys.readouterr().out)
    assert _without_timing(api) == _without_timing(grpc_doc)
    stages = sorted((w for w in api["workers"] if w["role"] == "stage"), key=lambda w: w["stage"])
    assert [w["stage"] for w in stages] == [0, 1]
    for w in stages:
        load = w["load"]
        assert 0 < load["step_latency_p50_s"] <= load["step_latency_p99_s"], load
        assert load["tokens_processed"] >= REQUESTS * TOKENS and 0 <= load["bubble_fraction"] <= 1
        assert w["heartbeat_age_s"] < 3
    assert stages[0]["load"]["bytes_sent"] > 0
    for w in api["workers"]:  # every worker, stage or expert, answers grpc.health.v1 SERVING
        assert _health(w["address"]) == health_pb2.HealthCheckResponse.SERVING, w


def test_dashboard_renders_every_worker_and_shows_a_killed_one_down_without_reload(mesh):
    from selenium.webdriver.support.ui import WebDriverWait

    doc = json.loads(_get(mesh, "/api/status"))
    addresses = {w["address"] for w in doc["workers"]}
    assert len([w for w in doc["workers"] if w["role"] == "stage"]) == 2
    if HAS_EP:
        assert any(w["role"] == "expert" for w in doc["workers"]), doc["workers"]

    with headless_chromium() as page:
        page.get(f"http://{mesh.opts.host}:{mesh.opts.http_port}/")

        def rows() -> dict[str, tuple[str, str]]:
            """address -> (data-health, row text), read in one go: the page redraws every second."""
            return {address: (health, text) for address, health, text in page.execute_script(ROWS_JS)}

        WebDriverWait(page, 10).until(lambda _: addresses <= set(rows()))
        shown = rows()
        assert all(shown[a][0] == "up" and "UP" in shown[a][1] and "cpu" in shown[a][1] for a in addresses), shown
        loaded = [w for w in doc["workers"] if w["role"] == "expert" and w["load"].get("expert_tokens")]
        if loaded:  # per-expert token load, once traffic went through the expert workers
            experts = len(loaded[0]["load"]["expert_tokens"])
            WebDriverWait(page, 5).until(lambda _: page.execute_script(EXPERT_LOAD_JS) >= experts)
        page.execute_script("window.__not_reloaded = true")

        victim = next(w for w in doc["workers"] if w["role"] == "stage" and w["stage"] == 1)
        mesh.procs["stage-c0-s1"].kill()  # SIGKILL: no goodbye to Redis, only silence
        t_kill = time.monotonic()
        WebDriverWait(page, 10, poll_frequency=0.2).until(lambda _: rows()[victim["address"]][0] == "down")
        took = time.monotonic() - t_kill
        shown = rows()
        assert "DOWN" in shown[victim["address"]][1], shown
        assert page.execute_script("return window.__not_reloaded === true"), "the page was reloaded"
        assert all(shown[a][0] == "up" for a in addresses - {victim["address"]}), shown
    print(f"stage 1 shown DOWN {took:.1f} s after SIGKILL")
