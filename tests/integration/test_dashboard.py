"""The gateway's HTTP side on a real pp=2 mesh: /metrics after traffic, /api/status against the
gRPC status document, and the dashboard page in a real headless Chromium: its server-rendered first
paint, its history charts and pipeline timeline on an idle and on a loaded mesh (screenshots of
both under the test's tmp_path), and a killed worker shown DOWN.

NOTE: the mesh is started with ``stagemesh.deploy.launch.Mesh`` (what `stagemesh up` runs) rather than
the `up` command, because `up` stops the whole mesh once one of its children exits, and the
last test kills a stage worker to see the page show it DOWN. When `stagemesh up` has expert
parallelism (``UpOptions.ep``), the mesh is a Qwen2-MoE model with ``ep=2`` so that expert
workers are on the page too; until then it is a Llama model.
"""

from __future__ import annotations

import dataclasses
import json
import struct
import threading
import time
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from prometheus_client.parser import text_string_to_metric_families

from stagemesh import Client
from stagemesh.cli.commands import main as cli_main
from stagemesh.deploy.launch import Mesh
from stagemesh.deploy.redis_server import free_port
from stagemesh.deploy.up_plan import UpOptions
from stagemesh.runtime import tls as mesh_tls
from stagemesh.runtime.heartbeat import INTERVAL_S
from stagemesh.runtime.tls import MeshTLS
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
PAGE_JS = """
const rowOf = (node) => node.closest('.history-row');
const charts = Array.from(document.querySelectorAll('#history figure.chart')).map((f) => ({
  kind: rowOf(f).dataset.kind, stage: rowOf(f).dataset.stage || '', chart: f.dataset.chart,
  points: Number(f.dataset.points), last: f.dataset.last, paths: f.querySelectorAll('path.line').length}));
const bars = {};
document.querySelectorAll('#timeline rect.step').forEach((r) => { bars[r.dataset.stage] = (bars[r.dataset.stage] || 0) + 1; });
return {charts, bars,
        lanes: Array.from(document.querySelectorAll('#timeline g.stage-row')).map((g) => g.dataset.stage),
        idle: Array.from(document.querySelectorAll('#timeline .timeline-chain')).map((c) => c.dataset.idle),
        heat: Array.from(document.querySelectorAll('#experts .heat')).map((h) => h.dataset.expert)};
"""
"""What the page draws: every chart (its row, points drawn, last value), the timeline's bars per stage."""
STAGES = ["c0-s0", "c0-s1"]


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


def _health(address: str, tls: MeshTLS | None) -> int | None:
    """A worker's health, asked with the launcher's own (admin) certificate: the mesh's ports are mTLS."""
    with mesh_tls.channel(address, tls) as channel:
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


def _until_the_stages_report(mesh, tokens: int, timeout: float = 15.0) -> None:
    """Until a heartbeat after the traffic reached Redis from every worker: every stage counts ``tokens``
    and holds no KV, and the status document (less its clock fields) reads the same across two heartbeats,
    so the expert workers' figures, which beat on their own clock, have come in too (a heartbeat is ~1 s;
    a loaded machine delays it)."""
    deadline = time.monotonic() + timeout
    previous = None
    while True:
        doc = json.loads(_get(mesh, "/api/status"))
        stages = [w["load"] for w in doc["workers"] if w["role"] == "stage"]
        done = stages and all(s["tokens_processed"] >= tokens and s["kv_blocks_used"] == 0 for s in stages)
        if done and _without_timing(doc) == previous:
            return
        assert time.monotonic() < deadline, f"the workers' figures never settled after the traffic: {stages}"
        previous = _without_timing(doc) if done else None
        time.sleep(1.5 * INTERVAL_S if done else 0.2)


def _differences(left, right, path: str = "") -> list[str]:
    """Where two JSON documents differ, as ``path: left != right`` lines (pytest's own diff is cut short)."""
    if isinstance(left, dict) and isinstance(right, dict):
        return [d for k in sorted(left.keys() | right.keys(), key=str)
                for d in _differences(left.get(k), right.get(k), f"{path}.{k}")]
    if isinstance(left, list) and isinstance(right, list) and len(left) == len(right):
        return [d for i, (a, b) in enumerate(zip(left, right)) for d in _differences(a, b, f"{path}[{i}]")]
    return [] if left == right else [f"{path}: {left!r} != {right!r}"]


def test_metrics_after_traffic_and_api_status_is_the_grpc_document(mesh, capsys):
    with Client(mesh.gateway_address, timeout=60) as client:
        for n in range(REQUESTS):
            client.generate(token_ids=list(range(3, 8 + n)), max_new_tokens=TOKENS, ignore_eos=True)
    _until_the_stages_report(mesh, REQUESTS * TOKENS)

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
    same_api, same_grpc = _without_timing(api), _without_timing(grpc_doc)
    assert same_api == same_grpc, _differences(same_api, same_grpc)
    stages = sorted((w for w in api["workers"] if w["role"] == "stage"), key=lambda w: w["stage"])
    assert [w["stage"] for w in stages] == [0, 1]
    for w in stages:
        load = w["load"]
        assert 0 < load["step_latency_p50_s"] <= load["step_latency_p99_s"], load
        assert load["tokens_processed"] >= REQUESTS * TOKENS and 0 <= load["bubble_fraction"] <= 1
        assert w["heartbeat_age_s"] < 3
    assert stages[0]["load"]["bytes_sent"] > 0
    for w in api["workers"]:  # every worker, stage or expert, answers grpc.health.v1 SERVING
        assert _health(w["address"], mesh.tls) == health_pb2.HealthCheckResponse.SERVING, w


