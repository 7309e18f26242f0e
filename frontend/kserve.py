"""The KServe v2 / Triton ``inference.GRPCInferenceService`` on a frontend's client port, beside
``stagemesh.v1.Gateway``: health and metadata, ``ModelInfer`` (the whole answer) and
``ModelStreamInfer`` (one response per chunk of tokens), in the tensor names of Triton's vLLM
backend (``frontend.kserve_request``). Requests go over the frontend's link as the Gateway
servicer's do; a client that leaves cancels its request on the gateway.

NOTE: as in Triton, an error of one request on ``ModelStreamInfer`` is a response with
``error_message`` (``"CODE: what to fix"``) and the stream stays open for the next request;
``ModelInfer`` and the metadata RPCs fail with the gRPC status itself.
"""

from __future__ import annotations

import asyncio
import random
import uuid
from array import array
from collections.abc import AsyncIterator, Callable

import grpc
import grpc.aio

import stagemesh
from frontend.kserve_request import INPUTS, OUTPUTS, InferInput, parse_infer
from frontend.kserve_tensors import add_output
from frontend.link import GatewayLink
from frontend.prompt_encoder import PromptEncoder
from frontend.servicer import _abort as abort
from frontend.stream import RequestStream
from stagemesh.config import ModelConfig
from stagemesh.errors import StagemeshError
from stagemesh.inference import grpc_service_pb2 as pb
from stagemesh.inference import grpc_service_pb2_grpc
from stagemesh.serving.params import with_seed
from stagemesh.serving.validate import validate_request
from stagemesh.tokenizer import IncrementalDecoder, Tokenizer

VERSION = "1"
"""The one version of the served model."""
FINAL = "triton_final_response"
CONFIG_TYPES = {"BYTES": pb.TYPE_STRING, "BOOL": pb.TYPE_BOOL, "INT32": pb.TYPE_INT32}


class NotFound(StagemeshError):
    code = "NOT_FOUND"


