"""API keys at a frontend's doors, on real ports: the client port (``stagemesh.v1.Gateway`` and
KServe v2, driven by the real SDK and the KServe stubs) and the HTTP port (driven by the real
``openai`` client and by plain HTTP), over a stand-in link that records what reaches the
"gateway" (the mesh itself: tests/integration/test_api_keys_mesh.py)."""

from __future__ import annotations

import asyncio
import base64
import contextlib
import time
from functools import partial

import aiohttp
import grpc
import grpc.aio
import openai
import pytest
from aiohttp import web
from grpc_health.v1 import health_pb2, health_pb2_grpc

from frontend.auth import interceptors
from frontend.chat_template import ChatTemplate
from frontend.gateway_proxy import GatewayProxy
from frontend.http import HttpServer
from frontend.kserve import KServeServicer, with_kserve
from frontend.openai_http import OpenAIApi
from frontend.servicer import FrontendServicer
from frontend.stream import RequestStream
from stagemesh import AsyncClient, Client, Unauthenticated
from stagemesh.inference import grpc_service_pb2 as kserve_pb
from stagemesh.inference import grpc_service_pb2_grpc
from stagemesh.runtime.api_keys import ApiKeys
from stagemesh.runtime.net import free_port
from stagemesh.runtime.server import WorkerServer
from stagemesh.tokenizer import Tokenizer
from stagemesh.v1 import gateway_pb2, gateway_pb2_grpc
from tests.frontend.test_kserve_request import infer_request
from tests.frontend.tiny_model import CONFIG, write_model_dir

KEYS = ApiKeys(("key-one", "key-two"))


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    template = "{% for m in messages %}{{ m['content'] }}{% endfor %}"
    return write_model_dir(tmp_path_factory.mktemp("model"), template)


class Link:
    """The gateway as a frontend sees it: every request answers tokens 40..43 then "length";
    records every request and status call that reached it."""

    address = "gateway.test:1"

    def __init__(self):
        self.streams: list[RequestStream] = []
        self.status_calls = 0
        self.connected, self.can_serve = asyncio.Event(), True
        self.connected.set()

    def submit(self, request_id, prompt, params, resume_from=None):
        stream = RequestStream(len(self.streams) + 1, request_id, prompt, params)
        self.streams.append(stream)
        stream.tokens += [40, 41, 42, 43][:params.max_new_tokens]
        stream.finish("length")
        return stream

    def cancel(self, stream):
        pass

    async def status(self):
        self.status_calls += 1
        return gateway_pb2.StatusResponse(model="tiny")


@contextlib.asynccontextmanager
async def client_port(model_dir, keys=KEYS, credentials=None):
    """The frontend's gRPC server as ``python -m frontend`` builds it (``credentials``: its client
    port's TLS); yields (link, address)."""
    link, tokenizer = Link(), Tokenizer.from_dir(model_dir)
    server = WorkerServer("stagemesh.v1.Gateway", 0.5, interceptors=interceptors(keys))
    servicer = FrontendServicer(link, tokenizer, CONFIG)
    add = with_kserve(partial(gateway_pb2_grpc.add_GatewayServicer_to_server, servicer),
                      KServeServicer(link, tokenizer, CONFIG, "tiny"))
    address = f"127.0.0.1:{free_port()}"
    await server.start(address, add, public=True, public_credentials=credentials)
    await server.set_serving(True)
    try:
        yield link, address
    finally:
        await server.server.stop(None)


