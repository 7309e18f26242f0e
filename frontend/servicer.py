"""The client-facing ``stagemesh.v1.Gateway`` service on a frontend: decode, tokenize, validate,
hand to the gateway over the link, stream the tokens back as they come."""

from __future__ import annotations

import logging
import random
import uuid
from array import array

import grpc
import grpc.aio

from frontend.link import GatewayLink
from frontend.prompt_encoder import PromptEncoder
from frontend.stream import RequestStream
from stagemesh.config import ModelConfig
from stagemesh.errors import StagemeshError
from stagemesh.serving.params import with_seed
from stagemesh.serving.validate import validate_request
from stagemesh.tokenizer import IncrementalDecoder, Tokenizer
from stagemesh.v1 import gateway_pb2, gateway_pb2_grpc
from stagemesh.wire.codec.messages import GenerateChunk, chunk_to_pb, generate_request_from_pb

log = logging.getLogger(__name__)

class FrontendServicer(gateway_pb2_grpc.GatewayServicer):
    """Generate / Cancel / Status for clients. Failures are gRPC statuses that say what to fix."""

    def __init__(self, link: GatewayLink, tokenizer: Tokenizer | None, config: ModelConfig):
        self.link, self.tokenizer, self.config = link, tokenizer, config
        self.prompts = PromptEncoder(tokenizer, config.max_position_embeddings)
        self._rng = random.SystemRandom()

    async def Generate(self, request: gateway_pb2.GenerateRequest, context: grpc.aio.ServicerContext):
        """Streams the request's tokens, several per message when the client falls behind;
        leaving the call early cancels the request and frees its KV cache. With ``resume_from``
        it takes the request up (wherever it runs, or again from its prompt) from that index."""
        try:
            stream = await self._submit(request)
        except StagemeshError as err:
            await _abort(context, err)
        decoder = IncrementalDecoder(self.tokenizer) if self.tokenizer is not None else None
        primed = stream.sent == 0
        try:
            while True:
                index, tokens = await stream.next_tokens()
                ended = stream.ended  # as of these tokens: what comes during the write goes out next
                if tokens or stream.finish_reason is not None:
                    if not primed and decoder is not None:  # a resume: text goes on from the client's tokens
                        decoder.push_many(stream.tokens[:index])
                    primed = True
                    yield _response(stream, index, tokens, decoder)
                if ended:
                    break
            if stream.error is not None:
                await _abort(context, stream.error, final=stream.final)
        finally:
            if not stream.ended:
                self.link.cancel(stream)  # the client left

    async def _submit(self, request: gateway_pb2.GenerateRequest) -> RequestStream:
        inp = generate_request_from_pb(request)
        ids = inp.token_ids if inp.token_ids is not None else await self.prompts.encode(inp.prompt)
        config = self.config
        validate_request(ids, inp.params, vocab_size=config.vocab_size, max_model_len=config.max_position_embeddings)
        # the seed is drawn here: a request resubmitted to a new gateway must sample the same tokens
        params = with_seed(inp.params, self._rng)
        return self.link.submit(inp.request_id or uuid.uuid4().hex, array("q", ids), params, inp.resume_from)

    async def Cancel(self, request: gateway_pb2.CancelRequest, context: grpc.aio.ServicerContext):
        try:
            return gateway_pb2.CancelResponse(cancelled=await self.link.cancel_by_id(request.request_id))
        except grpc.RpcError as err:
            await context.abort(grpc.StatusCode.UNAVAILABLE, f"the gateway did not answer: {err.details()}; retry")

    async def Status(self, request: gateway_pb2.StatusRequest, context: grpc.aio.ServicerContext):
        try:
            return await self.link.status()
        except grpc.RpcError as err:
            await context.abort(grpc.StatusCode.UNAVAILABLE, f"the gateway did not answer: {err.details()}; retry")


def _response(stream: RequestStream, index: int, tokens: list[int], decoder: IncrementalDecoder | None):
    text = ""
    if decoder is not None:
        text = decoder.push_many(tokens)
        if stream.finish_reason is not None:
            text += decoder.flush()
    logprobs = tuple(stream.logprobs_of(index, len(tokens)))
    return chunk_to_pb(GenerateChunk(stream.request_id, tuple(tokens), index, text, stream.finish_reason, logprobs))


RETRY_PUSHBACK_MS = 1000
"""The retry hint a refusal for overload carries (``grpc-retry-pushback-ms``, which gRPC's own
retry policies honour): a queue that is full now has room about this much later."""
PUSHBACK = "grpc-retry-pushback-ms"


async def _abort(context: grpc.aio.ServicerContext, err: StagemeshError, *, final: bool = True) -> None:
    """End the call with ``err``'s status. NOTE: an UNAVAILABLE that is the mesh's verdict (no
    chain served in time) carries a negative pushback, gRPC's "do not retry": the SDK resumes a
    broken stream, but not one the mesh already waited on and gave up."""
    code = _status_code(err.code)
    if code == grpc.StatusCode.RESOURCE_EXHAUSTED:
        context.set_trailing_metadata(((PUSHBACK, str(RETRY_PUSHBACK_MS)),))
    elif code == grpc.StatusCode.UNAVAILABLE and final:
        context.set_trailing_metadata(((PUSHBACK, "-1"),))
    await context.abort(code, err.message)


def _status_code(name: str) -> grpc.StatusCode:
    try:
        return grpc.StatusCode[name]
    except KeyError:
        return grpc.StatusCode.UNKNOWN


