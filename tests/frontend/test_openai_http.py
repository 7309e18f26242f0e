"""The OpenAI HTTP API on a real port, driven by the real ``openai`` client, over a stand-in link
whose "gateway" is a script per request (the mesh itself: tests/integration/test_openai_mesh.py)."""

from __future__ import annotations

import asyncio
import contextlib
import json

import aiohttp
import openai
import pytest
from aiohttp import web

from frontend.chat_template import ChatTemplate
from frontend.gateway_proxy import GatewayProxy
from frontend.http import HttpServer
from frontend.openai_http import OpenAIApi
from frontend.prompt_encoder import encode_chat
from frontend.stream import RequestStream
from stagemesh.errors import InvalidArgument, ResourceExhausted, Unavailable
from stagemesh.runtime.net import free_port
from stagemesh.tokenizer import Tokenizer
from tests.frontend.tiny_model import CONFIG, write_model_dir
from tests.waiting import eventually

TEXT = "Hello there, ünïcode ✓ and then STOP and the rest."
TEMPLATE = "{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}{% endfor %}<|assistant|>"


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return write_model_dir(tmp_path_factory.mktemp("model"), TEMPLATE)


class Link:
    """Each submitted request is played by ``script(link, stream)``; records cancels."""

    address = "gateway.test:1"

    def __init__(self, script):
        self.script, self.streams, self.cancelled = script, [], []
        self.connected, self.can_serve = asyncio.Event(), True
        self.connected.set()
        self._tasks = []

    def submit(self, request_id, prompt, params, resume_from=None):
        stream = RequestStream(len(self.streams) + 1, request_id, prompt, params)
        self.streams.append(stream)
        self._tasks.append(asyncio.get_running_loop().create_task(self.script(self, stream)))
        return stream

    def cancel(self, stream):
        self.cancelled.append(stream.handle)


def speaking(text: str, *, then=None, pause_s: float = 0.0):
    """A script: ``text``'s tokens two at a time, then "length" (or the error ``then``)."""
    async def script(link, stream):
        tokens = list(encode_chat(link.tokenizer, text))
        for i in range(0, len(tokens), 2):
            stream.tokens += tokens[i:i + 2]
            stream.wake.set()
            await asyncio.sleep(pause_s)
        stream.fail(then) if then is not None else stream.finish("length")
    return script


def refusing(err):
    async def script(link, stream):
        await asyncio.sleep(0.01)
        stream.fail(err)
    return script


def one_token_then_silence(link, stream):
    async def script():
        stream.tokens.append(72)
        stream.wake.set()
        await asyncio.Event().wait()
    return script()


@contextlib.asynccontextmanager
async def serving(model_dir, script, *, proxy: GatewayProxy | None = None, template=True, tokenizer=True):
    link = Link(script)
    link.tokenizer = Tokenizer.from_dir(model_dir)
    chat = ChatTemplate.from_dir(model_dir) if template else ChatTemplate(None, problem="no chat template here")
    api = OpenAIApi(link, link.tokenizer if tokenizer else None, CONFIG, "tiny", chat)
    server, port = HttpServer(api, proxy, grace_s=1.0), free_port()
    await server.start("127.0.0.1", port)
    try:
        yield link, f"http://127.0.0.1:{port}"
    finally:
        await server.stop()


def client(url: str) -> openai.AsyncOpenAI:
    return openai.AsyncOpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0, timeout=10)


def test_streamed_text_and_usage_equal_the_whole_answer(model_dir):
    async def main():
        async with serving(model_dir, speaking(TEXT)) as (link, url):
            oa = client(url)
            whole = await oa.completions.create(model="tiny", prompt=["a b", "c"], n=2, max_tokens=40)
            pieces, finishes, usages = {}, {}, []
            stream = await oa.completions.create(model="tiny", prompt=["a b", "c"], n=2, max_tokens=40, stream=True,
                                                 stream_options={"include_usage": True})
            async for chunk in stream:
                usages.append(chunk.usage)
                for c in chunk.choices:
                    pieces[c.index] = pieces.get(c.index, "") + c.text
                    finishes.setdefault(c.index, []).append(c.finish_reason)
            prompts = [len(link.tokenizer.encode(p)) for p in ("a b", "c")]
            return whole, pieces, finishes, usages, prompts, len(encode_chat(link.tokenizer, TEXT))

    whole, pieces, finishes, usages, prompts, generated = asyncio.run(main())
    assert [(c.index, c.text, c.finish_reason) for c in whole.choices] == [(i, TEXT, "length") for i in range(4)]
    assert pieces == {i: TEXT for i in range(4)}
    assert {i: [f for f in fs if f] for i, fs in finishes.items()} == {i: ["length"] for i in range(4)}
    expected = dict(prompt_tokens=sum(prompts), completion_tokens=4 * generated,
                    total_tokens=sum(prompts) + 4 * generated)
    assert whole.usage.model_dump(exclude_none=True) == expected
    assert all(u is None for u in usages[:-1]) and usages[-1].model_dump(exclude_none=True) == expected


