"""Expert parallelism end to end: `stagemesh up --pp P --ep E [--expert-replicas R]` on CPU.

Real processes: stage workers route each MoE layer's rows to expert worker processes
(`python -m expert_worker`) over gRPC streams; the gateway owns the placement in Redis.
"""

from __future__ import annotations

import asyncio
import random
import subprocess
import time

import pytest

from stagemesh import AsyncClient, Client
from stagemesh.config import ModelConfig
from stagemesh.mesh.store import Store
from tests.checkpoints import hf_model, make_hf_checkpoint, teacher_forcing_check
from tests.integration.mesh_helpers import generate_all, stagemesh_up, worker_figures

pytestmark = pytest.mark.slow

FAMILIES = ("mixtral", "qwen2_moe")
LAYOUTS = [(f, ep, pp) for f in FAMILIES for ep in (2, 3, 4) for pp in (1, 2) if (f == FAMILIES[0]) == (ep + pp) % 2]
"""(family, ep, pp): each ep with each pp once, and each family with each ep once (the other
half of the full grid adds no new case, and ~10 s of CI each); Mixtral (all layers MoE) and
Qwen2-MoE (shared expert, layer 1 dense), 4 experts each, top-2: ep=3 spreads them unevenly,
ep=4 one each. ``test_tp_mesh`` adds pp x tp=2 x ep=2 for both families."""
FLOAT32 = 4


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    root = tmp_path_factory.mktemp("ep")
    return {f: make_hf_checkpoint(f, root / f, num_layers=4) for f in FAMILIES}


@pytest.fixture(scope="module")
def references(checkpoints):
    return {f: hf_model(d) for f, d in checkpoints.items()}


def _requests(n: int, seed: int, max_new: int = 8) -> list[dict]:
    rng = random.Random(seed)
    return [
        {"token_ids": [rng.randrange(2, 320) for _ in range(rng.randint(1, 24))],
         "max_new_tokens": rng.randint(3, max_new)}
        for _ in range(n)
    ]


def _settled_figures(
    redis_url: str, stages: list[str], experts: list[str], tokens: int, timeout_s: float = 8.0
) -> dict[str, dict]:
    """The workers' figures once every stage has run all ``tokens`` and every worker has beaten since."""
    deadline = time.monotonic() + timeout_s
    while True:
        figures = asyncio.run(worker_figures(redis_url))
        if all(w in figures for w in stages + experts):
            sent = sum(figures[s].get("expert_rows_sent", 0) for s in stages)
            run = sum(sum(figures[e].get("expert_tokens", {}).values()) for e in experts)
            if sent == run and all(figures[s].get("tokens_processed") == tokens for s in stages):
                return figures
        assert time.monotonic() < deadline, f"the figures never settled: {figures}"
        time.sleep(0.3)


@pytest.mark.parametrize(("family", "ep", "pp"), LAYOUTS, ids=[f"{f}-ep{e}-pp{p}" for f, e, p in LAYOUTS])
def test_ep_mesh_gives_transformers_greedy_tokens_and_sends_experts_only_their_rows(
    checkpoints, references, tmp_path, family, ep, pp
):
    model_dir = checkpoints[family]
    config = ModelConfig.from_dir(model_dir)
    requests = _requests(5, seed=ep * 10 + pp)
    with stagemesh_up(model_dir, tmp_path / "logs", "--pp", str(pp), "--ep", str(ep)) as (addr, redis_url, _):
        results = asyncio.run(generate_all(addr, requests))
        stage_ids = [f"stage-c0-s{s}" for s in range(pp)]
        expert_ids = [f"expert-c0-e{w}" for w in range(ep)]
        # every stage runs each prompt token and each generated token but the last, once
        tokens = sum(len(req["token_ids"]) + len(res.token_ids) - 1 for req, res in zip(requests, results))
        figures = _settled_figures(redis_url, stage_ids, expert_ids, tokens)
        status = Client(addr).status()  # after the figures settled: the per-expert load is all there

    for n, (req, res) in enumerate(zip(requests, results)):
        assert len(res.token_ids) >= 1
        teacher_forcing_check(references[family], req["token_ids"], res.token_ids, request=f"{family} ep={ep} pp={pp} #{n}")

    experts = [w for w in status["workers"] if w["role"] == "expert"]
    assert len(experts) == ep and all(w["healthy"] and w["chain"] == 0 for w in experts), experts
    for layer in config.moe_layers:  # every expert of every MoE layer is held by exactly one worker
        held = sorted(e for w in experts for e in w["experts"].get(str(layer), []))
        assert held == list(range(config.num_experts)), (layer, [w["experts"] for w in experts])
    expert_rows = sum(sum(w["load"].get("expert_tokens", {}).values()) for w in experts)
    assert expert_rows == sum(figures[s]["expert_rows_sent"] for s in stage_ids) > 0

    # No dense broadcast: each stage sent each MoE layer's routed rows (tokens x top_k) once, nothing more.
    for stage in (w for w in status["workers"] if w["role"] == "stage"):
        start, end = stage["layers"]
        moe_layers = sum(1 for layer in range(start, end) if config.is_moe_layer(layer))
        f = figures[f"stage-c0-s{stage['stage']}"]
        rows = f["tokens_processed"] * moe_layers * config.num_experts_per_tok
        assert f["expert_rows_sent"] == rows, (f, moe_layers)
        assert f["expert_bytes_sent"] == rows * config.hidden_size * FLOAT32, f
        assert f["expert_retries"] == 0


