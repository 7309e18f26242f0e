"""API keys on a real ``stagemesh up --api-key-file ... --http-port --tls-cert ... --tls-key ...`` mesh
(its client ports serve TLS, as a mesh with keys should off loopback): the SDK (``ca_file``), the
CLI (``--ca-file``), the ``openai`` client and the KServe stubs without a key, with a wrong one and
with a right one; what was refused never reached the gateway (its served counts stay 0); the keys
are on no process's command line; KServe's liveness stays open for probes."""

from __future__ import annotations

import asyncio
import json
import os
import ssl
import subprocess
from pathlib import Path

import grpc
import openai
import pytest

from stagemesh import AsyncClient, Client, Unauthenticated
from stagemesh.deploy.redis_server import free_port
from stagemesh.inference import grpc_service_pb2 as kserve_pb
from stagemesh.inference import grpc_service_pb2_grpc
from tests.checkpoints import make_hf_checkpoint
from tests.cli_helpers import STAGEMESH, run_cli
from tests.frontend.test_auth import write_ca_and_server_cert
from tests.frontend.test_kserve_request import infer_request
from tests.integration.mesh_helpers import stagemesh_up

pytestmark = pytest.mark.slow

KEYS = ("mesh-key-one", "mesh-key-two")


@pytest.fixture(scope="module")
def mesh(tmp_path_factory):
    root = tmp_path_factory.mktemp("keys")
    model = make_hf_checkpoint("llama", root / "tiny-llama", num_layers=2)
    keyfile = root / "api-keys"
    keyfile.write_text("# the mesh's clients\n" + "\n".join(KEYS) + "\n")
    keyfile.chmod(0o600)
    ca, cert, key = write_ca_and_server_cert(root)
    http = free_port()
    with stagemesh_up(model, root / "logs", "--api-key-file", str(keyfile), "--http-port", str(http),
                      "--frontends", "1", "--tls-cert", str(cert), "--tls-key", str(key)) as (addr, _, proc):
        yield addr, f"https://127.0.0.1:{http}", proc, ca


def served(addr: str, ca: Path) -> int:
    with Client(addr, api_key=KEYS[0], ca_file=ca, timeout=30) as client:
        return sum(c["requests_served"] + c["requests_running"] + c["requests_waiting"]
                   for c in client.status()["chains"])


def test_nothing_without_a_valid_key_reaches_the_gateway_and_a_right_key_is_served(mesh):
    addr, url, _, ca = mesh

    async def refused():
        for key in ("", "mesh-key-three"):
            async with AsyncClient(addr, api_key=key, ca_file=ca, timeout=30) as client:
                with pytest.raises(Unauthenticated, match="api_key"):
                    await client.generate(token_ids=[5, 6, 7], max_new_tokens=4)
                with pytest.raises(Unauthenticated):
                    async for _ in client.stream("hello", max_new_tokens=4):
                        pass
                with pytest.raises(Unauthenticated):
                    await client.status()

    asyncio.run(refused())
    oa = openai.OpenAI(base_url=f"{url}/v1", api_key="mesh-key-three", max_retries=0,
                       http_client=openai.DefaultHttpxClient(verify=ssl.create_default_context(cafile=ca), timeout=30))
    with pytest.raises(openai.AuthenticationError):
        oa.completions.create(model="tiny-llama", prompt="hello", max_tokens=4)
    credentials = grpc.ssl_channel_credentials(ca.read_bytes())
    with grpc.secure_channel(addr, credentials) as channel:
        kserve = grpc_service_pb2_grpc.GRPCInferenceServiceStub(channel)
        with pytest.raises(grpc.RpcError) as info:
            kserve.ModelInfer(infer_request("hello", model="tiny-llama"), metadata=(("x-api-key", "nope"),), timeout=30)
        assert info.value.code() == grpc.StatusCode.UNAUTHENTICATED
        assert kserve.ServerLive(kserve_pb.ServerLiveRequest(), timeout=30).live  # a probe needs no key
    assert served(addr, ca) == 0

    with Client(addr, api_key=KEYS[1], ca_file=ca, timeout=60) as client:
        assert len(client.generate(token_ids=[5, 6, 7], max_new_tokens=4).token_ids) == 4
        assert len([t for t in client.stream("hello", max_new_tokens=3) if t.token_id is not None]) == 3
    oa = openai.OpenAI(base_url=f"{url}/v1", api_key=KEYS[0], max_retries=0,
                       http_client=openai.DefaultHttpxClient(verify=ssl.create_default_context(cafile=ca), timeout=60))
    assert oa.completions.create(model="tiny-llama", prompt="hello", max_tokens=2).usage.completion_tokens == 2
    chunks = list(oa.completions.create(model="tiny-llama", prompt="hello", max_tokens=2, stream=True))
    assert chunks[-1].choices[0].finish_reason == "length"
    with grpc.secure_channel(addr, credentials) as channel:
        kserve = grpc_service_pb2_grpc.GRPCInferenceServiceStub(channel)
        reply = kserve.ModelInfer(infer_request("hello", model="tiny-llama", sampling_parameters={"max_tokens": 2}),
                                  metadata=(("x-api-key", KEYS[0]),), timeout=60)
        assert reply.model_name == "tiny-llama"
    assert served(addr, ca) == 5