def test_grpc_calls_without_a_valid_key_are_refused_before_reaching_the_gateway(model_dir):
    async def main():
        async with client_port(model_dir) as (link, addr):
            for key in ("", "wrong-key", "key-one-and-more"):
                async with AsyncClient(addr, api_key=key, timeout=10) as client:
                    started = time.monotonic()
                    with pytest.raises(Unauthenticated) as info:
                        await client.generate(token_ids=[5, 6], max_new_tokens=4)
                    assert time.monotonic() - started < 2  # final at once: never resumed like an UNAVAILABLE
                    assert info.value.code == "UNAUTHENTICATED"
                    assert "api_key=" in info.value.message and "STAGEMESH_API_KEY" in info.value.message
                    with pytest.raises(Unauthenticated):
                        async for _ in client.stream("hello", max_new_tokens=4, request_id="r1", resume_from=2):
                            pass
                    with pytest.raises(Unauthenticated):
                        await client.status()
                    with pytest.raises(Unauthenticated):
                        await client.cancel("r1")
            assert link.streams == [] and link.status_calls == 0  # nothing reached the gateway
            for key in ("key-one", "key-two"):
                async with AsyncClient(addr, api_key=key, timeout=10) as client:
                    assert (await client.generate(token_ids=[5, 6], max_new_tokens=4)).token_ids == (40, 41, 42, 43)
                    assert [t.token_id async for t in client.stream("hi", max_new_tokens=2)] == [40, 41]
                    assert (await client.status())["model"] == "tiny"
            assert len(link.streams) == 4 and link.status_calls == 2
    asyncio.run(main())


def test_the_blocking_client_sends_the_key_from_the_environment(model_dir, monkeypatch):
    async def main():
        async with client_port(model_dir) as (link, addr):
            def call(env_key):
                monkeypatch.setenv("STAGEMESH_API_KEY", env_key)
                with Client(addr, timeout=10) as client:
                    return client.generate(token_ids=[5], max_new_tokens=3).token_ids

            assert await asyncio.to_thread(call, "key-two") == (40, 41, 42)
            with pytest.raises(Unauthenticated, match="not valid"):
                await asyncio.to_thread(call, "key-three")
            assert len(link.streams) == 1
    asyncio.run(main())


def test_a_key_that_cannot_travel_in_metadata_is_refused_by_the_sdk_itself():
    with pytest.raises(Exception, match="api_key holds ' '") as info:
        Client("127.0.0.1:1", api_key="two words")
    assert info.value.code == "INVALID_ARGUMENT"


def test_health_and_kserve_liveness_stay_open_and_kserve_takes_either_header(model_dir):
    async def main():
        async with client_port(model_dir) as (link, addr), grpc.aio.insecure_channel(addr) as channel:
            health = health_pb2_grpc.HealthStub(channel)
            reply = await health.Check(health_pb2.HealthCheckRequest(service=""), timeout=5)
            assert reply.status == health_pb2.HealthCheckResponse.SERVING
            kserve = grpc_service_pb2_grpc.GRPCInferenceServiceStub(channel)
            assert (await kserve.ServerLive(kserve_pb.ServerLiveRequest(), timeout=5)).live
            assert (await kserve.ServerReady(kserve_pb.ServerReadyRequest(), timeout=5)).ready

            request = infer_request("hello", sampling_parameters={"max_tokens": 2})
            for metadata in ((), (("x-api-key", "nope"),), (("authorization", "Basic key-one"),)):
                with pytest.raises(grpc.aio.AioRpcError) as info:
                    await kserve.ModelInfer(request, metadata=metadata, timeout=5)
                assert info.value.code() == grpc.StatusCode.UNAUTHENTICATED
                assert "authorization: Bearer <key>" in info.value.details()
                with pytest.raises(grpc.aio.AioRpcError) as info:
                    await kserve.ModelMetadata(kserve_pb.ModelMetadataRequest(name="tiny"), metadata=metadata)
                assert info.value.code() == grpc.StatusCode.UNAUTHENTICATED
                call = kserve.ModelStreamInfer(metadata=metadata, timeout=5)
                with pytest.raises(grpc.aio.AioRpcError) as info:
                    await call.write(request)  # the stream is refused as it opens: the refusal may end the write
                    await call.read()  # ... or come with the first read
                assert info.value.code() == grpc.StatusCode.UNAUTHENTICATED
            assert link.streams == []
            for metadata in ((("x-api-key", "key-one"),), (("authorization", "bearer key-two"),)):
                reply = await kserve.ModelInfer(request, metadata=metadata, timeout=5)
                assert reply.model_name == "tiny"
            assert len(link.streams) == 2
    asyncio.run(main())


def test_without_keys_every_call_is_let_in(model_dir):
    async def main():
        async with client_port(model_dir, ApiKeys()) as (_, addr), AsyncClient(addr, api_key="") as client:
            assert (await client.generate(token_ids=[5], max_new_tokens=1)).token_ids == (40,)
    asyncio.run(main())


