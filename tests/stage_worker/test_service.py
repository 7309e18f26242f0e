"""Stage workers as real processes: a tiny 5-layer llama split into two stages (layers 0-3, 3-5),
a real redis-server holding the topology, real sockets. The reference is ``LocalChain`` (the
whole model in this process) running the same hand-written plans.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import json
import queue
import random
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path

import grpc
import pytest
import torch
from grpc_health.v1 import health_pb2, health_pb2_grpc

from stagemesh.config import StageSpec
from stagemesh.deploy.redis_server import free_port
from stagemesh.mesh.store import Store
from stagemesh.mesh.topology import Topology
from stagemesh.runners.local import LocalChain
from stagemesh.runners.stage import StageRunner
from stagemesh.runtime import cpus
from stagemesh.serving.types import SampleSpec, SeqChunk, StepPlan
from stagemesh.v1 import stage_pb2, stage_pb2_grpc, tensor_pb2
from stagemesh.wire.codec.messages import plan_to_pb, result_from_pb
from stagemesh.wire.codec.tensors import tensor_to_pb
from tests.checkpoints import make_hf_checkpoint

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[2]
NUM_LAYERS, SPLIT, KV_BLOCKS, BLOCK_SIZE, HIDDEN = 5, 3, 64, 16, 64
LAYERS = ((0, SPLIT), (SPLIT, NUM_LAYERS))  # stage -> [start, end)
GREEDY = SampleSpec(temperature=0.0, top_k=0, top_p=1.0, seed=0, index=0)
OPTIONS = [("grpc.max_send_message_length", 64 * 2**20), ("grpc.max_receive_message_length", 64 * 2**20)]


# --- the mesh: processes, topology, streams -------------------------------------------------


@dataclasses.dataclass
class Mesh:
    redis_url: str
    deployment: str
    model_dir: Path
    log_dir: Path
    addresses: list[str]
    procs: dict[int, subprocess.Popen] = dataclasses.field(default_factory=dict)

    def start(self, stage: int) -> subprocess.Popen:
        log_path = self.log_dir / f"stage{stage}-{time.time_ns()}.log"
        with open(log_path, "wb") as log:
            proc = subprocess.Popen(
                _worker_cmd(self.redis_url, self.deployment, stage, "--kv-blocks", str(KV_BLOCKS)),
                cwd=REPO, stdout=log, stderr=subprocess.STDOUT,
            )
        proc.log_path = log_path
        self.procs[stage] = proc
        return proc

    def wait_serving(self, stage: int, timeout_s: float = 60.0) -> None:
        proc, deadline = self.procs[stage], time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            assert proc.poll() is None, f"stage {stage} exited {proc.returncode}:\n{_log(proc)}"
            if _health(self.addresses[stage]) == health_pb2.HealthCheckResponse.SERVING:
                return
            time.sleep(0.1)
        raise AssertionError(f"stage {stage} not SERVING after {timeout_s} s:\n{_log(proc)}")

    def terminate(self, stage: int, timeout_s: float = 5.0) -> float:
        """SIGTERM the stage; returns how long it took to exit (it must exit 0)."""
        proc, t0 = self.procs[stage], time.monotonic()
        proc.send_signal(signal.SIGTERM)
        code = proc.wait(timeout_s)
        assert code == 0, f"stage {stage} exited {code} after SIGTERM:\n{_log(proc)}"
        return time.monotonic() - t0

    def kill_all(self) -> None:
        for proc in self.procs.values():
            if proc.poll() is None:
                proc.kill()
                proc.wait(10)


def _worker_cmd(redis_url: str, deployment: str, stage: int, *extra: str) -> list[str]:
    return [
        sys.executable, "-m", "stage_worker", "--redis-url", redis_url, "--deployment", deployment,
        "--chain", "0", "--stage", str(stage), "--threads", "1", *extra,
    ]


def _log(proc: subprocess.Popen) -> str:
    return proc.log_path.read_text(errors="replace")[-4000:]


def _health(address: str, service: str = "") -> int | None:
    with grpc.insecure_channel(address) as channel:
        request = health_pb2.HealthCheckRequest(service=service)
        try:
            return health_pb2_grpc.HealthStub(channel).Check(request, timeout=1).status
        except grpc.RpcError:
            return None


def _store_call(redis_url: str, deployment: str, body):
    async def run():
        async with await Store.connect(redis_url, deployment) as store:
            return await body(store)

    return asyncio.run(run())


@contextlib.contextmanager
def running_mesh(redis_url: str, model_dir: Path, log_dir: Path):
    """Both stages started from a fresh topology and SERVING; killed on the way out."""
    addresses = [f"127.0.0.1:{free_port()}" for _ in range(2)]
    mesh = Mesh(redis_url, f"test-{uuid.uuid4().hex[:8]}", model_dir, log_dir, addresses)
    stages = [
        {"stage": s, "start_layer": start, "end_layer": end, "address": address, "device": "cpu", "kv_blocks": None}
        for s, ((start, end), address) in enumerate(zip(LAYERS, addresses))
    ]
    topology = {
        "model": str(model_dir), "num_layers": NUM_LAYERS, "block_size": BLOCK_SIZE, "dtype": None,
        "chains": [{"chain": 0, "stages": stages}],
    }
    _store_call(redis_url, mesh.deployment, lambda store: store.set_topology(Topology.from_json(json.dumps(topology))))
    try:
        for stage in (0, 1):
            mesh.start(stage)
        for stage in (0, 1):
            mesh.wait_serving(stage)
        yield mesh
    finally:
        mesh.kill_all()


class ForwardStream:
    """One ``Forward`` call: ``send`` requests, ``recv`` their answers in order."""

    def __init__(self, address: str):
        self._channel = grpc.insecure_channel(address, options=OPTIONS)
        self._outbox: queue.Queue = queue.Queue()
        stub = stage_pb2_grpc.StageStub(self._channel)
        self._answers = stub.Forward(iter(self._outbox.get, None), timeout=60)

    def send(self, *requests: stage_pb2.StageRequest) -> None:
        for request in requests:
            self._outbox.put(request)

    def recv(self, n: int = 1) -> list[stage_pb2.StageResponse]:
        return [next(self._answers) for _ in range(n)]

    def step(self, request: stage_pb2.StageRequest) -> stage_pb2.StageResponse:
        self.send(request)
        return self.recv()[0]

    def close(self) -> None:
        self._outbox.put(None)
        self._channel.close()


@contextlib.contextmanager
def forward_stream(address: str):
    stream = ForwardStream(address)
    try:
        yield stream
    finally:
        stream.close()


def _info(address: str) -> stage_pb2.StageInfo:
    with grpc.insecure_channel(address) as channel:
        return stage_pb2_grpc.StageStub(channel).Info(tensor_pb2.InfoRequest(), timeout=5)


# --- plans ----------------------------------------------------------------------------------


def _prefill(step_id: int, seq_id: int, prompt: list[int]) -> StepPlan:
    return StepPlan(step_id, (SeqChunk(seq_id, 0, tuple(prompt), GREEDY),))


def _decode(step_id: int, seqs: dict[int, list[int]]) -> StepPlan:
    """One decode chunk per sequence: its last token, at position len - 1."""
    return StepPlan(step_id, tuple(
        SeqChunk(seq_id, len(ids) - 1, (ids[-1],), dataclasses.replace(GREEDY, index=len(ids)))
        for seq_id, ids in seqs.items()
    ))


def _prompts(seed: int, lengths: tuple[int, ...]) -> list[list[int]]:
    rng = random.Random(seed)
    return [[rng.randrange(2, 320) for _ in range(n)] for n in lengths]


def _tokens(response: stage_pb2.StageResponse) -> dict[int, int]:
    return result_from_pb(response).tokens  # raises the step's error, if any


# --- fixtures -------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> Path:
    return make_hf_checkpoint("llama", tmp_path_factory.mktemp("llama5"), num_layers=NUM_LAYERS)


@pytest.fixture(scope="module")
def reference(model_dir) -> LocalChain:
    return LocalChain.load(model_dir, 1, num_kv_blocks=KV_BLOCKS, block_size=BLOCK_SIZE)


@pytest.fixture(scope="module")
def mesh(redis_url, model_dir, tmp_path_factory):
    with running_mesh(redis_url, model_dir, tmp_path_factory.mktemp("logs")) as mesh:
        yield mesh


# --- tests ----------------------------------------------------------------------------------


def test_both_stages_report_serving_health(mesh):
    for address in mesh.addresses:
        assert _health(address) == health_pb2.HealthCheckResponse.SERVING
        assert _health(address, "stagemesh.v1.Stage") == health_pb2.HealthCheckResponse.SERVING


def test_two_stage_mesh_generates_the_local_chain_tokens_and_frees_kv(mesh, reference):
    prompts = _prompts(0, (5, 11, 19))  # 19 tokens span two KV blocks
    seqs = {100 + i: list(p) for i, p in enumerate(prompts)}
    with forward_stream(mesh.addresses[0]) as stream:
        # Three prefills in flight at once: the answers come back in request order.
        plans = [_prefill(1 + i, seq_id, ids) for i, (seq_id, ids) in enumerate(seqs.items())]
        stream.send(*(plan_to_pb(p) for p in plans))
        answers = stream.recv(3)
        assert [a.step_id for a in answers] == [1, 2, 3]
        for plan, answer in zip(plans, answers):
            tokens = _tokens(answer)
            assert tokens == reference.run(plan).tokens
            for seq_id, token in tokens.items():
                seqs[seq_id].append(token)
        assert all(_info(a).kv_blocks_used == 1 + 1 + 2 for a in mesh.addresses)

        for step_id in range(4, 9):  # greedy decodes of all three together
            plan = _decode(step_id, seqs)
            tokens = _tokens(stream.step(plan_to_pb(plan)))
            assert tokens == reference.run(plan).tokens and set(tokens) == set(seqs)
            for seq_id, token in tokens.items():
                seqs[seq_id].append(token)

        free = StepPlan(9, (), free=tuple(seqs))
        answer = stream.step(plan_to_pb(free))
        assert answer.step_id == 9 and not answer.HasField("error") and _tokens(answer) == {}
        reference.run(free)
    for stage, address in enumerate(mesh.addresses):
        info = _info(address)
        assert (info.role, info.chain, info.stage, info.num_stages) == ("stage", 0, stage, 2)
        assert (info.layer_start, info.layer_end, info.num_layers) == LAYERS[stage] + (5,)
        assert (info.num_kv_blocks, info.block_size, info.kv_blocks_used) == (KV_BLOCKS, BLOCK_SIZE, 0)
        assert (info.device, info.dtype, info.hidden_size, info.tp_size) == ("cpu", "float32", HIDDEN, 1)
        assert info.model == str(mesh.model_dir) and info.pid == mesh.procs[stage].pid


def test_malformed_requests_get_error_answers_and_the_same_stream_goes_on(mesh, reference):
    prompt = _prompts(1, (7,))[0]
    good = _prefill(21, 200, prompt)
    short = plan_to_pb(_prefill(20, 201, prompt))
    short.lengths[0] += 1  # token ids no longer add up to the lengths
    with forward_stream(mesh.addresses[0]) as stream:
        stream.send(short, plan_to_pb(good), short)
        bad, ok, bad_again = stream.recv(3)
        assert [bad.step_id, ok.step_id, bad_again.step_id] == [20, 21, 20]
        assert bad.error.code == "INVALID_ARGUMENT" and "token_ids" in bad.error.message
        assert _tokens(ok) == reference.run(good).tokens
        assert _tokens(stream.step(plan_to_pb(StepPlan(22, (), free=(200,))))) == {}
    reference.run(StepPlan(22, (), free=(200,)))


def test_stage1_refuses_hidden_of_the_wrong_width_and_serves_the_next_request(mesh, model_dir):
    spec0, spec1 = StageSpec(0, SPLIT, NUM_LAYERS), StageSpec(SPLIT, NUM_LAYERS, NUM_LAYERS)
    first, last = (StageRunner(model_dir, spec, num_kv_blocks=8, block_size=BLOCK_SIZE) for spec in (spec0, spec1))
    plan = _prefill(30, 300, _prompts(2, (6,))[0])
    hidden = first.step(plan, None)  # [6, H]
    wrong = plan_to_pb(plan, tensor_to_pb(torch.randn(6, HIDDEN - 1)))
    missing = plan_to_pb(plan)
    with forward_stream(mesh.addresses[1]) as stream:
        stream.send(wrong, missing, plan_to_pb(plan, tensor_to_pb(hidden)))
        wrong_answer, missing_answer, answer = stream.recv(3)
        assert wrong_answer.error.code == "INVALID_ARGUMENT" and "[6, 64]" in wrong_answer.error.message
        assert missing_answer.error.code == "INVALID_ARGUMENT" and "hidden" in missing_answer.error.message
        assert _tokens(answer) == last.step(plan, hidden).tokens
        assert _tokens(stream.step(plan_to_pb(StepPlan(31, (), free=(300,))))) == {}  # no hidden needed
    assert _info(mesh.addresses[1]).kv_blocks_used == 0


def test_workers_register_in_redis_and_publish_busy_intervals(mesh):
    t_start = time.time()
    with forward_stream(mesh.addresses[0]) as stream:
        plan = _prefill(40, 400, _prompts(3, (4,))[0])
        _tokens(stream.step(plan_to_pb(plan)))
        _tokens(stream.step(plan_to_pb(StepPlan(41, (), free=(400,)))))
    t_sent = time.time()
    workers = _store_call(mesh.redis_url, mesh.deployment, lambda store: store.list_workers())
    assert [w.worker_id for w in workers] == ["stage-c0-s0", "stage-c0-s1"]
    for stage, worker in enumerate(workers):
        assert worker.alive and worker.role == "stage" and (worker.chain, worker.stage) == (0, stage)
        assert (worker.address, worker.pid, worker.device) == (mesh.addresses[stage], mesh.procs[stage].pid, "cpu")
        assert (worker.start_layer, worker.end_layer) == LAYERS[stage]
    # A worker the registry forgot (e.g. declared dead while slow) registers again.
    _store_call(mesh.redis_url, mesh.deployment, lambda store: store.deregister_worker("stage-c0-s1"))
    deadline = time.monotonic() + 5
    while len(_store_call(mesh.redis_url, mesh.deployment, lambda store: store.list_workers())) < 2:
        assert time.monotonic() < deadline, "stage-c0-s1 did not register again"
        time.sleep(0.2)
    deadline = time.monotonic() + 5
    while True:  # figures go out with each heartbeat (every second)
        metrics = _store_call(mesh.redis_url, mesh.deployment, lambda store: store.get_metrics())
        figures = [metrics.get(f"stage-c0-s{s}", {}) for s in (0, 1)]
        done = [f.get("busy_intervals") and f["busy_intervals"][-1][1] <= t_sent and f["kv_blocks_used"] == 0
                and f["busy_intervals"][-1][0] >= t_start for f in figures]
        if all(done) or time.monotonic() > deadline:
            break
        time.sleep(0.2)
    for f in figures:
        assert {"steps", "tokens_processed", "busy_s", "kv_blocks_used", "kv_blocks_total", "queue_depth",
                "busy_intervals"} <= set(f)
        assert f["steps"] >= 2 and f["tokens_processed"] >= 4 and f["busy_s"] > 0
        assert (f["kv_blocks_used"], f["kv_blocks_total"], f["queue_depth"]) == (0, KV_BLOCKS, 0)
        assert all(t0 <= t1 for t0, t1 in f["busy_intervals"]) and f["busy_intervals"][-1][0] >= t_start


def test_lost_next_stage_answers_unavailable_then_reconnects_and_sigterm_exits_0(redis_url, model_dir, reference,
                                                                                   tmp_path):
    with running_mesh(redis_url, model_dir, tmp_path) as mesh, forward_stream(mesh.addresses[0]) as stream:
        plan = _prefill(50, 500, _prompts(4, (9,))[0])
        assert mesh.terminate(1) < 5
        answer = stream.step(plan_to_pb(plan))
        assert answer.step_id == 50 and answer.error.code == "UNAVAILABLE"
        assert f"stage c0-s1 at {mesh.addresses[1]} is unreachable" in answer.error.message
        workers = _store_call(redis_url, mesh.deployment, lambda store: store.list_workers())
        assert [w.worker_id for w in workers] == ["stage-c0-s0"]  # stage 1 left the registry

        mesh.start(1)
        mesh.wait_serving(1)
        # Stage 0 ran step 50 before it failed to forward it: free 500 with the retry.
        retry = dataclasses.replace(plan, step_id=51, free=(500,))
        assert _tokens(stream.step(plan_to_pb(retry))) == reference.run(plan).tokens
        reference.run(StepPlan(52, (), free=(500,)))
        # SIGTERM with a client stream still open: stage 0 ends it and exits 0, then stage 1.
        assert mesh.terminate(0) < 5
        assert mesh.terminate(1) < 5


def test_worker_without_topology_exits_1_naming_what_is_missing(redis_url, tmp_path):
    cmd = _worker_cmd(redis_url, f"test-{uuid.uuid4().hex[:8]}", 0, "--topology-wait-s", "0.5")
    done = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=60)
    assert done.returncode == 1
    assert "no topology in Redis" in done.stderr and "stagemesh up" in done.stderr


def test_worker_given_cores_it_cannot_have_exits_1_naming_the_ones_it_can(redis_url):
    cmd = _worker_cmd(redis_url, f"test-{uuid.uuid4().hex[:8]}", 0, "--cpus", "100000")
    done = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=60)
    assert done.returncode == 1
    assert "cannot bind to cores 100000" in done.stderr, done.stderr
    assert f"this host allows {cpus.format_list(cpus.available())}" in done.stderr, done.stderr
    bad = subprocess.run(_worker_cmd(redis_url, "x", 0, "--cpus", "0-"), cwd=REPO, capture_output=True, text=True, timeout=60)
    assert bad.returncode == 2 and "'0-' is not a core number or a range like 2-5" in bad.stderr, bad.stderr
