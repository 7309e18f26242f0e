"""What the blocking and the asyncio clients share: request building, deadlines, error mapping, assembly."""

from __future__ import annotations

import contextlib
import operator
import os
import random
import time
import uuid
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, Sequence, TypeVar

import grpc
from google.protobuf.descriptor import FieldDescriptor

from stagemesh.client._types import GeneratedToken, GenerateResult, TokenLogprobs
from stagemesh.errors import InvalidArgument, StagemeshError, error_for
from stagemesh.runtime.api_keys import ENV_KEY, check_key
from stagemesh.serving.params import PARAMS, SamplingParams, param_of, with_seed, with_values
from stagemesh.v1 import gateway_pb2
from stagemesh.wire.codec.messages import GenerateChunk, GenerateInput, chunk_from_pb, generate_request_to_pb

F = TypeVar("F", bound=Callable[..., Any])

UNARY_TIMEOUT = 30.0
"""Deadline (s) of Cancel and Status when neither the call nor the client sets one."""
RESUME_S = 60.0
"""How long a broken stream keeps trying to resume before its UNAVAILABLE is raised: covers a
gateway restart (a few seconds) and the mesh's own wait for a chain to come back (30 s)."""
RESUME_BACKOFF_S = (0.05, 0.25)
"""A broken stream's first wait before it resumes, and its longest (doubling in between)."""
HANDSHAKE_RETRY_S = 2.0
"""How long a client's first call whose connections are closed during their handshake is tried
again before its error is raised (``StreamCursor.retry_in``): gRPC dials again after 0.1 s, then
backs off (×1.6, at most 0.25 s), so about ten connections."""
CHANNEL_OPTIONS = (
    # NOTE: gRPC waits 1 s before its first reconnect attempt by default, then backs off to
    # 120 s: a client whose frontend died would resume seconds late. Reconnect fast instead, and
    # keep dialing every 0.25 s at most: with a 1 s cap (and the resume's own 1 s), the clients
    # of a lone frontend, back 0.5 s after a SIGKILL, resumed 2.6 s after it (scripts/kill_gap.py).
    # Not grpc.min_reconnect_backoff_ms: gRPC's core reads it as each connection attempt's deadline
    # (20 s by default), and a frontend under an overload wave may take over 0.1 s to answer one.
    ("grpc.initial_reconnect_backoff_ms", 100),
    ("grpc.max_reconnect_backoff_ms", 250),
    # Each client its own connection: gRPC otherwise shares one among every channel of the process
    # to the same address, so a process's clients would all land on one of the mesh's frontends.
    ("grpc.use_local_subchannel_pool", 1),
)
_rng = random.SystemRandom()


def generate_request(
    prompt: str | Sequence[int] | None,
    token_ids: Sequence[int] | None,
    *,
    request_id: str | None,
    resume_from: int | None = None,
    **sampling: Any,
) -> gateway_pb2.GenerateRequest:
    """The GenerateRequest of a generate/stream call; InvalidArgument on bad local input.

    ``sampling`` holds ``SamplingParams`` fields by their names there; an unknown name is
    refused here, naming it. A non-string ``prompt`` is taken as token ids, so
    ``generate([1, 2, 3])`` works. Values are checked by the gateway; only what cannot be
    encoded at all fails here. ``resume_from`` takes up the request ``request_id`` from that
    token index (the prompt and parameters must be the original's).
    """
    what = "token_ids"
    if prompt is not None and not isinstance(prompt, str):
        if token_ids is not None:
            raise InvalidArgument("give exactly one of prompt (text) or token_ids")
        prompt, token_ids, what = None, prompt, "prompt"
    # an id and a seed of our own: a stream that breaks is resumed as the same request, exactly
    params = with_seed(with_values(SamplingParams(), sampling, "generate"), _rng)
    check_wire_ranges(params)
    ids = None if token_ids is None else token_ids_of(token_ids, what)
    try:
        inp = GenerateInput(prompt=prompt, token_ids=ids, params=params, request_id=request_id or uuid.uuid4().hex,
                            resume_from=resume_from)
        return generate_request_to_pb(inp)
    except (TypeError, ValueError) as e:  # what protobuf still refuses (a token id past 64 bits)
        raise InvalidArgument(f"bad generate argument: {e}") from None


