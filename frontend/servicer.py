"""The client-facing ``stagemesh.v1.Gateway`` service on a frontend: decode, tokenize, validate,
hand to the gateway over the link, stream the tokens back as they come."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import threading
import uuid
from array import array
from concurrent.futures import ThreadPoolExecutor

import grpc
import grpc.aio

from frontend.link import GatewayLink
from frontend.stream import RequestStream
from stagemesh.config import ModelConfig
from stagemesh.errors import StagemeshError
from stagemesh.serving.validate import validate_request
from stagemesh.tokenizer import IncrementalDecoder, Tokenizer, encode_prompt
from stagemesh.v1 import gateway_pb2, gateway_pb2_grpc
from stagemesh.wire.codec.messages import GenerateChunk, chunk_to_pb, generate_request_from_pb

log = logging.getLogger(__name__)

INLINE_PROMPT_CHARS = 4096
"""Prompts up to this long are tokenized on the event loop (microseconds); longer ones on a
thread, which ``Tokenizer.encode`` lets run without the GIL, so other streams never stall."""
TOKENIZER_NICE = 10
"""NOTE: the tokenizer thread runs at a lower priority: a 3 MB prompt keeps a core busy for
seconds, and on a small host that core is one a stage worker's OpenMP team computes on."""


def _lower_priority() -> None:
    with contextlib.suppress(OSError):  # not allowed, or not Linux: run at the normal priority
        os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), TOKENIZER_NICE)


class FrontendServicer(gateway_pb2_grpc.GatewayServicer):
    """Generate / Cancel / Status for clients. Failures are gRPC statuses that say what to fix."""

    def __init__(self, link: GatewayLink, tokenizer: Tokenizer | None, config: ModelConfig):
        self.link, self.tokenizer, self.config = link, tokenizer, config
        self._tokenizing = ThreadPoolExecutor(2, thread_name_prefix="tokenize", initializer=_lower_priority)

    async def Generate(self, request: gateway_pb2.GenerateRequest, context: grpc.aio.ServicerContext):
        """Streams the request's tokens, several per message when the client falls behind;
        leaving the call early cancels the request and frees its KV cache."""
        try:
            stream = await self._submit(request)
        except StagemeshError as err:
            await context.abort(_status_code(err.code), err.message)
        decoder = IncrementalDecoder(self.tokenizer) if self.tokenizer is not None else None
        try:
            while True:
                index, tokens = await stream.next_tokens()
                ended = stream.ended  # as of these tokens: what comes during the write goes out next
                if tokens or stream.finish_reason is not None:
                    yield _response(stream, index, tokens, decoder)
                if ended:
                    break
            if stream.error is not None:
                await context.abort(_status_code(stream.error.code), stream.error.message)
        finally:
            if not stream.ended:
                self.link.cancel(stream)  # the client left

    async def _submit(self, request: gateway_pb2.GenerateRequest) -> RequestStream:
        inp = generate_request_from_pb(request)
        ids = inp.token_ids if inp.token_ids is not None else await self._encode(inp.prompt)
        config = self.config
        validate_request(ids, inp.params, vocab_size=config.vocab_size, max_model_len=config.max_position_embeddings)
        return self.link.submit(inp.request_id or uuid.uuid4().hex, array("q", ids), inp.params)

    async def _encode(self, prompt: str) -> tuple[int, ...]:
        limit = self.config.max_position_embeddings
        if len(prompt) <= INLINE_PROMPT_CHARS:
            return encode_prompt(self.tokenizer, prompt, limit)
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self._tokenizing, encode_prompt, self.tokenizer, prompt, limit)

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
    return chunk_to_pb(GenerateChunk(stream.request_id, tuple(tokens), index, text, stream.finish_reason))


def _status_code(name: str) -> grpc.StatusCode:
    try:
        return grpc.StatusCode[name]
    except KeyError:
        return grpc.StatusCode.UNKNOWN


