"""The KServe v2 service on a real port, driven by raw gRPC stubs, over a stand-in link."""

from __future__ import annotations

import asyncio
import contextlib
import struct

import grpc
import grpc.aio
import pytest

from frontend.kserve import KServeServicer, with_kserve
from frontend.kserve_tensors import unpack_bytes
from frontend.stream import RequestStream
from stagemesh.errors import ResourceExhausted, Unavailable
from stagemesh.inference import grpc_service_pb2 as pb
from stagemesh.inference import grpc_service_pb2_grpc
from stagemesh.runtime.net import free_port
from stagemesh.tokenizer import Tokenizer, encode_prompt
from tests.frontend.test_kserve_request import infer_request
from tests.frontend.tiny_model import CONFIG, write_model_dir
from tests.waiting import eventually

ANSWER = "Hello there, ünïcode ✓ and the rest."


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    return Tokenizer.from_dir(write_model_dir(tmp_path_factory.mktemp("model")))


class Link:
    """Each submitted request is played by ``script(stream)``; records cancels."""

    def __init__(self, script):
        self.script, self.streams, self.cancelled = script, [], []
        self.connected, self.can_serve = asyncio.Event(), True
        self.connected.set()
        self._tasks = []

    def submit(self, request_id, prompt, params, resume_from=None):
        stream = RequestStream(len(self.streams) + 1, request_id, prompt, params)
        self.streams.append(stream)
        self._tasks.append(asyncio.get_running_loop().create_task(self.script(stream)))
        return stream

    def cancel(self, stream):
        self.cancelled.append(stream.handle)


def speaking(tokenizer, text=ANSWER):
    """A script: ``text``'s tokens three at a time, then "length"."""
    async def script(stream):
        tokens = list(encode_prompt(tokenizer, text))[1:]  # without the BOS
        for i in range(0, len(tokens), 3):
            stream.tokens += tokens[i:i + 3]
            stream.wake.set()
            await asyncio.sleep(0.005)
        stream.finish("length")
    return script


def refusing(err):
    async def script(stream):
        stream.fail(err)
    return script


async def silent(stream):
    await asyncio.Event().wait()


@contextlib.asynccontextmanager
async def serving(tokenizer, script):
    link = Link(script)
    server = grpc.aio.server()
    with_kserve(lambda s: None, KServeServicer(link, tokenizer, CONFIG, "tiny"))(server)
    port = server.add_insecure_port(f"127.0.0.1:{free_port()}")
    await server.start()
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
            yield link, grpc_service_pb2_grpc.GRPCInferenceServiceStub(channel)
    finally:
        await server.stop(None)


def outputs(response: pb.ModelInferResponse) -> dict:
    """Output name -> its one element (BYTES decoded)."""
    out = {}
    for tensor, raw in zip(response.outputs, response.raw_output_contents):
        out[tensor.name] = unpack_bytes(raw)[0].decode() if tensor.datatype == "BYTES" else struct.unpack("<i", raw)[0]
    return out


def test_health_metadata_and_config(tokenizer):
    async def main():
        async with serving(tokenizer, silent) as (link, stub):
            assert (await stub.ServerLive(pb.ServerLiveRequest(), timeout=5)).live
            assert (await stub.ServerReady(pb.ServerReadyRequest(), timeout=5)).ready
            assert (await stub.ModelReady(pb.ModelReadyRequest(name="tiny"), timeout=5)).ready
            link.can_serve = False
            assert not (await stub.ServerReady(pb.ServerReadyRequest(), timeout=5)).ready
            meta = await stub.ModelMetadata(pb.ModelMetadataRequest(name="tiny", version="1"), timeout=5)
            config = (await stub.ModelConfig(pb.ModelConfigRequest(name="tiny"), timeout=5)).config
            with pytest.raises(grpc.aio.AioRpcError) as err:
                await stub.ModelReady(pb.ModelReadyRequest(name="llama"), timeout=5)
            return meta, config, err.value

    meta, config, err = asyncio.run(main())
    assert {t.name: t.datatype for t in meta.inputs}["text_input"] == "BYTES"
    assert [t.name for t in meta.outputs] == ["text_output", "finish_reason", "num_input_tokens", "num_output_tokens"]
    assert config.name == "tiny" and config.model_transaction_policy.decoupled
    assert err.code() == grpc.StatusCode.NOT_FOUND
    assert "unknown model 'llama'; this server serves 'tiny'" in err.details()