# --- HTTP --------------------------------------------------------------------------------------


@contextlib.asynccontextmanager
async def http_port(model_dir, proxy=None):
    link = Link()
    tokenizer = Tokenizer.from_dir(model_dir)
    api = OpenAIApi(link, tokenizer, CONFIG, "tiny", ChatTemplate.from_dir(model_dir))
    server, port = HttpServer(api, proxy, grace_s=1.0, keys=KEYS), free_port()
    await server.start("127.0.0.1", port)
    try:
        yield link, f"http://127.0.0.1:{port}"
    finally:
        await server.stop()


def oa(url: str, key: str) -> openai.AsyncOpenAI:
    return openai.AsyncOpenAI(base_url=f"{url}/v1", api_key=key, max_retries=0, timeout=10)


def test_the_openai_api_wants_a_bearer_key_and_answers_401_as_openai_does(model_dir):
    async def main():
        async with http_port(model_dir) as (link, url):
            for key in ("wrong", "key-one2"):
                client = oa(url, key)
                with pytest.raises(openai.AuthenticationError) as info:
                    await client.completions.create(model="tiny", prompt="hi", max_tokens=2)
                assert info.value.status_code == 401
                error = info.value.body
                assert error["type"] == "invalid_request_error" and error["code"] == "invalid_api_key"
                assert "Authorization: Bearer <key>" in error["message"]
                with pytest.raises(openai.AuthenticationError):
                    await client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "x"}],
                                                         stream=True)
                with pytest.raises(openai.AuthenticationError):
                    await client.models.list()
            assert link.streams == []
            client = oa(url, "key-two")
            whole = await client.completions.create(model="tiny", prompt="hi", max_tokens=3)
            chunks = await client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "x"}],
                                                          max_tokens=4, stream=True)
            pieces = [c async for c in chunks]
            assert whole.choices[0].finish_reason == "length" and pieces[-1].choices[0].finish_reason == "length"
            assert [m.id async for m in client.models.list()] == ["tiny"]
            assert len(link.streams) == 2
    asyncio.run(main())


def test_probes_stay_open_and_the_gateway_pages_want_a_key_a_browser_can_give(model_dir):
    seen = []

    async def gateway_page(request):
        seen.append(dict(request.headers))
        return web.Response(text=f"page {request.path}")

    async def main():
        app = web.Application()
        for path in ("/", "/api/status", "/metrics", "/healthz"):
            app.router.add_get(path, gateway_page)
        runner = web.AppRunner(app)
        await runner.setup()
        gateway_port = free_port()
        await web.TCPSite(runner, "127.0.0.1", gateway_port).start()
        proxy = GatewayProxy(f"127.0.0.1:{gateway_port}")
        try:
            async with http_port(model_dir, proxy) as (_, url), aiohttp.ClientSession() as http:
                for path in ("/health", "/healthz", "/version"):
                    async with http.get(url + path) as reply:
                        assert reply.status == 200, path
                for path in ("/", "/api/status", "/metrics", "/static/x.js", "/nowhere"):
                    async with http.get(url + path) as reply:
                        assert reply.status == 401, path
                        assert reply.headers["WWW-Authenticate"] == 'Basic realm="stagemesh"'
                        assert (await reply.json())["error"]["code"] == "invalid_api_key"
                async with http.get(url + "/v1/models") as reply:
                    assert reply.headers["WWW-Authenticate"] == 'Bearer realm="stagemesh"'
                basic = "Basic " + base64.b64encode(b"anyone:key-two").decode()
                for auth in ("Bearer key-one", basic):
                    async with http.get(url + "/metrics", headers={"Authorization": auth, "X-Api-Key": "k"}) as reply:
                        assert reply.status == 200 and await reply.text() == "page /metrics"
            assert seen[0]["Host"] and seen[-1]["Host"]  # only the pages that were let in reached the gateway
            assert len(seen) == 3  # /healthz, then /metrics twice
            assert not any(k.lower() in ("authorization", "x-api-key") for headers in seen for k in headers)
        finally:
            await proxy.close()
            await runner.cleanup()
    asyncio.run(main())


