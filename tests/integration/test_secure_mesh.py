"""`stagemesh up` guards the mesh by default (issue 21): mTLS between its processes, a password on
its Redis, nothing secret on a command line or the ready line; ``--insecure`` turns both off and
says so. Real processes, sockets, redis-server and certificates."""

from __future__ import annotations

import asyncio
import socket
from pathlib import Path
from urllib.parse import urlsplit

import pytest

from stagemesh import Client, StagemeshError
from stagemesh.mesh.store import Store
from stagemesh.runtime.faults import ClearFaults, inject_fault
from stagemesh.runtime.health import serving_sync
from tests.checkpoints import make_hf_checkpoint
from tests.integration.mesh_helpers import admin_tls, children, stagemesh_up

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return make_hf_checkpoint("llama", tmp_path_factory.mktemp("llama2"), num_layers=2)


def _redis_answer(url: str, command: bytes) -> bytes:
    """What the Redis at ``url`` answers ``command`` from a client that gives no password."""
    parts = urlsplit(url)
    with socket.create_connection((parts.hostname, parts.port), timeout=5) as sock:
        sock.sendall(command + b"\r\n")
        return sock.recv(200)


def _argv(pid: int) -> bytes:
    return Path(f"/proc/{pid}/cmdline").read_bytes()


def _stage_addresses(addr: str) -> list[str]:
    with Client(addr, timeout=30) as client:
        return [w["address"] for w in client.status()["workers"] if w["role"] == "stage"]


def test_by_default_the_mesh_talks_mtls_and_its_redis_asks_for_a_password(model_dir, tmp_path):
    with stagemesh_up(model_dir, tmp_path / "logs", "--pp", "2", "--frontends", "1",
                      "--fault-injection") as (addr, redis_url, up):
        with Client(addr, timeout=60) as client:  # the client port: plaintext (API keys are its guard)
            assert len(client.generate(token_ids=[5, 6, 7], max_new_tokens=6, ignore_eos=True).token_ids) == 6
        secrets = up.secrets_dir
        password = urlsplit(redis_url).password
        assert secrets is not None and secrets.stat().st_mode & 0o777 == 0o700
        assert (secrets / "redis-url").stat().st_mode & 0o777 == 0o600 and password and len(password) >= 32

        # Redis: nothing without the password
        assert _redis_answer(redis_url, b"GET x").startswith(b"-NOAUTH")
        public = f"redis://127.0.0.1:{urlsplit(redis_url).port}/0"
        with pytest.raises(StagemeshError, match="refused the password"):
            asyncio.run(_topology(public))
        assert asyncio.run(_topology(redis_url)) is not None

        # the workers: plaintext refused, the run's admin certificate taken
        stage = _stage_addresses(addr)[1]
        with pytest.raises(StagemeshError) as plain:
            inject_fault(stage, ClearFaults())
        assert plain.value.code == "UNAVAILABLE"
        assert not serving_sync(stage)
        assert serving_sync(stage, tls=admin_tls(up))
        assert inject_fault(stage, ClearFaults(), tls=admin_tls(up)) == "stage-c0-s1: cleared the faults not used up yet"

        # no secret on any command line or on the ready line
        pids = [up.pid] + [pid for module in ("stage_worker", "gateway", "frontend") for pid in children(up.pid, module)]
        assert len(pids) == 5
        assert not [pid for pid in pids if password.encode() in _argv(pid) or b"--redis-url" in _argv(pid)]
        line = up.ready_line
        assert password not in line and f"secrets {secrets}" in line and "INSECURE" not in line
    assert not secrets.exists()  # the run's secrets leave with it


async def _topology(url: str):
    async with await Store.connect(url) as store:
        return await store.get_topology()


def test_insecure_turns_it_off_and_says_so(model_dir, tmp_path):
    with stagemesh_up(model_dir, tmp_path / "logs", "--frontends", "1", "--insecure") as (addr, redis_url, up):
        assert "INSECURE: no TLS between the mesh's processes, Redis without a password (--insecure)" in up.ready_line
        assert up.secrets_dir is None and admin_tls(up) is None
        with Client(addr, timeout=60) as client:
            assert len(client.generate(token_ids=[5, 6, 7], max_new_tokens=4, ignore_eos=True).token_ids) == 4
        assert serving_sync(_stage_addresses(addr)[0])  # plaintext
        assert _redis_answer(redis_url, b"PING").startswith(b"+PONG")