def token_ids_of(value: Any, what: str) -> tuple[int, ...]:
    """``value`` as a tuple of token ids; InvalidArgument saying what a prompt may be otherwise."""
    if isinstance(value, (str, bytes)) or not isinstance(value, Iterable):
        shown = repr(value) if len(repr(value)) <= 40 else repr(value)[:37] + "..."
        raise InvalidArgument(f"{what} must be a string (text) or a sequence of token ids (integers), "
                              f"not {type(value).__name__} {shown}")
    ids = []
    for pos, token in enumerate(value):
        try:
            ids.append(operator.index(token))  # ints, numpy and 0-d torch integers; no floats, no strings
        except TypeError:
            raise InvalidArgument(f"{what}[{pos}]={token!r} is not a token id: token ids are integers") from None
    return tuple(ids)


_WIRE_RANGES = {
    FieldDescriptor.TYPE_INT32: (-(2**31), 2**31 - 1), FieldDescriptor.TYPE_INT64: (-(2**63), 2**63 - 1),
    FieldDescriptor.TYPE_UINT32: (0, 2**32 - 1), FieldDescriptor.TYPE_UINT64: (0, 2**64 - 1),
}
"""The integers each protobuf integer type can carry."""


def check_wire_ranges(params: SamplingParams) -> None:
    """InvalidArgument naming the argument when an integer does not fit its protobuf field
    (protobuf itself only says "Value out of range: 2147483648")."""
    wire = gateway_pb2.GenerateRequest.DESCRIPTOR.fields_by_name["params"].message_type.fields_by_name
    for f in PARAMS:
        low, high = _WIRE_RANGES.get(wire[f.name].type, (None, None)) if f.name in wire else (None, None)
        value = getattr(params, f.name)
        for v in value if isinstance(value, tuple) else (value,):
            if low is not None and isinstance(v, int) and not low <= v <= high:
                raise InvalidArgument(_out_of_range(f.name, v, param_of(f).bounds, low, high))


def _out_of_range(name: str, value: int, bounds: Any, low: int, high: int) -> str:
    limit = f"at most {high}" if value > high else f"at least {low}"
    return f"{name}={value} is out of range: it must be {f'{bounds} and ' if bounds else ''}{limit}"


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


def key_metadata(api_key: str | None) -> tuple[tuple[str, str], ...]:
    """The metadata every call carries: ``authorization: Bearer KEY`` for ``api_key`` (None: the
    ``STAGEMESH_API_KEY`` environment variable; "" or neither: no key); InvalidArgument for a key
    that cannot travel in a header (a space, a newline, ...)."""
    key = os.environ.get(ENV_KEY, "").strip() if api_key is None else api_key
    if not key:
        return ()
    try:
        check_key(key, "api_key" if api_key is not None else f"${ENV_KEY}")
    except ValueError as err:
        raise InvalidArgument(str(err)) from None
    return (("authorization", f"Bearer {key}"),)


def channel_credentials(ca_file: str | Path | None, tls: bool) -> grpc.ChannelCredentials | None:
    """TLS to the client port: trusting the certificates of ``ca_file`` (PEM), or with ``tls`` the
    system's roots; None (plaintext) with neither. InvalidArgument when ``ca_file`` cannot be read."""
    if ca_file is None and not tls:
        return None
    roots = None
    if ca_file is not None:
        try:
            roots = Path(ca_file).read_bytes()
        except OSError as err:
            raise InvalidArgument(f"cannot read ca_file {ca_file}: {err}") from None
    return grpc.ssl_channel_credentials(root_certificates=roots)


def deadline(timeout: float | None, client_timeout: float | None, fallback: float | None) -> float | None:
    """A call's deadline: its own ``timeout``, else the client's, else ``fallback``."""
    if timeout is not None:
        return timeout
    return client_timeout if client_timeout is not None else fallback