async def _generate_while_killing(addr: str, requests: list[dict], kill) -> list:
    """Every request at once; ``kill()`` once the first tokens of the first one have streamed."""
    async with AsyncClient(addr, timeout=120) as client:
        rest = [asyncio.ensure_future(client.generate(**r)) for r in requests[1:]]
        first = []
        async for item in client.stream(**requests[0]):
            if item.token_id is not None:
                first.append(item.token_id)
            if len(first) == 3:
                kill()
        return [first] + [list(r.token_ids) for r in await asyncio.gather(*rest)]


def test_sigkill_of_an_expert_worker_with_replicas_loses_no_request_and_changes_no_token(checkpoints, tmp_path):
    requests = [{**r, "max_new_tokens": 40, "ignore_eos": True} for r in _requests(5, seed=7)]
    args = ("--pp", "2", "--ep", "2", "--expert-replicas", "2", "--no-restart")  # it stays dead: the mesh goes on without it
    with stagemesh_up(checkpoints["mixtral"], tmp_path / "logs", *args) as (addr, redis_url, up):
        undisturbed = [list(r.token_ids) for r in asyncio.run(generate_all(addr, requests))]
        with Client(addr) as client:
            victim = next(w for w in client.status()["workers"] if w["role"] == "expert")  # expert-c0-e0
        t_kill = []

        def kill() -> None:
            t_kill.append(time.monotonic())
            subprocess.run(["kill", "-9", str(victim["pid"])], check=True)

        disturbed = asyncio.run(_generate_while_killing(addr, requests, kill))
        assert t_kill, "the kill never happened"
        with Client(addr) as client:
            deadline = time.monotonic() + 10
            while next(w for w in client.status()["workers"] if w["pid"] == victim["pid"])["healthy"]:
                assert time.monotonic() < deadline, "the killed expert worker still reads healthy"
                time.sleep(0.2)
            after = asyncio.run(generate_all(addr, requests[:2]))  # the mesh goes on without it
        assert up.poll() is None, "stagemesh up must outlive an expert worker that has replicas"
        placement = asyncio.run(_placement(redis_url))

    assert disturbed == undisturbed
    assert [list(r.token_ids) for r in after] == undisturbed[:2]
    assert [(r.worker_id, r.live) for r in placement] == [("expert-c0-e0", False), ("expert-c0-e1", True)]


async def _placement(redis_url: str):
    async with await Store.connect(redis_url) as store:
        return await store.get_placement(0)


def test_up_refuses_ep_on_a_dense_model_and_too_many_replicas(tmp_path):
    from tests.cli_helpers import run_cli

    llama = make_hf_checkpoint("llama", tmp_path / "llama", num_layers=2)
    proc = run_cli("up", "--model", str(llama), "--ep", "2", "--log-dir", str(tmp_path / "l1"), timeout=60)
    assert proc.returncode == 1 and "ep=2 needs a Mixture-of-Experts model" in proc.stderr, proc.stderr
    mixtral = make_hf_checkpoint("mixtral", tmp_path / "mixtral", num_layers=2)
    proc = run_cli("up", "--model", str(mixtral), "--ep", "2", "--expert-replicas", "3", "--log-dir", str(tmp_path / "l2"))
    assert proc.returncode == 1 and "expert replicas=3 must be between 1 and ep=2" in proc.stderr, proc.stderr