def _screenshot(page, path) -> None:
    """The whole page as a PNG at ``path``; it must be a PNG as wide as the window and not blank."""
    height = page.execute_script("return document.documentElement.scrollHeight")
    page.set_window_size(1600, max(1000, height + 120))
    page.save_screenshot(str(path))
    png = path.read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n", path
    width, _ = struct.unpack(">II", png[16:24])
    assert width >= 1200 and len(png) > 30_000, (path, width, len(png))


def _charts_drawn(shown: dict) -> bool:
    """A chart per declared series group for the chain and each stage, each with a line of 2+ points."""
    rows = {(c["kind"], c["stage"]) for c in shown["charts"]}
    return rows >= {("chain", ""), *(("stage", s) for s in STAGES)} and all(c["points"] >= 2 for c in shown["charts"]
                                                                           if c["chart"] in ("tokens", "kv", "busy"))


@contextmanager
def load(address: str, streams: int = 3) -> Iterator[list[int]]:
    """Requests from a few threads, one client each, until the block ends; yields the count done."""
    stop, done = threading.Event(), [0]

    def run(n: int) -> None:
        with Client(address, timeout=120) as client:
            while not stop.is_set():
                client.generate(token_ids=list(range(3, 12 + n)), max_new_tokens=24, ignore_eos=True)
                done[0] += 1

    threads = [threading.Thread(target=run, args=(n,), daemon=True) for n in range(streams)]
    for thread in threads:
        thread.start()
    try:
        yield done
    finally:
        stop.set()
        for thread in threads:
            thread.join(timeout=120)


def test_dashboard_first_paint_charts_and_timeline_idle_and_loaded(mesh, tmp_path):
    from selenium.webdriver.support.ui import WebDriverWait

    doc = json.loads(_get(mesh, "/api/status"))
    html = _get(mesh, "/").decode()  # what the browser paints first, before any script runs
    for worker in doc["workers"]:
        assert f'data-address="{worker["address"]}"' in html and 'data-health="up"' in html, worker
    assert '<tr data-chain="0" class="up">' in html and '<script id="initial-data" type="application/json">' in html
    history = json.loads(_get(mesh, "/api/history"))
    assert [s["name"] for s in history["stages"]] == STAGES and history["chains"][0]["t"]
    since = json.loads(_get(mesh, f"/api/history?since={history['now']}"))  # samples may have come since
    assert all(t > history["now"] for t in since["chains"][0]["t"]), (history["now"], since["chains"][0]["t"])

    with headless_chromium() as page:
        page.get(f"http://{mesh.opts.host}:{mesh.opts.http_port}/")

        def shown() -> dict:
            return page.execute_script(PAGE_JS)

        WebDriverWait(page, 30, poll_frequency=0.5).until(lambda _: _charts_drawn(shown()))
        idle = shown()
        assert idle["lanes"] == STAGES, idle
        assert not HAS_EP or idle["heat"], idle  # the experts' heat rows, whatever their load
        _screenshot(page, tmp_path / "dashboard-idle.png")

        with load(mesh.gateway_address) as done:
            def loaded() -> bool:
                now = shown()
                tokens = [float(c["last"] or 0) for c in now["charts"] if c["chart"] == "tokens"]
                return (now["idle"] == ["false"] and all(now["bars"].get(s, 0) >= 3 for s in STAGES)
                        and len(tokens) == 1 + len(STAGES) and min(tokens) > 0)  # the chain's and every stage's

            WebDriverWait(page, 90, poll_frequency=0.5).until(lambda _: loaded())
            busy = shown()
            _screenshot(page, tmp_path / "dashboard-loaded.png")
        assert done[0] > 0
    assert all(busy["bars"][s] >= 3 for s in STAGES), busy["bars"]
    drawn = {(c["kind"], c["stage"], c["chart"]): c for c in busy["charts"]}
    for chart in ("tokens", "ttft", "itl", "queue", "kv", "busy"):
        assert drawn["chain", "", chart]["paths"] >= 1, chart
    assert drawn["chain", "", "ttft"]["points"] >= 1 and drawn["chain", "", "itl"]["points"] >= 1, drawn
    for stage in STAGES:
        assert drawn["stage", stage, "tokens"]["points"] >= 2 and drawn["stage", stage, "step"]["points"] >= 1
    if HAS_EP:
        assert busy["heat"], busy
    print(f"screenshots: {tmp_path / 'dashboard-idle.png'} {tmp_path / 'dashboard-loaded.png'}")


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
