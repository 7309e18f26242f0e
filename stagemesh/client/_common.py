"""What the blocking and the asyncio clients share: request building, deadlines, error mapping, assembly."""

from __future__ import annotations

import contextlib
from typing import Any, Callable, Iterable, Iterator, Sequence, TypeVar

import grpc

from stagemesh.client._types import GeneratedToken, GenerateResult
from stagemesh.errors import InvalidArgument, StagemeshError, error_for
from stagemesh.serving.params import PARAMS, SamplingParams, param_of, with_values
from stagemesh.v1 import gateway_pb2
from stagemesh.wire.codec.messages import GenerateChunk, GenerateInput, chunk_from_pb, generate_request_to_pb

F = TypeVar("F", bound=Callable[..., Any])

UNARY_TIMEOUT = 30.0
"""Deadline (s) of Cancel and Status when neither the call nor the client sets one."""


def generate_request(
    prompt: str | Sequence[int] | None,
    token_ids: Sequence[int] | None,
    *,
    request_id: str | None,
    **sampling: Any,
) -> gateway_pb2.GenerateRequest:
    """The GenerateRequest of a generate/stream call; InvalidArgument on bad local input.

    ``sampling`` holds ``SamplingParams`` fields by their names there; an unknown name is
    refused here, naming it. A non-string ``prompt`` is taken as token ids, so
    ``generate([1, 2, 3])`` works. Values are checked by the gateway; only what cannot be
    encoded at all fails here.
    """
    if prompt is not None and not isinstance(prompt, str):
        if token_ids is not None:
            raise InvalidArgument("give exactly one of prompt (text) or token_ids")
        prompt, token_ids = None, prompt
    params = with_values(SamplingParams(), sampling, "generate")
    try:
        ids = None if token_ids is None else tuple(int(t) for t in token_ids)
        inp = GenerateInput(prompt=prompt, token_ids=ids, params=params, request_id=request_id or "")
        return generate_request_to_pb(inp)
    except (TypeError, ValueError) as e:  # int() of a bad id, protobuf type/range checks
        raise InvalidArgument(f"bad generate argument: {e}") from None


def with_sampling_doc(method: F) -> F:
    """``method``'s docstring followed by the sampling keyword arguments it takes (``**sampling``):
    every ``SamplingParams`` field, its default and its help, so ``help()`` shows them."""
    method.__doc__ = f"{method.__doc__}\n\n{_SAMPLING_DOC}"
    return method


_SAMPLING_DOC = "\n".join([
    "        Sampling keyword arguments (``SamplingParams``; an unknown name raises InvalidArgument):",
    "",
    *(f"        - ``{f.name}`` (default ``{f.default!r}``): {param_of(f).help}" for f in PARAMS),
])


def deadline(timeout: float | None, client_timeout: float | None, fallback: float | None) -> float | None:
    """A call's deadline: its own ``timeout``, else the client's, else ``fallback``."""
    if timeout is not None:
        return timeout
    return client_timeout if client_timeout is not None else fallback


@contextlib.contextmanager
def gateway_errors() -> Iterator[None]:
    """Raise a failed gateway call's ``grpc.RpcError`` as the StagemeshError of its status."""
    try:
        yield
    except grpc.RpcError as e:
        raise error_from_rpc(e) from None


def tokens_of(msg: gateway_pb2.GenerateResponse) -> list[GeneratedToken]:
    """The per-token items of one streamed chunk; its text and end ride on the last one."""
    chunk: GenerateChunk = chunk_from_pb(msg)
    if not chunk.token_ids:
        if not chunk.text and chunk.finish_reason is None:
            return []
        return [GeneratedToken(chunk.request_id, None, chunk.text, chunk.index, chunk.finish_reason)]
    last = len(chunk.token_ids) - 1
    return [
        GeneratedToken(
            request_id=chunk.request_id,
            token_id=token,
            text=chunk.text if i == last else "",
            index=chunk.index + i,
            finish_reason=chunk.finish_reason if i == last else None,
        )
        for i, token in enumerate(chunk.token_ids)
    ]


def assemble(tokens: Iterable[GeneratedToken], request_id: str | None) -> GenerateResult:
    """The GenerateResult of a whole stream of items."""
    ids, text, finish, rid = [], [], None, request_id or ""
    for tok in tokens:
        rid = tok.request_id or rid
        if tok.token_id is not None:
            ids.append(tok.token_id)
        text.append(tok.text)
        finish = tok.finish_reason or finish
    return GenerateResult(request_id=rid, token_ids=tuple(ids), text="".join(text), finish_reason=finish)


def error_from_rpc(err: grpc.RpcError) -> StagemeshError:
    """The StagemeshError of a failed call (grpc.RpcError and grpc.aio.AioRpcError alike)."""
    code = err.code() if hasattr(err, "code") else None
    details = err.details() if hasattr(err, "details") else None
    name = code.name if code is not None else "UNKNOWN"
    return error_for(name, details or f"gateway call failed with {name}")