def test_chat_streams_the_role_first_then_the_text_and_one_finish_per_choice(model_dir):
    async def main():
        async with serving(model_dir, speaking(TEXT)) as (link, url):
            oa = client(url)
            messages = [{"role": "user", "content": "hi"}]
            whole = await oa.chat.completions.create(model="tiny", messages=messages, n=2, max_tokens=50)
            chunks = [c async for c in await oa.chat.completions.create(
                model="tiny", messages=messages, n=2, max_completion_tokens=50, stream=True)]
            async with aiohttp.ClientSession() as http, http.post(
                    f"{url}/v1/chat/completions", json={"messages": messages, "stream": True}) as reply:
                raw = (reply.status, reply.headers["Content-Type"], (await reply.read()).decode())
            return whole, chunks, list(link.streams[0].prompt), raw

    whole, chunks, prompt, raw = asyncio.run(main())
    assert [(c.message.role, c.message.content, c.finish_reason) for c in whole.choices] == [
        ("assistant", TEXT, "length")] * 2
    assert whole.usage.prompt_tokens == len(prompt)
    for i in range(2):
        deltas = [c.choices[0] for c in chunks if c.choices[0].index == i]
        assert deltas[0].delta.role == "assistant" and deltas[0].delta.content == ""
        assert "".join(d.delta.content or "" for d in deltas) == TEXT
        assert [d.finish_reason for d in deltas if d.finish_reason] == ["length"]
    status, kind, body = raw
    assert status == 200 and kind.startswith("text/event-stream")
    events = body.split("\n\n")
    assert events[-2:] == ["data: [DONE]", ""] and all(e.startswith("data: {") for e in events[:-2])


def test_a_stop_string_cuts_the_text_and_stops_the_request_on_the_gateway(model_dir):
    async def main():
        async with serving(model_dir, speaking(TEXT, pause_s=0.01)) as (link, url):
            oa = client(url)
            whole = await oa.completions.create(model="tiny", prompt="x", max_tokens=100, stop=["STOP", "zzz"])
            streamed = [c async for c in await oa.completions.create(
                model="tiny", prompt="x", max_tokens=100, stop="STOP", stream=True)]
            return whole, streamed, link.cancelled

    whole, streamed, cancelled = asyncio.run(main())
    cut = TEXT[:TEXT.index("STOP")]
    assert (whole.choices[0].text, whole.choices[0].finish_reason) == (cut, "stop")
    assert "".join(c.choices[0].text for c in streamed) == cut
    assert [c.choices[0].finish_reason for c in streamed if c.choices[0].finish_reason] == ["stop"]
    assert cancelled == [1, 2]  # both were still running on the gateway when the stop string came


@pytest.mark.parametrize("err, kind, status", [
    (ResourceExhausted("queue full: 1024 requests are waiting"), openai.RateLimitError, 429),
    (Unavailable("no healthy chain"), openai.InternalServerError, 503),
    (InvalidArgument("stop token id 999 is outside the vocabulary"), openai.BadRequestError, 400),
])
def test_mesh_refusals_are_openai_errors_with_their_http_status(model_dir, err, kind, status):
    async def main():
        async with serving(model_dir, refusing(err)) as (link, url):
            caught = []
            for stream in (False, True):
                with pytest.raises(kind) as refused:
                    reply = await client(url).completions.create(model="tiny", prompt="x", stream=stream)
                    [c async for c in reply]
                caught.append(refused.value)
            return caught

    for refused in asyncio.run(main()):
        assert refused.status_code == status and refused.body["message"] == err.message
        assert refused.body["code"] == err.code.lower()
        assert refused.response.headers.get("x-should-retry") == ("false" if status == 503 else None)
        assert refused.response.headers.get("retry-after") == ("1" if status == 429 else None)


def test_an_error_after_the_stream_began_ends_it_with_an_error_event(model_dir):
    async def main():
        async with serving(model_dir, speaking("some text", then=Unavailable("the chain went away"))) as (_, url):
            got = []
            with pytest.raises(openai.APIError, match="the chain went away"):
                async for chunk in await client(url).completions.create(model="tiny", prompt="x", stream=True):
                    got.append(chunk.choices[0].text)
            return got

    assert "".join(asyncio.run(main())) == "some text"


def test_a_client_that_disconnects_cancels_its_request(model_dir):
    async def main():
        async with serving(model_dir, one_token_then_silence) as (link, url):
            async with aiohttp.ClientSession() as http:
                reply = await http.post(f"{url}/v1/completions", json={"prompt": "x", "stream": True})
                first = await reply.content.readline()
                reply.close()  # the connection goes
                assert await eventually(lambda: link.cancelled == [1], 3.0), "timed out"
                with contextlib.suppress(asyncio.TimeoutError):  # a whole answer the client stops waiting for
                    await asyncio.wait_for(http.post(f"{url}/v1/completions", json={"prompt": "x"}), 0.3)
                assert await eventually(lambda: link.cancelled == [1, 2], 3.0), "timed out"
            return first

    assert asyncio.run(main()).startswith(b"data: {")