def test_model_infer_gives_the_whole_answer(tokenizer):
    async def main():
        async with serving(tokenizer, speaking(tokenizer)) as (link, stub):
            whole = await stub.ModelInfer(infer_request("Say:", sampling_parameters={"max_tokens": 40}), timeout=5)
            bare = await stub.ModelInfer(infer_request("Say:", exclude_input_in_output=True), timeout=5)
            return whole, bare, link

    whole, bare, link = asyncio.run(main())
    prompt_tokens = len(encode_prompt(tokenizer, "Say:"))
    assert outputs(whole) == {"text_output": "Say:" + ANSWER, "finish_reason": "length",
                              "num_input_tokens": prompt_tokens, "num_output_tokens": len(link.streams[0].tokens)}
    assert outputs(bare)["text_output"] == ANSWER
    assert link.streams[0].params.max_new_tokens == 40 and link.streams[0].params.seed is not None
    assert "triton_final_response" not in whole.parameters and link.cancelled == []


def test_model_stream_infer_sends_chunks_and_marks_the_last(tokenizer):
    async def main():
        async with serving(tokenizer, speaking(tokenizer)) as (link, stub):
            async def requests():
                yield infer_request("a", stream=True, outputs=["text_output", "finish_reason"])
                yield infer_request("b", streaming=False, exclude_input_in_output=True)
                yield infer_request("c", sampling_parameters={"top_p": 2})
            return [r async for r in stub.ModelStreamInfer(requests(), timeout=5)]

    responses = asyncio.run(main())
    errors = [r.error_message for r in responses if r.error_message]
    assert len(errors) == 1 and errors[0].startswith("INVALID_ARGUMENT: ") and "top_p" in errors[0]
    chunks = [r.infer_response for r in responses if not r.error_message and r.infer_response.id == ""]
    streamed = [c for c in chunks if len(c.outputs) == 2]
    whole = [c for c in chunks if len(c.outputs) == 4]
    assert len(streamed) > 2 and "".join(outputs(c)["text_output"] for c in streamed) == ANSWER
    finals = [c.parameters["triton_final_response"].bool_param for c in streamed]
    assert finals == [False] * (len(streamed) - 1) + [True]
    assert outputs(streamed[-1])["finish_reason"] == "length"
    assert len(whole) == 1 and outputs(whole[0])["text_output"] == ANSWER
    assert whole[0].parameters["triton_final_response"].bool_param


@pytest.mark.parametrize("script, code, words", [
    (refusing(ResourceExhausted("the gateway's queue is full; retry later")), "RESOURCE_EXHAUSTED", "queue is full"),
    (refusing(Unavailable("no chain can serve; retry")), "UNAVAILABLE", "no chain"),
])
def test_mesh_refusals_are_statuses(tokenizer, script, code, words):
    async def main():
        async with serving(tokenizer, script) as (_, stub):
            with pytest.raises(grpc.aio.AioRpcError) as err:
                await stub.ModelInfer(infer_request("x"), timeout=5)
            return err.value

    err = asyncio.run(main())
    assert err.code().name == code and words in err.details()


def test_bad_requests_say_what_to_fix(tokenizer):
    async def main():
        async with serving(tokenizer, silent) as (_, stub):
            found = []
            for request in (infer_request("x", sampling_parameters={"temperature": -1}), infer_request(""),
                            pb.ModelInferRequest(model_name="other")):
                with pytest.raises(grpc.aio.AioRpcError) as err:
                    await stub.ModelInfer(request, timeout=5)
                found.append((err.value.code().name, err.value.details()))
            return found

    (c1, m1), (c2, _), (c3, m3) = asyncio.run(main())
    assert c1 == c2 == "INVALID_ARGUMENT" and "temperature" in m1
    assert c3 == "NOT_FOUND" and "'tiny'" in m3


def test_a_client_that_leaves_cancels_its_request(tokenizer):
    async def main():
        async with serving(tokenizer, silent) as (link, stub):
            call = stub.ModelInfer(infer_request("x"), timeout=5)
            while not link.streams:
                await asyncio.sleep(0.01)
            call.cancel()
            await eventually(lambda: link.cancelled, 10)  # the server sees the cancel on its own time
            return link.cancelled

    assert asyncio.run(main()) == [1]
