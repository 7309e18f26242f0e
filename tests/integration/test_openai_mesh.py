"""The OpenAI-compatible API of a real ``stagemesh up --http-port`` mesh (pp=2, two frontends
sharing the HTTP port), driven by the real ``openai`` client; the dashboard and /metrics on the
same port.

The checkpoint's context is 512 tokens and each stage holds 24 KV blocks (384 tokens), so a
request that fits the context but not the KV budget is the mesh's RESOURCE_EXHAUSTED (429).
The last test freezes a stage worker (SIGSTOP) to see 503s, and thaws it afterwards.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path

import openai
import pytest

from frontend.chat_template import ChatTemplate
from frontend.prompt_encoder import encode_chat
from stagemesh import Client
from stagemesh.deploy.launch import Mesh
from stagemesh.deploy.redis_server import free_port
from stagemesh.deploy.up_plan import UpOptions
from stagemesh.tokenizer import Tokenizer
from tests.checkpoints import make_hf_checkpoint
from tests.integration.mesh_helpers import children, stagemesh_up

pytestmark = pytest.mark.slow

MODEL = "tiny-llama"
TEMPLATE = ("{{ bos_token }}{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}{{ eos_token }}{% endfor %}"
            "{% if add_generation_prompt %}<|assistant|>{% endif %}")
KV_BLOCKS = 24
"""Per stage, of 16 tokens: 384 tokens, under the 512-token context."""
PROMPT = "The quick brown fox"
IGNORE_EOS = {"ignore_eos": True}
"""vLLM's extra field, which the openai client sends in ``extra_body``: fixed output lengths."""


@dataclass
class RunningMesh:
    addr: str
    """The gRPC client port."""
    url: str
    """The HTTP port: OpenAI API, dashboard, /metrics."""
    up_pid: int
    model: Path


@pytest.fixture(scope="module")
def mesh(tmp_path_factory):
    root = tmp_path_factory.mktemp("openai")
    model = make_hf_checkpoint("llama", root / MODEL, num_layers=2, max_position_embeddings=512)
    config = json.loads((model / "tokenizer_config.json").read_text())
    (model / "tokenizer_config.json").write_text(json.dumps({**config, "chat_template": TEMPLATE}))
    http_port = free_port()
    with stagemesh_up(model, root / "logs", "--pp", "2", "--frontends", "2", "--http-port", str(http_port),
                      "--kv-blocks", str(KV_BLOCKS), "--liveness-s", "0") as (addr, _, proc):  # frozen until SIGCONT
        yield RunningMesh(addr, f"http://127.0.0.1:{http_port}", proc.pid, model)


@pytest.fixture(scope="module")
def oa(mesh):
    with openai.OpenAI(base_url=f"{mesh.url}/v1", api_key="unused", max_retries=0, timeout=60) as client:
        yield client


def get(url: str) -> tuple[int, str, str]:
    try:
        with urllib.request.urlopen(url, timeout=10) as reply:
            return reply.status, reply.headers.get("Content-Type", ""), reply.read().decode()
    except urllib.error.HTTPError as err:
        return err.code, err.headers.get("Content-Type", ""), err.read().decode()


def streamed(chunks, *, chat: bool) -> tuple[dict[int, str], dict[int, list[str]], list]:
    """(text per choice, finish_reasons per choice, usages) of a stream."""
    texts, finishes, usages = {}, {}, []
    for chunk in chunks:
        usages.append(chunk.usage)
        for c in chunk.choices:
            texts[c.index] = texts.get(c.index, "") + ((c.delta.content or "") if chat else c.text)
            finishes.setdefault(c.index, []).extend([c.finish_reason] if c.finish_reason else [])
    return texts, finishes, usages


def gateway_chain(mesh: RunningMesh) -> dict:
    """Chain 0 of the gateway's status document, read through the HTTP port (/api/status)."""
    status, _, body = get(f"{mesh.url}/api/status")
    assert status == 200, body
    return json.loads(body)["gateway"]["chains"][0]