def test_health_version_models_and_refusals_of_the_request_itself(model_dir):
    async def main():
        async with serving(model_dir, speaking(TEXT)) as (link, url):
            oa, out = client(url), {}
            async with aiohttp.ClientSession() as http:
                async def get(path, method="GET", **kw):
                    async with http.request(method, f"{url}{path}", **kw) as r:
                        return r.status, await r.json()
                out["health"] = await get("/health")
                link.can_serve = False
                out["no chain"] = await get("/health")
                link.connected.clear()
                out["no link"] = await get("/health")
                out["version"] = await get("/version")
                out["bad json"] = await get("/v1/completions", "POST", data=b"{nope")
                out["no route"] = await get("/v1/embeddings", "POST", json={})
                out["wrong method"] = await get("/v1/completions")
            out["models"] = [m.id for m in (await oa.models.list()).data]
            out["model"] = (await oa.models.retrieve("tiny")).id
            for name, call in (("other model", oa.completions.create(model="gpt-4", prompt="x")),
                               ("logprobs", oa.completions.create(model="tiny", prompt="x", logprobs=21)),
                               ("too long", oa.completions.create(model="tiny", prompt="x", max_tokens=256))):
                with pytest.raises(openai.APIStatusError) as refused:
                    await call
                out[name] = refused.value.status_code, refused.value.body
            return out

    out = asyncio.run(main())
    assert out["health"] == (200, {"status": "ok"})
    assert out["no chain"][0] == 503 and "no chain in service" in out["no chain"][1]["error"]["message"]
    assert out["no link"][0] == 503
    assert "no link to the gateway at gateway.test:1" in out["no link"][1]["error"]["message"]
    assert out["version"] == (200, {"version": "0.1.0"})
    assert out["bad json"][0] == 400 and "not valid JSON" in out["bad json"][1]["error"]["message"]
    assert out["no route"][0] == 404 and out["no route"][1]["error"]["code"] == "not_found"
    assert out["wrong method"][0] == 405
    assert out["models"] == ["tiny"] and out["model"] == "tiny"
    assert out["other model"][0] == 404 and out["other model"][1]["code"] == "model_not_found"
    assert out["logprobs"][0] == 400 and "logprobs=21 must be an integer in [0, 20]" in out["logprobs"][1]["message"]
    assert out["too long"][0] == 400 and out["too long"][1]["code"] == "context_length_exceeded"


def test_chat_without_a_template_and_a_model_without_a_tokenizer_are_400s(model_dir):
    async def main():
        messages = [{"role": "user", "content": "x"}]
        async with serving(model_dir, speaking(TEXT), template=False) as (_, url):
            with pytest.raises(openai.BadRequestError, match="no chat template here"):
                await client(url).chat.completions.create(model="tiny", messages=messages)
        async with serving(model_dir, speaking(TEXT), tokenizer=False) as (_, url):
            with pytest.raises(openai.BadRequestError, match="no tokenizer.json"):
                await client(url).completions.create(model="tiny", prompt=[5, 6])

    asyncio.run(main())


def test_the_gateways_pages_pass_through_and_a_silent_gateway_is_a_503(model_dir):
    async def main():
        async def metrics(r):
            return web.Response(text="m_total 1\n", content_type="text/plain")

        async def status(r):
            return web.json_response({"q": r.query_string})

        async def static(r):
            return web.Response(text=r.match_info["f"], status=201)

        gateway = web.Application()
        for path, handler in (("/metrics", metrics), ("/api/status", status), ("/static/{f}", static)):
            gateway.router.add_get(path, handler)
        runner, port = web.AppRunner(gateway), free_port()
        await runner.setup()
        await web.TCPSite(runner, "127.0.0.1", port).start()
        out = {}
        async with serving(model_dir, speaking(TEXT), proxy=GatewayProxy(f"127.0.0.1:{port}")) as (_, url):
            async with aiohttp.ClientSession() as http:
                for path in ("/metrics", "/api/status?x=1", "/static/app.js", "/healthz"):
                    async with http.get(f"{url}{path}") as r:
                        out[path] = r.status, r.headers.get("Content-Type"), await r.text()
                await runner.cleanup()
                async with http.get(f"{url}/metrics") as r:
                    out["down"] = r.status, await r.text()
        return out

    out = asyncio.run(main())
    assert out["/metrics"] == (200, "text/plain; charset=utf-8", "m_total 1\n")
    assert out["/api/status?x=1"][0] == 200 and json.loads(out["/api/status?x=1"][2]) == {"q": "x=1"}
    assert out["/static/app.js"][::2] == (201, "app.js")
    assert out["/healthz"][0] == 404  # the gateway's own answer, passed on
    assert out["down"][0] == 503 and "the gateway's HTTP side at 127.0.0.1:" in out["down"][1]