# --- TLS on the client port ------------------------------------------------------------------


def write_ca_and_server_cert(root):
    """A CA (``ca.pem``) and a certificate it signed for localhost / 127.0.0.1 (``server.pem``, ``server.key``)."""
    import datetime
    import ipaddress

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    now = datetime.datetime.now(datetime.timezone.utc)
    valid = {"not_valid_before": now - datetime.timedelta(minutes=5),
             "not_valid_after": now + datetime.timedelta(days=1)}

    def cert(subject, issuer, key, signer, *extensions):
        builder = x509.CertificateBuilder(subject_name=subject, issuer_name=issuer, public_key=key.public_key(),
                                          serial_number=x509.random_serial_number(), **valid)
        for extension, critical in extensions:
            builder = builder.add_extension(extension, critical=critical)
        return builder.sign(signer, hashes.SHA256())

    ca_key, key = ec.generate_private_key(ec.SECP256R1()), ec.generate_private_key(ec.SECP256R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "test CA")])
    ca = cert(ca_name, ca_name, ca_key, ca_key, (x509.BasicConstraints(ca=True, path_length=None), True))
    server = cert(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "localhost")]), ca_name, key, ca_key,
                  (x509.SubjectAlternativeName([x509.DNSName("localhost"),
                                                x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]), False))
    (root / "ca.pem").write_bytes(ca.public_bytes(serialization.Encoding.PEM))
    (root / "server.pem").write_bytes(server.public_bytes(serialization.Encoding.PEM))
    (root / "server.key").write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                                        serialization.NoEncryption()))
    return root / "ca.pem", root / "server.pem", root / "server.key"


def test_a_tls_client_port_serves_the_sdk_that_trusts_its_ca_and_says_what_to_pass_otherwise(model_dir, tmp_path):
    from stagemesh import InvalidArgument, Unavailable

    ca, cert, key = write_ca_and_server_cert(tmp_path)
    credentials = grpc.ssl_server_credentials([(key.read_bytes(), cert.read_bytes())])

    async def main():
        async with client_port(model_dir, credentials=credentials) as (link, addr):
            async with AsyncClient(addr, api_key="key-one", ca_file=ca, timeout=10) as client:
                assert (await client.generate(token_ids=[5], max_new_tokens=2)).token_ids == (40, 41)
                assert (await client.status())["model"] == "tiny"
            async with AsyncClient(addr, ca_file=str(ca), api_key="nope", timeout=10) as client:
                with pytest.raises(Unauthenticated):  # TLS is no key: the key is still asked for
                    await client.generate(token_ids=[5], max_new_tokens=2)
            for kwargs in ({}, {"tls": True}):  # plaintext to a TLS port; the system's CAs do not know this one
                async with AsyncClient(addr, api_key="key-one", timeout=10, **kwargs) as client:
                    with pytest.raises(Unavailable) as info:
                        await client.generate(token_ids=[5], max_new_tokens=2)
                    assert "ca_file=" in info.value.message, info.value.message
            assert len(link.streams) == 1
        with pytest.raises(InvalidArgument, match="cannot read ca_file"):
            Client("127.0.0.1:1", ca_file=tmp_path / "missing.pem")
    asyncio.run(main())


def test_a_resumed_stream_carries_the_key_on_every_attempt():
    from tests.client.test_resume import TOKENS, BreakingFrontend

    async def main():
        frontend = BreakingFrontend(breaks=2)
        server = grpc.aio.server(interceptors=interceptors(KEYS))
        gateway_pb2_grpc.add_GatewayServicer_to_server(frontend, server)
        port = server.add_insecure_port("127.0.0.1:0")
        await server.start()
        try:
            async with AsyncClient(f"127.0.0.1:{port}", api_key="key-two", timeout=20) as client:
                items = [t.token_id async for t in client.stream("hi", max_new_tokens=20)]
        finally:
            await server.stop(None)
        assert items == TOKENS
        assert [r.resume_from for r in frontend.calls[1:]] == [3, 4]  # both resumes got past the key check
    asyncio.run(main())
