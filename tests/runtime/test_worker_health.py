"""grpc.health.v1 of stage workers across start-up, serving and drain (real processes, real Redis).

A stage is SERVING only once its weights are loaded AND the next stage serves; it is
NOT_SERVING while it drains after SIGTERM, even though it still answers the steps it took.

NOTE: drain is watched on a ``Health.Watch`` stream opened before SIGTERM: once the worker's
``server.stop(grace)`` begins, gRPC refuses new calls (a ``Check`` gets UNAVAILABLE, which a
load balancer reads as not serving too), while calls already open, like the watch, go on.
"""

from __future__ import annotations

import contextlib
import json
import signal
import threading
import time
import uuid
from concurrent import futures

import grpc
import pytest
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

from stagemesh.deploy.redis_server import free_port
from stagemesh.mesh.topology import Topology
from stagemesh.serving.types import StepResult
from stagemesh.v1 import stage_pb2_grpc
from stagemesh.wire.codec.messages import plan_to_pb, result_to_pb
from tests.checkpoints import make_hf_checkpoint
from tests.stage_worker.test_service import (
    BLOCK_SIZE,
    LAYERS,
    NUM_LAYERS,
    Mesh,
    _health,
    _info,
    _log,
    _prefill,
    _prompts,
    _store_call,
    forward_stream,
)

pytestmark = pytest.mark.slow

SERVING, NOT_SERVING = health_pb2.HealthCheckResponse.SERVING, health_pb2.HealthCheckResponse.NOT_SERVING
NEIGHBOUR_S = 15.0
"""How long a stage's health may take to follow its neighbour's: it checks it every second (every
0.25 s while it does not answer), each check with a deadline of its own; a loaded machine delays both."""


def _wait_for(what: str, condition, timeout_s: float = 30.0, mesh: Mesh | None = None) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        if time.monotonic() > deadline:
            logs = "\n".join(_log(p) for p in mesh.procs.values()) if mesh else ""
            raise AssertionError(f"not {what} after {timeout_s} s\n{logs}")
        time.sleep(0.1)


def _loaded(address: str) -> bool:
    try:
        _info(address)  # Info answers UNAVAILABLE until the weights are loaded
        return True
    except Exception:  # noqa: BLE001 - any failure means "not yet"
        return False


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return make_hf_checkpoint("llama", tmp_path_factory.mktemp("llama5"), num_layers=NUM_LAYERS)


@contextlib.contextmanager
def _mesh(redis_url: str, model_dir, log_dir, addresses: list[str]):
    """A two-stage topology in Redis at ``addresses``; the test starts the workers it wants."""
    mesh = Mesh(redis_url, f"health-{uuid.uuid4().hex[:8]}", model_dir, log_dir, addresses)
    stages = [
        {"stage": s, "start_layer": start, "end_layer": end, "address": address, "device": "cpu", "kv_blocks": None}
        for s, ((start, end), address) in enumerate(zip(LAYERS, addresses))
    ]
    topology = {"model": str(model_dir), "num_layers": NUM_LAYERS, "block_size": BLOCK_SIZE, "dtype": None,
                "chains": [{"chain": 0, "stages": stages}]}
    _store_call(redis_url, mesh.deployment, lambda store: store.set_topology(Topology.from_json(json.dumps(topology))))
    try:
        yield mesh
    finally:
        for proc in mesh.procs.values():
            if proc.poll() is None:
                proc.send_signal(signal.SIGCONT)
        mesh.kill_all()


