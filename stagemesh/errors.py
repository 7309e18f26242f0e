"""The one error type callers see, server side and client side alike.

Each error carries a gRPC status code *name* (a plain string, so this module imports no
grpc) and a message that says what to fix. The gateway turns it into a gRPC status; the SDK
turns a gRPC status back into it; the in-process CLI prints ``CODE: message``.
"""

from __future__ import annotations


class StagemeshError(Exception):
    """A request failed. ``code`` is a gRPC status code name such as ``INVALID_ARGUMENT``."""

    code = "UNKNOWN"

    def __init__(self, message: str, code: str | None = None):
        super().__init__(message)
        self.message = message
        if code is not None:
            self.code = code

    def __str__(self) -> str:
        return f"{self.code}: {self.message}"


class InvalidArgument(StagemeshError):
    """The request itself is wrong (empty prompt, unknown token id, bad sampling values, ...)."""

    code = "INVALID_ARGUMENT"


class ResourceExhausted(StagemeshError):
    """The request can never fit the KV-cache budget, or the queue is full."""

    code = "RESOURCE_EXHAUSTED"


class Unavailable(StagemeshError):
    """No healthy chain can serve the request."""

    code = "UNAVAILABLE"


class Cancelled(StagemeshError):
    """The request was cancelled; its KV cache has been freed."""

    code = "CANCELLED"


class DeadlineExceeded(StagemeshError):
    """The request's deadline passed before it finished."""

    code = "DEADLINE_EXCEEDED"


class Unauthenticated(StagemeshError):
    """The call carried no API key, or one the mesh does not accept (``api_key=`` / ``STAGEMESH_API_KEY``)."""

    code = "UNAUTHENTICATED"


class Internal(StagemeshError):
    """A bug or a broken deployment; the message says which part failed."""

    code = "INTERNAL"


_BY_CODE = {
    cls.code: cls
    for cls in (InvalidArgument, ResourceExhausted, Unavailable, Cancelled, DeadlineExceeded, Unauthenticated, Internal)
}


def error_for(code: str, message: str) -> StagemeshError:
    """The most specific error class for a status code name."""
    cls = _BY_CODE.get(code)
    return cls(message) if cls is not None else StagemeshError(message, code)