@contextlib.contextmanager
def gateway_errors(address: str = "", timeout: float | None = None) -> Iterator[None]:
    """Raise a failed gateway call's ``grpc.RpcError`` as the StagemeshError of its status
    (``address`` and ``timeout``: the call's, for the message)."""
    try:
        yield
    except grpc.RpcError as e:
        raise error_from_rpc(e, address=address, timeout=timeout) from None


def tokens_of(msg: gateway_pb2.GenerateResponse) -> list[GeneratedToken]:
    """The per-token items of one streamed chunk; its text and end ride on the last one."""
    chunk: GenerateChunk = chunk_from_pb(msg)
    if not chunk.token_ids:
        if not chunk.text and chunk.finish_reason is None:
            return []
        return [GeneratedToken(chunk.request_id, None, chunk.text, chunk.index, chunk.finish_reason)]
    last = len(chunk.token_ids) - 1
    logprobs = chunk.logprobs or (None,) * len(chunk.token_ids)
    return [
        GeneratedToken(
            request_id=chunk.request_id,
            token_id=token,
            text=chunk.text if i == last else "",
            index=chunk.index + i,
            finish_reason=chunk.finish_reason if i == last else None,
            logprobs=lp,
        )
        for i, (token, lp) in enumerate(zip(chunk.token_ids, logprobs))
    ]


class StreamCursor:
    """Where a Generate stream is, to resume it after a break: the next token index the caller
    has not seen, and how long resuming may go on.

    NOTE: exactly once. A resume asks for the request from ``next_index`` (the frontend skips
    what came before), and ``fresh`` drops anything below it all the same, so the caller's loop
    sees each token once whatever a frontend resends. Only UNAVAILABLE (a frontend or the
    gateway went away) is resumed, unless the server said not to retry (the mesh waited for a
    chain and gave up); every other status is final.
    """

    def __init__(self, request: gateway_pb2.GenerateRequest, timeout: float | None, resume_s: float, *,
                 address: str = "", fail_fast: bool = False):
        self.request = request
        self.next_index = 0
        self.resume_s = resume_s
        self.address = address
        self.call_timeout = timeout
        self.fail_fast = fail_fast
        """Raise at once when the first attempt finds no server (the client never reached one):
        a mesh that is not there is not resumed for ``resume_s``. A connection closed during its
        handshake is tried again for ``HANDSHAKE_RETRY_S`` first: a server overloaded by a storm
        of connections closes some, and a TLS port that a plaintext client dials (or the reverse)
        closes every one."""
        self.answered = False
        """A message came on this stream."""
        self._end = None if timeout is None else time.monotonic() + timeout
        self._broken_since: float | None = None
        self._attempts = 0

    def timeout(self) -> float | None:
        """The next attempt's deadline: what is left of the call's own."""
        return None if self._end is None else max(0.0, self._end - time.monotonic())

    def fresh(self, msg: gateway_pb2.GenerateResponse) -> list[GeneratedToken]:
        """The items of ``msg`` the caller has not seen."""
        self.answered = True
        items = [t for t in tokens_of(msg) if t.token_id is None or t.index >= self.next_index]
        for item in items:
            if item.token_id is not None:
                self.next_index = item.index + 1
                self._broken_since, self._attempts = None, 0
        return items

    def retry_in(self, err: grpc.RpcError) -> float:
        """After a failed attempt: seconds to wait before resuming; raises its StagemeshError when
        it is not to be resumed (not UNAVAILABLE, resuming off, or resuming for too long)."""
        now = time.monotonic()
        if self._broken_since is None:
            self._broken_since = now
        code = err.code() if hasattr(err, "code") else None
        over = now - self._broken_since >= self.resume_s or (self._end is not None and now >= self._end)
        if _handshake_failed(err):  # something answered and closed the connection: maybe again, maybe not
            first_try = now - self._broken_since >= HANDSHAKE_RETRY_S
        else:
            first_try = self._attempts == 0
        never_there = self.fail_fast and not self.answered and first_try and _no_connection(err)
        if code != grpc.StatusCode.UNAVAILABLE or over or never_there or _told_not_to_retry(err):
            raise error_from_rpc(err, address=self.address, timeout=self.call_timeout) from None
        self._attempts += 1
        self.request.resume_from = self.next_index
        first, longest = RESUME_BACKOFF_S
        return min(longest, first * 2 ** (self._attempts - 1))