def test_completions_streamed_equal_whole_and_greedy_equals_the_grpc_sdk(mesh, oa):
    kw = dict(model=MODEL, prompt=[PROMPT, [5, 6, 7]], max_tokens=12, temperature=0, extra_body=IGNORE_EOS)
    whole = oa.completions.create(**kw)
    texts, finishes, usages = streamed(oa.completions.create(**kw, stream=True,
                                                             stream_options={"include_usage": True}), chat=False)
    with Client(mesh.addr, timeout=60) as sdk:
        grpc = [sdk.generate(PROMPT, max_new_tokens=12, ignore_eos=True),
                sdk.generate(token_ids=[5, 6, 7], max_new_tokens=12, ignore_eos=True)]
    tokenizer = Tokenizer.from_dir(mesh.model)
    assert [c.text for c in whole.choices] == [g.text for g in grpc] == [texts[0], texts[1]]
    assert [g.text for g in grpc] == [tokenizer.decode(list(g.token_ids)) for g in grpc]
    assert [c.finish_reason for c in whole.choices] == ["length"] * 2 and finishes == {0: ["length"], 1: ["length"]}
    prompt_tokens = len(tokenizer.encode(PROMPT)) + 3
    expected = {"prompt_tokens": prompt_tokens, "completion_tokens": 24, "total_tokens": prompt_tokens + 24}
    assert whole.usage.model_dump(exclude_none=True) == expected
    assert usages[-1].model_dump(exclude_none=True) == expected and all(u is None for u in usages[:-1])


def test_chat_streamed_equals_whole_with_the_role_first_and_one_finish(mesh, oa):
    messages = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "hello"}]
    kw = dict(model=MODEL, messages=messages, max_completion_tokens=10, temperature=0, extra_body=IGNORE_EOS)
    whole = oa.chat.completions.create(**kw)
    chunks = list(oa.chat.completions.create(**kw, stream=True, stream_options={"include_usage": True}))
    texts, finishes, usages = streamed(chunks, chat=True)
    prompt = encode_chat(Tokenizer.from_dir(mesh.model), ChatTemplate.from_dir(mesh.model).render(messages))
    assert chunks[0].choices[0].delta.role == "assistant" and chunks[0].choices[0].delta.content == ""
    assert whole.choices[0].message.content == texts[0] and finishes == {0: ["length"]}
    assert whole.usage.completion_tokens == usages[-1].completion_tokens == 10
    assert whole.usage.prompt_tokens == usages[-1].prompt_tokens == len(prompt)


def test_n_sequences_and_seeded_sampling_reproduce(mesh, oa):
    kw = dict(model=MODEL, prompt=PROMPT, max_tokens=10, temperature=1.0, seed=42, n=2, extra_body=IGNORE_EOS)
    first, again = oa.completions.create(**kw), oa.completions.create(**kw)
    shifted = oa.completions.create(**{**kw, "seed": 43, "n": 1})
    with Client(mesh.addr, timeout=60) as sdk:
        grpc = sdk.generate(PROMPT, max_new_tokens=10, temperature=1.0, seed=42, ignore_eos=True)
    texts = [c.text for c in first.choices]
    assert texts == [c.text for c in again.choices] and texts[0] != texts[1]
    assert texts[0] == grpc.text and texts[1] == shifted.choices[0].text  # sequence i samples with seed + i
    assert first.usage.completion_tokens == 20


def test_a_stop_string_cuts_the_text_where_it_starts(mesh, oa):
    kw = dict(model=MODEL, prompt=PROMPT, max_tokens=24, temperature=0, extra_body=IGNORE_EOS)
    full = oa.completions.create(**kw).choices[0].text
    start = next(i for i in range(len(full) // 3, len(full) - 2) if "\ufffd" not in full[i:i + 2])
    stop = full[start:start + 2]
    whole = oa.completions.create(**kw, stop=[stop])
    texts, finishes, _ = streamed(oa.completions.create(**kw, stop=stop, stream=True), chat=False)
    assert whole.choices[0].text == texts[0] == full[:full.index(stop)]
    assert whole.choices[0].finish_reason == "stop" and finishes == {0: ["stop"]}
    assert whole.usage.completion_tokens < 24


def test_refusals_are_openai_errors(mesh, oa):
    with pytest.raises(openai.BadRequestError, match="context is 512 tokens, but 601 were asked for"):
        oa.completions.create(model=MODEL, prompt=[5], max_tokens=600)
    with pytest.raises(openai.BadRequestError, match=r"top_logprobs=21 must be an integer in \[0, 20\]"):
        oa.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "x"}], logprobs=True,
                                   top_logprobs=21)
    with pytest.raises(openai.BadRequestError, match="temperature=-1"):
        oa.completions.create(model=MODEL, prompt="x", temperature=-1)
    with pytest.raises(openai.NotFoundError, match="does not exist"):
        oa.completions.create(model="gpt-4", prompt="x")
    with pytest.raises(openai.RateLimitError, match="KV cache"):  # fits the context, not the KV budget
        oa.completions.create(model=MODEL, prompt=[5], max_tokens=450, stream=True)