def test_the_cli_takes_the_key_from_a_flag_or_the_environment(mesh):
    addr, ca = mesh[0], str(mesh[3])
    no_tls = run_cli("generate", "--addr", addr, "--token-ids", "5,6", "--api-key", KEYS[1])
    assert no_tls.returncode == 1 and "ca_file=" in no_tls.stderr, no_tls.stderr
    no_key = run_cli("generate", "--addr", addr, "--token-ids", "5,6", "--max-new-tokens", "2", "--json",
                     "--ca-file", ca)
    assert no_key.returncode == 1 and "UNAUTHENTICATED" in no_key.stdout + no_key.stderr
    out = run_cli("generate", "--addr", addr, "--token-ids", "5,6", "--max-new-tokens", "2", "--json",
                  "--api-key", KEYS[1], "--ca-file", ca)
    assert out.returncode == 0, out.stderr
    assert len(json.loads(out.stdout)["token_ids"]) == 2
    status = run_cli("status", "--addr", addr, "--json", "--api-key", "wrong", "--ca-file", ca)
    assert status.returncode == 1 and "UNAUTHENTICATED" in status.stderr and "api_key" in status.stderr
    env = {**os.environ, "STAGEMESH_API_KEY": KEYS[0]}
    status = subprocess.run([*STAGEMESH, "status", "--addr", addr, "--json", "--ca-file", ca], env=env,
                            capture_output=True, text=True, timeout=120, stdin=subprocess.DEVNULL, check=False)
    assert status.returncode == 0, status.stderr
    assert json.loads(status.stdout)["chains"]


def test_the_keys_are_on_no_command_line_and_their_file_is_the_owners_alone(mesh):
    up = mesh[2]
    procs = [up.pid, *_descendants(up.pid)]
    cmdlines = {pid: Path(f"/proc/{pid}/cmdline").read_bytes() for pid in procs if Path(f"/proc/{pid}").exists()}
    assert len(cmdlines) > 3
    assert not [pid for pid, argv in cmdlines.items() if any(k.encode() in argv for k in KEYS)]
    frontend = next(argv for argv in cmdlines.values() if b"frontend" in argv.split(b"\0"))
    argv = frontend.split(b"\0")
    keyfile = Path(argv[argv.index(b"--api-key-file") + 1].decode())
    assert keyfile.stat().st_mode & 0o777 == 0o600 and keyfile.parent.stat().st_mode & 0o077 == 0
    assert keyfile.read_text().split() == list(KEYS)


def _descendants(pid: int) -> list[int]:
    found, frontier = [], [pid]
    while frontier:
        parent = frontier.pop()
        for proc in Path("/proc").glob("[0-9]*"):
            try:
                ppid = int((proc / "stat").read_text().rpartition(")")[2].split()[1])
            except (OSError, ValueError, IndexError):
                continue
            if ppid == parent:
                found.append(int(proc.name))
                frontier.append(int(proc.name))
    return found
