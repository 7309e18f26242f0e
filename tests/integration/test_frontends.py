"""The mesh's front door: several frontend processes on one client port, the gateway behind them.

Real `stagemesh up`, real frontend/gateway/stage processes, real sockets and Redis.
"""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import time

import pytest

from stagemesh import AsyncClient, Client, InvalidArgument
from tests.checkpoints import hf_model, make_hf_checkpoint, teacher_forcing_check
from tests.integration.mesh_helpers import children as _children
from tests.integration.mesh_helpers import pid_alive, stagemesh_up

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return make_hf_checkpoint("llama", tmp_path_factory.mktemp("llama4"), num_layers=4)


def test_two_frontends_share_the_client_port_and_give_transformers_tokens(model_dir, tmp_path):
    reference = hf_model(model_dir)
    prompts = [[(7 * i + j) % 300 + 2 for j in range(3 + i % 5)] for i in range(16)]

    async def run_all(addr):
        # one client per request: separate connections, which the kernel spreads over the frontends
        async def one(p):
            async with AsyncClient(addr, timeout=120) as client:
                return await client.generate(token_ids=p, max_new_tokens=12)

        return await asyncio.gather(*(one(p) for p in prompts))

    with stagemesh_up(model_dir, tmp_path / "logs", "--pp", "2", "--frontends", "2") as (addr, _, proc):
        frontends = _children(proc.pid, "frontend")
        with Client(addr, timeout=30) as client:
            at_ready = client.status()["gateway"]["frontends"]
        results = asyncio.run(run_all(addr))
        with Client(addr, timeout=30) as client:
            attached = client.status()["gateway"]["frontends"]
    assert len(frontends) == 2, frontends
    # "ready" waits for both; the status names them with the pids the launcher started (the bench
    # reads their CPU by them) and the requests each took: 16 connections hashed over two listeners
    # all land on one with odds 2 in 65,536
    assert [f["name"] for f in at_ready] == ["frontend-0", "frontend-1"], at_ready
    assert [f["name"] for f in attached] == ["frontend-0", "frontend-1"], attached
    assert {f["pid"] for f in attached} == set(frontends) and all(f["requests"] == 0 for f in attached), attached
    taken = [f["taken"] - f0["taken"] for f, f0 in zip(attached, at_ready)]
    assert sum(taken) == 16 and all(taken), (at_ready, attached)
    for n, (prompt, res) in enumerate(zip(prompts, results)):
        assert len(res.token_ids) == 12 and res.finish_reason == "length"
        teacher_forcing_check(reference, prompt, list(res.token_ids), request=f"request {n}")


def test_a_second_mesh_cannot_take_a_port_this_mesh_serves(model_dir, tmp_path):
    with stagemesh_up(model_dir, tmp_path / "logs") as (addr, _, _):
        port = addr.rpartition(":")[2]
        second = subprocess.run(
            [sys.executable, "-m", "stagemesh.cli", "up", "--model", str(model_dir), "--port", port,
             "--log-dir", str(tmp_path / "second")],
            capture_output=True, text=True, timeout=120, stdin=subprocess.DEVNULL,
        )
        with Client(addr, timeout=60) as client:
            still = client.generate(token_ids=[5, 6, 7], max_new_tokens=4)
    assert second.returncode == 1, second.stdout + second.stderr
    assert f"port {port} on 127.0.0.1 is already in use" in second.stderr
    assert "ready" not in second.stdout
    assert not list((tmp_path / "second").glob("*.log"))  # nothing was started
    assert len(still.token_ids) == 4


def test_a_killed_frontend_is_restarted_and_the_port_keeps_serving(model_dir, tmp_path):
    with stagemesh_up(model_dir, tmp_path / "logs", "--frontends", "1") as (addr, _, proc):
        (old,) = _children(proc.pid, "frontend")
        os.kill(old, signal.SIGKILL)
        deadline = time.monotonic() + 60
        while not (new := [p for p in _children(proc.pid, "frontend") if p != old]) and time.monotonic() < deadline:
            time.sleep(0.2)
        assert new, "the launcher did not restart the frontend"
        while True:  # clients retry while the new frontend connects to the gateway
            try:
                with Client(addr, timeout=30) as client:
                    result = client.generate(token_ids=[3, 4], max_new_tokens=5)
                break
            except Exception:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.2)
        assert proc.poll() is None and not pid_alive(old)
    assert len(result.token_ids) == 5


def test_a_prompt_longer_than_the_context_is_refused_by_the_frontend(model_dir, tmp_path):
    with stagemesh_up(model_dir, tmp_path / "logs") as (addr, _, _):
        with Client(addr, timeout=60) as client:
            with pytest.raises(InvalidArgument, match="context"):
                client.generate("word " * 300_000, max_new_tokens=4)
            ok = client.generate("word " * 10, max_new_tokens=4)
    assert len(ok.token_ids) == 4