def listening(pid: int, port: int) -> bool:
    """Whether process ``pid`` holds a listening TCP socket on local ``port``."""
    inodes = {os.readlink(fd)[8:-1] for fd in Path(f"/proc/{pid}/fd").iterdir()
              if os.readlink(fd).startswith("socket:[")}
    rows = [line.split() for t in ("/proc/net/tcp", "/proc/net/tcp6") for line in Path(t).read_text().splitlines()[1:]]
    return any(int(r[1].rsplit(":", 1)[1], 16) == port and r[3] == "0A" and r[9] in inodes for r in rows)


def test_every_frontend_serves_the_shared_http_port(mesh):
    port = int(mesh.url.rsplit(":", 1)[1])
    frontends = children(mesh.up_pid, "frontend")
    assert len(frontends) == 2 and all(listening(pid, port) for pid in frontends)
    (gateway,) = children(mesh.up_pid, "gateway")
    assert not listening(gateway, port)  # the gateway's pages come through its own private port


def test_up_passes_the_served_model_name_and_keeps_the_gateways_port(tmp_path):
    # --host 0.0.0.0: the gateway's private pages (no API-key check) still listen on loopback only
    up = Mesh(UpOptions(model=tmp_path, host="0.0.0.0", http_port=8080, served_model_name="llama-3", log_dir=tmp_path,
                        frontends=1))
    args = up._http_args()
    assert args[:2] == ["--http-port", "8080"] and args[-2:] == ["--served-model-name", "llama-3"]
    assert args[2] == "--gateway-http" and args[3] == f"127.0.0.1:{up.gateway_http_port}"
    assert up._http_args() == args  # a restarted gateway comes back on the same private port


def test_models_health_version_and_the_gateways_pages_on_one_port(mesh, oa):
    assert [m.id for m in oa.models.list().data] == [MODEL]
    assert get(f"{mesh.url}/health")[0] == 200
    assert json.loads(get(f"{mesh.url}/version")[2]) == {"version": "0.1.0"}
    status, kind, page = get(f"{mesh.url}/")
    assert status == 200 and kind.startswith("text/html") and "<html" in page.lower()
    status, _, metrics = get(f"{mesh.url}/metrics")
    assert status == 200 and 'stagemesh_requests_total{chain="0",outcome="ok"}' in metrics
    assert get(f"{mesh.url}/healthz")[::2] == (200, "ok\n")
    assert get(f"{mesh.url}/static/nope.js")[0] == 404


def test_a_client_that_disconnects_mid_stream_cancels_its_request(mesh):
    before = gateway_chain(mesh)
    body = json.dumps({"model": MODEL, "prompt": [5, 6], "max_tokens": 360, "temperature": 0, "stream": True,
                       "ignore_eos": True}).encode()
    host, port = mesh.url.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port)), timeout=30) as sock:
        sock.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                     b"Content-Length: %d\r\n\r\n%s" % (len(body), body))
        got = b""
        while b"data: {" not in got:  # the first tokens came: it runs
            chunk = sock.recv(4096)
            assert chunk, got
            got += chunk
    deadline = time.monotonic() + 10
    while (chain := gateway_chain(mesh))["kv_blocks_reserved"] or chain["requests_aborted"] == before[
            "requests_aborted"]:
        assert time.monotonic() < deadline, chain
        time.sleep(0.1)
    assert chain["requests_aborted"] == before["requests_aborted"] + 1
    assert chain["tokens_emitted"] - before["tokens_emitted"] < 360  # it did not run to its end


def test_no_chain_in_service_is_503_on_health_and_requests(mesh, oa):
    stage = children(mesh.up_pid, "stage_worker")[0]
    os.kill(stage, signal.SIGSTOP)
    try:
        deadline = time.monotonic() + 20
        while (health := get(f"{mesh.url}/health"))[0] != 503:
            assert time.monotonic() < deadline, health
            time.sleep(0.2)
        assert "no chain in service" in json.loads(health[2])["error"]["message"]
        with pytest.raises(openai.InternalServerError) as refused:
            oa.completions.create(model=MODEL, prompt="x", max_tokens=2)
        assert refused.value.status_code == 503 and refused.value.body["code"] == "unavailable"
    finally:
        os.kill(stage, signal.SIGCONT)