def _told_not_to_retry(err: grpc.RpcError) -> bool:
    """The server's verdict is final: gRPC's negative ``grpc-retry-pushback-ms`` (the mesh
    already waited for a chain and gave up, say), as opposed to a stream that broke."""
    trailers = err.trailing_metadata() if hasattr(err, "trailing_metadata") else None
    for key, value in trailers or ():
        if key == "grpc-retry-pushback-ms":
            with contextlib.suppress(ValueError):
                return int(value) < 0
    return False


def assemble(tokens: Iterable[GeneratedToken], request_id: str | None) -> GenerateResult:
    """The GenerateResult of a whole stream of items."""
    ids, text, finish, rid, logprobs = [], [], None, request_id or "", []
    for tok in tokens:
        rid = tok.request_id or rid
        if tok.token_id is not None:
            ids.append(tok.token_id)
            logprobs.append(tok.logprobs)
        text.append(tok.text)
        finish = tok.finish_reason or finish
    asked = any(lp is not None for lp in logprobs)
    return GenerateResult(request_id=rid, token_ids=tuple(ids), text="".join(text), finish_reason=finish,
                          logprobs=tuple(lp or TokenLogprobs(None) for lp in logprobs) if asked else None)


def error_from_rpc(err: grpc.RpcError, *, address: str = "", timeout: float | None = None) -> StagemeshError:
    """The StagemeshError of a failed call (grpc.RpcError and grpc.aio.AioRpcError alike); gRPC's
    own texts for no server and for a passed deadline get what to check (``address``, ``timeout``)."""
    code = err.code() if hasattr(err, "code") else None
    details = err.details() if hasattr(err, "details") else None
    name = code.name if code is not None else "UNKNOWN"
    message = details or f"gateway call failed with {name}"
    if address and _no_connection(err):
        message = (f"no stagemesh server answers at {address}: is `stagemesh up` running there, and is that "
                   f"its client address (host:port)? ({details})")
        if "CERTIFICATE_VERIFY_FAILED" in (details or ""):
            message += "; its TLS certificate is not signed by a CA this client trusts: pass ca_file= (its CA, PEM)"
        elif _handshake_failed(err):
            message += "; its client port may speak TLS while this client does not, or the reverse: pass ca_file= " \
                       "(or tls=True) for a TLS port, neither for a plaintext one"
    elif name == "UNAUTHENTICATED" and "api_key" not in (details or ""):
        message = f"{details or 'the call was not authenticated'}: pass api_key= (or set ${ENV_KEY})"
    elif name == "DEADLINE_EXCEEDED" and timeout is not None and details in (None, "", "Deadline Exceeded"):
        message = (f"no answer within {timeout:g} s (the call's timeout); pass a larger timeout= "
                   "(or Client(timeout=...)) for longer generations")
    return error_for(name, message)


_NO_CONNECTION = ("failed to connect to all addresses", "errors resolving", "DNS resolution failed",
                  "Connection refused")
"""What gRPC says when nothing answers at the address (as opposed to a stream that broke)."""


def _handshake_failed(err: grpc.RpcError) -> bool:
    details = ((err.details() if hasattr(err, "details") else None) or "").lower()
    return any(text in details for text in ("handshake", "ssl", "tls", "socket closed", "connection reset"))


def _no_connection(err: grpc.RpcError) -> bool:
    code = err.code() if hasattr(err, "code") else None
    details = (err.details() if hasattr(err, "details") else None) or ""
    return code == grpc.StatusCode.UNAVAILABLE and any(text in details for text in _NO_CONNECTION)
