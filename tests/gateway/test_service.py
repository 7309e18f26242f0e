"""The gateway against real processes: a redis-server, two stage workers, the gateway itself and
a frontend (clients reach the gateway through it).

One mesh (a tiny 5-layer Llama split 3 + 2 over two stage workers) serves every test in the
module; each test leaves it idle (no request running, no KV block used) for the next.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import signal
import subprocess
import sys
import time
import urllib.request
from dataclasses import dataclass
from pathlib import Path

import grpc
import grpc.aio
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from gateway.chain_client import RemoteChain
from stagemesh import AsyncClient
from stagemesh.cli.requests_io import InputLine
from stagemesh.deploy.redis_server import free_port
from stagemesh.errors import Cancelled, InvalidArgument, Unavailable
from stagemesh.mesh.store import Store
from stagemesh.mesh.topology import Topology
from stagemesh.serving.types import SampleSpec, SamplingParams, SeqChunk, StepPlan
from stagemesh.v1 import stage_pb2, stage_pb2_grpc, tensor_pb2

pytestmark = pytest.mark.slow

DEPLOYMENT = "gw-test"
KV_BLOCKS = 128
READY_TIMEOUT_S = 60.0


@dataclass
class Mesh:
    addr: str
    http_port: int
    stage_addresses: list[str]
    model_dir: Path
    procs: dict[str, subprocess.Popen]
    log_dir: Path

    def logs(self) -> str:
        return "\n".join(f"--- {p.name}\n{p.read_text()[-3000:]}" for p in sorted(self.log_dir.glob("*.log")))


def _topology(model_dir: Path, addresses: list[str]) -> Topology:
    layers = [(0, 3), (3, 5)]
    stages = [
        {"stage": i, "start_layer": s, "end_layer": e, "address": a, "device": "cpu", "kv_blocks": KV_BLOCKS}
        for i, ((s, e), a) in enumerate(zip(layers, addresses))
    ]
    return Topology.from_json(json.dumps({"model": str(model_dir), "num_layers": 5, "block_size": 16, "dtype": None,
                                          "chains": [{"chain": 0, "stages": stages}]}))


def _spawn(log_dir: Path, name: str, *args: str) -> subprocess.Popen:
    with open(log_dir / f"{name}.log", "ab") as log:
        return subprocess.Popen([sys.executable, "-m", *args], stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT)


def _stop(procs: dict[str, subprocess.Popen]) -> dict[str, int]:
    """SIGTERM the gateway first, then the workers; SIGKILL what outlives 15 s. Exit codes by name."""
    for name in sorted(procs, key=lambda n: n != "gateway"):
        if procs[name].poll() is None:
            procs[name].send_signal(signal.SIGTERM)
    codes = {}
    for name, proc in procs.items():
        try:
            codes[name] = proc.wait(15)
        except subprocess.TimeoutExpired:
            proc.kill()
            codes[name] = proc.wait()
    return codes


def _health(addr: str) -> int | None:
    with grpc.insecure_channel(addr) as channel:
        try:
            return health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=1.0).status
        except grpc.RpcError:
            return None


@pytest.fixture(scope="module")
def mesh(tmp_path_factory, redis_url):
    from tests.checkpoints import make_hf_checkpoint

    root = tmp_path_factory.mktemp("gateway")
    model_dir = make_hf_checkpoint("llama", root / "model", num_layers=5)
    log_dir = root / "logs"
    log_dir.mkdir()
    addresses = [f"127.0.0.1:{free_port()}" for _ in range(2)]
    port, scheduling_port, http_port = free_port(), free_port(), free_port()

    async def write_topology():
        async with await Store.connect(redis_url, DEPLOYMENT) as store:
            await store.set_topology(_topology(model_dir, addresses))

    asyncio.run(write_topology())
    common = ("--redis-url", redis_url, "--deployment", DEPLOYMENT)
    procs = {}
    try:
        for s in range(2):
            procs[f"stage{s}"] = _spawn(log_dir, f"stage{s}", "stage_worker", *common, "--chain", "0", "--stage", str(s), "--threads", "2")
        procs["gateway"] = _spawn(
            log_dir, "gateway", "gateway", *common, "--port", str(scheduling_port), "--http-port", str(http_port),
            "--log-level", "INFO",
        )
        procs["frontend"] = _spawn(
            log_dir, "frontend", "frontend", *common, "--gateway", f"127.0.0.1:{scheduling_port}", "--port", str(port)
        )
        m = Mesh(f"127.0.0.1:{port}", http_port, addresses, model_dir, procs, log_dir)
        deadline = time.monotonic() + READY_TIMEOUT_S
        while _health(m.addr) != health_pb2.HealthCheckResponse.SERVING:
            dead = {n: p.returncode for n, p in procs.items() if p.poll() is not None}
            if dead or time.monotonic() > deadline:
                pytest.fail(f"the mesh did not come up (exited: {dead}):\n{m.logs()}")
            time.sleep(0.2)
        yield m
    finally:
        codes = _stop(procs)
    assert codes.get("gateway") == 0, f"the gateway did not exit cleanly on SIGTERM: {codes}\n{m.logs()}"


def run(coro):
    return asyncio.run(coro)


async def stage_kv_used(addresses: list[str]) -> list[int]:
    used = []
    for addr in addresses:
        async with grpc.aio.insecure_channel(addr) as channel:
            info = await stage_pb2_grpc.StageStub(channel).Info(tensor_pb2.InfoRequest(), timeout=5)
            used.append(info.kv_blocks_used)
    return used


async def wait_kv_freed(addresses: list[str], timeout: float = 10.0) -> list[int]:
    deadline = time.monotonic() + timeout
    while (used := await stage_kv_used(addresses)) != [0] * len(addresses) and time.monotonic() < deadline:
        await asyncio.sleep(0.1)
    return used


# --- generation ----------------------------------------------------------------------------

LINES = [
    InputLine(None, (0, 5, 9, 17, 33), SamplingParams(max_new_tokens=12)),
    InputLine(None, tuple(range(2, 42)), SamplingParams(max_new_tokens=20, ignore_eos=True)),
    InputLine(None, (0, 7) * 9, SamplingParams(max_new_tokens=16, stop_token_ids=(3,))),
    InputLine("hello stagemesh", None, SamplingParams(max_new_tokens=10)),
    InputLine(None, (0, 11, 12), SamplingParams(max_new_tokens=24, temperature=0.9, top_k=40, top_p=0.9, seed=1234)),
    InputLine(None, tuple(range(100, 170)), SamplingParams(max_new_tokens=8, temperature=0.7, seed=7)),
]


def test_concurrent_requests_match_the_in_process_engine(mesh):
    from stagemesh.cli.inprocess import InProcessEngine
    from stagemesh.cli.remote import run_remote

    expected = run(InProcessEngine(mesh.model_dir, pp=2, num_kv_blocks=KV_BLOCKS).run(LINES))
    got = run(run_remote(mesh.addr, LINES))
    for n, (want, have) in enumerate(zip(expected, got)):
        assert have.error is None, f"line {n}: {have.error}"
        assert have.token_ids == want.token_ids, f"line {n}"
        assert have.finish_reason == want.finish_reason, f"line {n}"
    assert got[3].text == expected[3].text  # text prompt: tokenized and detokenized by the gateway


def test_min_p_from_the_sdk_the_cli_flags_and_jsonl_reaches_the_last_stage(mesh, tmp_path):
    """min_p=1 keeps only the most likely token: a hot seeded request then comes out greedy."""
    from stagemesh.cli.commands import build_parser
    from stagemesh.cli.remote import run_remote
    from stagemesh.cli.requests_io import read_inputs, sampling_from_args

    prompt, hot = [0, 11, 12, 13], dict(max_new_tokens=8, ignore_eos=True, temperature=50.0, seed=5)

    async def main():
        async with AsyncClient(mesh.addr, timeout=30) as client:
            return await asyncio.gather(client.generate(prompt, max_new_tokens=8, ignore_eos=True),
                                        client.generate(prompt, **hot), client.generate(prompt, min_p=1.0, **hot))

    greedy, hot_off, hot_min_p = run(main())
    assert hot_off.token_ids != greedy.token_ids  # hot enough to leave greedy without min_p
    assert hot_min_p.token_ids == greedy.token_ids  # the SDK keyword
    (tmp_path / "in.jsonl").write_text(json.dumps({"token_ids": prompt, "min_p": 1.0}) + "\n")
    hot_flags = ["--temperature", "50", "--seed", "5", "--max-new-tokens", "8", "--ignore-eos"]
    lines = []
    for where in (["--input", str(tmp_path / "in.jsonl")], ["--token-ids", "0,11,12,13", "--min-p", "1"]):
        args = build_parser().parse_args(["generate", "--addr", mesh.addr, *where, *hot_flags])
        lines += read_inputs(args.prompt, args.token_ids, args.input, sampling_from_args(args))
    got = run(run_remote(mesh.addr, lines))
    assert [o.token_ids for o in got] == [list(greedy.token_ids)] * 2  # the JSONL key; the flag


def test_bad_requests_are_invalid_argument_while_another_completes(mesh):
    async def main():
        async with AsyncClient(mesh.addr, timeout=30) as client:
            good = asyncio.create_task(client.generate([0, 4, 8], max_new_tokens=40, ignore_eos=True))
            bad = [
                client.generate([0, 320], max_new_tokens=4),  # vocab is 320 ids
                client.generate(token_ids=[], max_new_tokens=4),
                client.generate("", max_new_tokens=4),
                client.generate([0, 4], top_p=0.0),
                client.generate([0, 4], max_new_tokens=0),
            ]
            errors = await asyncio.gather(*bad, return_exceptions=True)
            return await good, errors

    good, errors = run(main())
    assert len(good.token_ids) == 40 and good.finish_reason == "length"
    assert all(isinstance(e, InvalidArgument) for e in errors), errors
    assert "outside the vocabulary" in errors[0].message
    assert "empty" in errors[1].message and "empty" in errors[2].message
    assert "top_p" in errors[3].message and "max_new_tokens" in errors[4].message


def test_a_running_request_id_cannot_be_reused(mesh):
    async def main():
        async with AsyncClient(mesh.addr, timeout=30) as client:
            first = client.stream([0, 1, 2], max_new_tokens=60, ignore_eos=True, request_id="same")
            async with contextlib.aclosing(first):
                await anext(first)
                with pytest.raises(InvalidArgument, match="already running"):
                    await client.generate([0, 1, 2], max_new_tokens=2, request_id="same")

    run(main())
    assert run(wait_kv_freed(mesh.stage_addresses)) == [0, 0]


def test_cancel_and_disconnect_free_the_kv_cache_on_every_stage(mesh):
    async def main():
        async with AsyncClient(mesh.addr, timeout=60) as client:
            left = client.stream([0, 3, 5, 7], max_new_tokens=200, ignore_eos=True)
            async with contextlib.aclosing(left):  # the client walks away after 3 tokens
                for _ in range(3):
                    await anext(left)
                assert all(n > 0 for n in await stage_kv_used(mesh.stage_addresses))
            cancelled = client.stream([0, 9, 9], max_new_tokens=200, ignore_eos=True, request_id="cancel-me")
            seen = []
            with pytest.raises(Cancelled):
                async for item in cancelled:
                    seen.append(item)
                    if len(seen) == 3:
                        assert await client.cancel("cancel-me") is True
            assert len(seen) < 200
            assert await client.cancel("cancel-me") is False  # gone already
            return await wait_kv_freed(mesh.stage_addresses), await client.status()

    used, status = run(main())
    assert used == [0, 0]
    assert status["chains"][0]["requests_running"] == 0


def test_the_journal_follows_a_request_in_redis_and_is_closed_at_its_end(mesh, redis_url):
    async def journal(store, rid, want_tokens=0):
        deadline = time.monotonic() + 5
        while (entry := await store.journal_get(rid)) is None or len(entry.token_ids) < want_tokens:
            assert time.monotonic() < deadline, f"journal of {rid}: {entry}"
            await asyncio.sleep(0.02)
        return entry

    async def main():
        async with await Store.connect(redis_url, DEPLOYMENT) as store, AsyncClient(mesh.addr, timeout=30) as client:
            stream = client.stream([0, 6, 6], max_new_tokens=150, ignore_eos=True, temperature=0.5, request_id="journaled")
            async with contextlib.aclosing(stream):
                seen = [(await anext(stream)).token_id for _ in range(5)]
                entry = await journal(store, "journaled", want_tokens=5)
            deadline = time.monotonic() + 5
            while await store.journal_get("journaled") is not None:
                assert time.monotonic() < deadline, "the journal entry outlived its request"
                await asyncio.sleep(0.02)
            return seen, entry

    seen, entry = run(main())
    assert entry.prompt_token_ids == (0, 6, 6) and entry.chain == 0
    assert entry.params["temperature"] == 0.5 and isinstance(entry.params["seed"], int)  # drawn by the gateway
    assert entry.token_ids[:5] == tuple(seen)


# --- status ----------------------------------------------------------------------------------


def test_status_lists_both_stage_workers_healthy(mesh, capsys):
    from stagemesh.cli.commands import main as cli_main

    async def main():
        async with AsyncClient(mesh.addr) as client:
            return await client.status()

    doc = run(main())
    assert doc["chains"][0]["id"] == 0 and doc["chains"][0]["healthy"] and doc["chains"][0]["num_stages"] == 2
    stages = sorted((w for w in doc["workers"] if w["role"] == "stage"), key=lambda w: w["stage"])
    assert [(w["chain"], w["stage"], w["layers"], w["address"]) for w in stages] == [
        (0, 0, [0, 3], mesh.stage_addresses[0]),
        (0, 1, [3, 5], mesh.stage_addresses[1]),
    ]
    assert all(w["healthy"] and w["load"]["kv_blocks_total"] == KV_BLOCKS for w in stages)
    assert doc["gateway"]["ready"] and doc["gateway"]["chains"][0]["kv_blocks_total"] == KV_BLOCKS
    assert doc["gateway"]["pid"] == mesh.procs["gateway"].pid  # `stagemesh bench --addr` reads the gateway's CPU by it

    with urllib.request.urlopen(f"http://127.0.0.1:{mesh.http_port}/api/status", timeout=5) as reply:
        assert [w["address"] for w in json.load(reply)["workers"]] == [w["address"] for w in doc["workers"]]
    with urllib.request.urlopen(f"http://127.0.0.1:{mesh.http_port}/healthz", timeout=5) as reply:
        assert reply.status == 200

    assert cli_main(["status", "--addr", mesh.addr]) == 0
    table = capsys.readouterr().out
    assert mesh.stage_addresses[0] in table and mesh.stage_addresses[1] in table and "[3, 5)" in table


# --- the chain client on its own ---------------------------------------------------------------


class FlakyStage(stage_pb2_grpc.StageServicer):
    """Answers every step with token 7 for each sampling chunk, but breaks the stream at step 1."""

    async def Forward(self, request_iterator, context):
        async for request in request_iterator:
            if request.step_id == 1:
                await context.abort(grpc.StatusCode.UNAVAILABLE, "the stage fell over")
            sampled = [s for s, flag in zip(request.seq_ids, request.sample) if flag]
            yield stage_pb2.StageResponse(step_id=request.step_id, seq_ids=sampled, tokens=[7] * len(sampled))


def _plan(step_id: int) -> StepPlan:
    return StepPlan(step_id, (SeqChunk(0, 0, (1, 2, 3), SampleSpec(seed=0, index=0)),))


def test_remote_chain_fails_pending_steps_when_the_stream_breaks_and_then_reconnects():
    async def main():
        server = grpc.aio.server()
        stage_pb2_grpc.add_StageServicer_to_server(FlakyStage(), server)
        port = server.add_insecure_port("127.0.0.1:0")
        await server.start()
        chain = RemoteChain(0, f"127.0.0.1:{port}")
        try:
            first = await chain.step(_plan(0))
            with pytest.raises(Unavailable, match=f"stage c0-s0 at 127.0.0.1:{port} is unreachable"):
                await chain.step(_plan(1))
            again = await chain.step(_plan(2))
        finally:
            await chain.close()
            await server.stop(None)
        return first, again

    first, again = run(main())
    assert first.tokens == {0: 7} and again.step_id == 2 and again.tokens == {0: 7}


def test_the_gateway_does_not_import_torch():
    code = (
        "import sys\n"
        "import gateway.main, gateway.gateway, stagemesh.cli.remote\n"
        "print(sorted(m for m in sys.modules if m == 'torch' or m.startswith('stage_worker')))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "[]"
