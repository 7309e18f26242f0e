"""The pipeline mesh end to end: `stagemesh up`, the SDK and `stagemesh generate --addr`.

Real processes (redis-server, stage workers, gateway), real sockets, real Redis.
"""

from __future__ import annotations

import asyncio
import os
import random
import signal
import time

import pytest

from stagemesh import AsyncClient, Client, InvalidArgument
from stagemesh.runtime import cpus
from tests.checkpoints import hf_model, make_hf_checkpoint, teacher_forcing_check
from tests.cli_helpers import generate_json, write_jsonl
from tests.integration.mesh_helpers import expected_cores, stagemesh_up, still_alive, worker_figures

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    # 5 layers: pp=2 and pp=3 split unevenly
    return make_hf_checkpoint("llama", tmp_path_factory.mktemp("llama5"), num_layers=5)


@pytest.fixture(scope="module")
def reference(model_dir):
    return hf_model(model_dir)


def _requests(n: int, seed: int) -> list[dict]:
    rng = random.Random(seed)
    return [
        {"token_ids": [rng.randrange(2, 320) for _ in range(rng.randint(1, 40))], "max_new_tokens": rng.randint(1, 24)}
        for _ in range(n)
    ]


@pytest.mark.parametrize(("pp", "micro_batches"), [(1, None), (2, None), (3, None), (3, 1)],
                         ids=["1", "2", "3", "3-one-micro-batch"])
def test_mesh_gives_transformers_greedy_tokens(model_dir, reference, tmp_path, pp, micro_batches):
    requests = _requests(10, seed=pp)
    inputs = write_jsonl(tmp_path / "in.jsonl", requests)
    more = ("--micro-batches", str(micro_batches)) if micro_batches else ()
    with stagemesh_up(model_dir, tmp_path / "logs", "--pp", str(pp), *more) as (addr, _, up):
        results = generate_json("--addr", addr, "--input", str(inputs))
        status = Client(addr).status()
    stages = sorted((w["stage"], tuple(w["layers"])) for w in status["workers"] if w["role"] == "stage")
    assert len(stages) == pp and stages[0][1][0] == 0 and stages[-1][1][1] == 5
    # unless told, one micro-batch per stage when each stage has cores of its own, else as many as compute at once
    fit = micro_batches or cpus.micro_batches(len(cpus.available()), ranks=pp, stages=pp, tp=1, chains=1)
    assert status["gateway"]["chains"][0]["micro_batches"] == fit
    why = "--micro-batches" if micro_batches else "its stages share too few cores"
    said = f", {fit} micro-batch(es) in flight a chain ({why}" in up.ready_line
    assert said == (fit < pp), up.ready_line
    for n, (req, res) in enumerate(zip(requests, results)):
        assert res["finish_reason"] in ("length", "stop")
        teacher_forcing_check(reference, req["token_ids"], res["token_ids"], request=f"pp={pp} request {n}")


def _overlap(a: list[list[float]], b: list[list[float]]) -> float:
    total = 0.0
    for s0, e0 in a:
        for s1, e1 in b:
            total += max(0.0, min(e0, e1) - max(s0, s1))
    return total


def _busy_intervals(redis_url: str, since: float, stages: int, timeout_s: float = 15.0) -> dict[str, list]:
    """Each stage's busy intervals from a heartbeat that went out after Unix time ``since`` (each stage
    beats every ~1 s on its own clock; a loaded machine delays a beat), so they cover every step before."""
    deadline = time.monotonic() + timeout_s
    while True:
        metrics = asyncio.run(worker_figures(redis_url))
        beats = {f"stage-c0-s{s}": metrics.get(f"stage-c0-s{s}", {}).get("time") for s in range(stages)}
        if all(t is not None and t > since for t in beats.values()):
            return {wid: m.get("busy_intervals", []) for wid, m in metrics.items() if wid.startswith("stage-")}
        assert time.monotonic() < deadline, f"no heartbeat after the traffic from every stage: {beats} <= {since}"
        time.sleep(0.2)


def test_micro_batches_overlap_across_stages_and_bad_requests_are_refused(tmp_path):
    # Wide enough that a step is compute, not messaging: overlap shows only when stages compute.
    model_dir = make_hf_checkpoint("llama", tmp_path / "wide", num_layers=4, hidden_size=256, intermediate_size=1024)
    with stagemesh_up(model_dir, tmp_path / "logs", "--pp", "2") as (addr, redis_url, _):

        async def load():
            async with AsyncClient(addr) as client:
                good = [client.generate(token_ids=list(range(3, 3 + n)), max_new_tokens=32, ignore_eos=True) for n in range(4, 20)]
                bad = client.generate(token_ids=[5, 100000], max_new_tokens=4)
                return await asyncio.gather(*good, bad, return_exceptions=True)

        results = asyncio.run(load())
        *good, bad = results
        assert isinstance(bad, InvalidArgument) and "100000" in bad.message
        assert all(len(r.token_ids) == 32 for r in good), [r for r in good if not hasattr(r, "token_ids")]
        intervals = _busy_intervals(redis_url, since=time.time(), stages=2)

    first, second = intervals["stage-c0-s0"], intervals["stage-c0-s1"]
    busy_second = sum(e - s for s, e in second)
    assert first and second
    # with two micro-batches in flight, stage 0 computes one while stage 1 computes the other
    assert _overlap(first, second) > 0.2 * busy_second, (_overlap(first, second), busy_second)


def test_cancel_frees_kv_on_every_stage_and_sigterm_leaves_nothing(model_dir, tmp_path):
    with stagemesh_up(model_dir, tmp_path / "logs", "--pp", "2") as (addr, _, up):
        with Client(addr) as client:
            stream = client.stream(token_ids=list(range(3, 30)), max_new_tokens=200, ignore_eos=True)
            got = [next(stream) for _ in range(3)]
            stream.close()  # the client goes away mid-generation
            assert len(got) == 3
            deadline = time.monotonic() + 10
            while True:
                status = client.status()
                stages = [w for w in status["workers"] if w["role"] == "stage"]
                used = [w["load"]["kv_blocks_used"] for w in stages]
                if all(u == 0 for u in used) or time.monotonic() > deadline:
                    break
                time.sleep(0.3)
            assert used == [0, 0], status
        pids = [w["pid"] for w in status["workers"]]
        up.send_signal(signal.SIGTERM)
        assert up.wait(30) == 0
    assert still_alive(pids) == []


@pytest.mark.parametrize("bound", [True, False], ids=["bound", "no-cpu-bind"])
def test_each_stage_worker_runs_on_cores_of_its_own_unless_told_not_to(model_dir, tmp_path, bound):
    args = ("--pp", "2") if bound else ("--pp", "2", "--no-cpu-bind")
    with stagemesh_up(model_dir, tmp_path / "logs", *args) as (addr, _, _):
        with Client(addr) as client:
            assert len(client.generate(token_ids=[5, 6, 7], max_new_tokens=3, ignore_eos=True).token_ids) == 3
            stages = sorted((w for w in client.status()["workers"] if w["role"] == "stage"), key=lambda w: w["stage"])
            cores = [sorted(os.sched_getaffinity(w["pid"])) for w in stages]
    assert cores == expected_cores(2, bound)