class KServeServicer(grpc_service_pb2_grpc.GRPCInferenceServiceServicer):
    """One model (``model_name``) over the frontend's link; failures say what to fix."""

    def __init__(self, link: GatewayLink, tokenizer: Tokenizer | None, config: ModelConfig, model_name: str):
        self.link, self.tokenizer, self.config, self.model_name = link, tokenizer, config, model_name
        self.prompts = PromptEncoder(tokenizer, config.max_position_embeddings)
        self._rng = random.SystemRandom()

    def _ready(self) -> bool:
        return self.link.connected.is_set() and self.link.can_serve

    def _model(self, name: str, version: str) -> None:
        if name != self.model_name:
            raise NotFound(f"unknown model {name!r}; this server serves {self.model_name!r}")
        if version not in ("", VERSION):
            raise NotFound(f"model {name!r} has no version {version!r}; send {VERSION!r} or leave it empty")

    async def ServerLive(self, request, context):
        return pb.ServerLiveResponse(live=True)

    async def ServerReady(self, request, context):
        """Ready while linked to a gateway that has a chain in service."""
        return pb.ServerReadyResponse(ready=self._ready())

    async def ModelReady(self, request, context):
        await self._checked(context, self._model, request.name, request.version)
        return pb.ModelReadyResponse(ready=self._ready())

    async def ServerMetadata(self, request, context):
        return pb.ServerMetadataResponse(name="stagemesh", version=stagemesh.__version__)

    async def ModelMetadata(self, request, context):
        await self._checked(context, self._model, request.name, request.version)
        tensor = pb.ModelMetadataResponse.TensorMetadata
        return pb.ModelMetadataResponse(
            name=self.model_name, versions=[VERSION], platform="stagemesh",
            inputs=[tensor(name=n, datatype=t, shape=[1]) for n, t in INPUTS.items()],
            outputs=[tensor(name=n, datatype=t, shape=[-1]) for n, t in OUTPUTS.items()])

    async def ModelConfig(self, request, context):
        """A minimal configuration: the tensors, no batching, decoupled (it streams)."""
        await self._checked(context, self._model, request.name, request.version)
        return pb.ModelConfigResponse(config=pb.ModelConfig(
            name=self.model_name, platform="stagemesh", backend="stagemesh", max_batch_size=0,
            input=[pb.ModelInput(name=n, data_type=CONFIG_TYPES[t], dims=[1], optional=n != "text_input")
                   for n, t in INPUTS.items()],
            output=[pb.ModelOutput(name=n, data_type=CONFIG_TYPES[t], dims=[-1]) for n, t in OUTPUTS.items()],
            model_transaction_policy=pb.ModelTransactionPolicy(decoupled=True)))

    async def ModelInfer(self, request: pb.ModelInferRequest, context: grpc.aio.ServicerContext):
        """The whole answer in one response (``stream`` is ignored here: use ModelStreamInfer)."""
        try:
            inp, stream = await self._submit(request)
            text = "".join([chunk async for chunk, _ in self._chunks(stream)])
        except StagemeshError as err:
            await abort(context, err)
        if not inp.exclude_input:
            text = inp.text + text
        return self._response(request, inp, stream, text, final=None)

    async def ModelStreamInfer(self, requests: AsyncIterator[pb.ModelInferRequest],
                               context: grpc.aio.ServicerContext):
        """Each request's responses as they come (several requests may be open at once); the
        last response of a request carries ``triton_final_response=true``."""
        out: asyncio.Queue[pb.ModelStreamInferResponse | None] = asyncio.Queue()
        reader = asyncio.create_task(self._read_stream(requests, out.put_nowait))
        try:
            while (response := await out.get()) is not None:
                yield response
            reader.result()  # a bug in a request's task: the call ends UNKNOWN, not silently OK
        finally:
            reader.cancel()  # the client left: the requests' tasks cancel theirs on the gateway

    async def _read_stream(self, requests, put: Callable[[pb.ModelStreamInferResponse | None], None]) -> None:
        tasks: set[asyncio.Task] = set()
        try:
            async for request in requests:
                task = asyncio.create_task(self._stream_one(request, put))
                tasks.add(task)
                task.add_done_callback(tasks.discard)
            await asyncio.gather(*tasks)
        finally:
            for task in tasks:
                task.cancel()
            put(None)

    async def _stream_one(self, request: pb.ModelInferRequest, put) -> None:
        try:
            inp, stream = await self._submit(request)
            if inp.stream:
                async for text, final in self._chunks(stream):
                    put(pb.ModelStreamInferResponse(infer_response=self._response(request, inp, stream, text, final)))
                return
            text = "".join([chunk async for chunk, _ in self._chunks(stream)])
            text = text if inp.exclude_input else inp.text + text
            put(pb.ModelStreamInferResponse(infer_response=self._response(request, inp, stream, text, final=True)))
        except StagemeshError as err:
            put(pb.ModelStreamInferResponse(error_message=str(err),
                                            infer_response=pb.ModelInferResponse(id=request.id)))

    async def _submit(self, request: pb.ModelInferRequest) -> tuple[InferInput, RequestStream]:
        self._model(request.model_name, request.model_version)
        inp = parse_infer(request)
        ids = await self.prompts.encode(inp.text)
        validate_request(ids, inp.params, vocab_size=self.config.vocab_size,
                         max_model_len=self.config.max_position_embeddings)
        params = with_seed(inp.params, self._rng)  # the same tokens again if the request is resumed
        return inp, self.link.submit(uuid.uuid4().hex, array("q", ids), params)

    async def _chunks(self, stream: RequestStream) -> AsyncIterator[tuple[str, bool]]:
        """(text, is the last) per message of tokens; the stream's error is raised after its
        tokens. Leaving early (the client left) cancels the request on the gateway."""
        decoder = IncrementalDecoder(self.tokenizer)
        try:
            while True:
                _, tokens = await stream.next_tokens()
                ended, done = stream.ended, stream.finish_reason is not None
                if tokens or done:
                    yield decoder.push_many(tokens) + (decoder.flush() if done else ""), done
                if ended:
                    break
            if stream.error is not None:
                raise stream.error
        finally:
            if not stream.ended:
                self.link.cancel(stream)

    def _response(self, request: pb.ModelInferRequest, inp: InferInput, stream: RequestStream, text: str,
                  final: bool | None) -> pb.ModelInferResponse:
        """``final``: the value of ``triton_final_response`` (None: no such parameter)."""
        response = pb.ModelInferResponse(model_name=self.model_name, model_version=VERSION, id=request.id)
        values = {"text_output": [text], "finish_reason": [stream.finish_reason or ""],
                  "num_input_tokens": [len(stream.prompt)], "num_output_tokens": [len(stream.tokens)]}
        for name in inp.outputs:
            add_output(response, name, OUTPUTS[name], values[name])
        if final is not None:
            response.parameters[FINAL].bool_param = final
        return response

    @staticmethod
    async def _checked(context: grpc.aio.ServicerContext, check, *args) -> None:
        try:
            check(*args)
        except StagemeshError as err:
            await abort(context, err)


def with_kserve(add_servicer: Callable[[grpc.aio.Server], None], kserve: KServeServicer
                ) -> Callable[[grpc.aio.Server], None]:
    """``add_servicer`` and the KServe v2 service, on one server."""
    def add(server: grpc.aio.Server) -> None:
        add_servicer(server)
        grpc_service_pb2_grpc.add_GRPCInferenceServiceServicer_to_server(kserve, server)
    return add