def test_stage_serves_only_once_loaded_and_while_its_next_stage_serves(redis_url, model_dir, tmp_path):
    addresses = [f"127.0.0.1:{free_port()}" for _ in range(2)]
    with _mesh(redis_url, model_dir, tmp_path, addresses) as mesh:
        first, last = addresses
        # Start-up: stage 0 alone. Before and after loading it is not SERVING: stage 1 is not there.
        mesh.start(0)
        seen = set()
        _wait_for("stage 0 loaded", lambda: seen.add(_health(first)) or _loaded(first), mesh=mesh)
        assert seen <= {None, NOT_SERVING}, seen
        time.sleep(1.0)
        assert _health(first) == NOT_SERVING  # loaded, but its neighbour is unreachable

        # Serving: once stage 1 serves (it has no neighbour to wait on), so does stage 0.
        mesh.start(1)
        mesh.wait_serving(1)
        _wait_for("stage 0 SERVING", lambda: _health(first) == SERVING, timeout_s=NEIGHBOUR_S, mesh=mesh)

        # A neighbour that stops answering turns stage 0 NOT_SERVING; SERVING again once it answers.
        mesh.procs[1].send_signal(signal.SIGSTOP)
        _wait_for("stage 0 NOT_SERVING", lambda: _health(first) == NOT_SERVING, timeout_s=NEIGHBOUR_S, mesh=mesh)
        mesh.procs[1].send_signal(signal.SIGCONT)
        _wait_for("stage 0 SERVING again", lambda: _health(first) == SERVING, timeout_s=NEIGHBOUR_S, mesh=mesh)
        assert _health(last) == SERVING


class HeldNextStage(stage_pb2_grpc.StageServicer):
    """A stand-in for stage 1 that serves health and answers each step only while ``gate`` is open."""

    def __init__(self):
        self.gate = threading.Event()
        self.gate.set()
        self.received: list[int] = []

    def Forward(self, request_iterator, context):
        for request in request_iterator:
            self.received.append(request.step_id)
            self.gate.wait(30)
            yield result_to_pb(StepResult(request.step_id))


@contextlib.contextmanager
def held_next_stage(address: str):
    servicer, server = HeldNextStage(), grpc.server(futures.ThreadPoolExecutor(max_workers=4))
    stage_pb2_grpc.add_StageServicer_to_server(servicer, server)
    health_pb2_grpc.add_HealthServicer_to_server(health.HealthServicer(), server)  # "" is SERVING
    server.add_insecure_port(address)
    server.start()
    try:
        yield servicer
    finally:
        servicer.gate.set()
        server.stop(0)


def _watch(address: str, events: list) -> grpc.Channel:
    """Appends (monotonic time, status) for every status the worker's Health.Watch stream sends."""
    channel = grpc.insecure_channel(address)
    stream = health_pb2_grpc.HealthStub(channel).Watch(health_pb2.HealthCheckRequest())

    def follow():
        with contextlib.suppress(grpc.RpcError):
            for reply in stream:
                events.append((time.monotonic(), reply.status))

    threading.Thread(target=follow, daemon=True).start()
    return channel


def test_draining_stage_is_not_serving_while_its_in_flight_step_finishes(redis_url, model_dir, tmp_path):
    addresses = [f"127.0.0.1:{free_port()}" for _ in range(2)]
    with _mesh(redis_url, model_dir, tmp_path, addresses) as mesh, held_next_stage(addresses[1]) as next_stage:
        mesh.start(0)
        mesh.wait_serving(0)
        events: list[tuple[float, int]] = []
        channel = _watch(addresses[0], events)
        _wait_for("the Watch stream's first status", lambda: events, timeout_s=10, mesh=mesh)
        with forward_stream(addresses[0]) as stream:
            assert stream.step(plan_to_pb(_prefill(1, 100, _prompts(1, (5,))[0]))).step_id == 1
            next_stage.gate.clear()
            stream.send(plan_to_pb(_prefill(2, 200, _prompts(2, (7,))[0])))
            _wait_for("step 2 in flight at the next stage", lambda: 2 in next_stage.received, timeout_s=5, mesh=mesh)
            t_term = time.monotonic()
            mesh.procs[0].send_signal(signal.SIGTERM)
            _wait_for("NOT_SERVING on the Watch stream", lambda: events and events[-1][1] == NOT_SERVING,
                      timeout_s=10, mesh=mesh)  # step 2 is held meanwhile: it cannot end the drain
            assert [status for t, status in events if t < t_term] == [SERVING], events
            assert mesh.procs[0].poll() is None  # still up: its step 2 is not answered yet
            next_stage.gate.set()
            answer = stream.recv()[0]
            assert answer.step_id == 2 and not answer.HasField("error"), answer
        channel.close()  # a watcher leaves on NOT_SERVING; until it does, server.stop waits out its grace
        assert mesh.procs[0].wait(10) == 0, _log(mesh.procs[0])
