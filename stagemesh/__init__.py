"""stagemesh: serve dense and MoE language models across many GPUs as a gRPC mesh.

The public SDK::

    from stagemesh import Client
    with Client("localhost:50051") as client:
        print(client.generate("Hello", max_new_tokens=8).text)

Importing ``stagemesh`` never imports torch. The client classes load on first use, so the
model and worker packages under ``stagemesh.`` do not pull grpc in through this file.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from stagemesh.errors import (
    Cancelled,
    DeadlineExceeded,
    Internal,
    InvalidArgument,
    ResourceExhausted,
    StagemeshError,
    Unauthenticated,
    Unavailable,
)

__version__ = "0.1.0"

_CLIENT_NAMES = ("AsyncClient", "Client", "GeneratedToken", "GenerateResult", "TokenLogprobs")

__all__ = [
    *_CLIENT_NAMES,
    "Cancelled",
    "DeadlineExceeded",
    "Internal",
    "InvalidArgument",
    "ResourceExhausted",
    "StagemeshError",
    "Unauthenticated",
    "Unavailable",
    "__version__",
]

if TYPE_CHECKING:
    from stagemesh.client import AsyncClient, Client, GeneratedToken, GenerateResult, TokenLogprobs  # noqa: F401


def __getattr__(name: str) -> Any:
    # NOTE: lazy (PEP 562): `import stagemesh.model` runs this file too, and the model core
    # must not import grpc or protobuf.
    if name in _CLIENT_NAMES:
        import stagemesh.client

        return getattr(stagemesh.client, name)
    raise AttributeError(f"module 'stagemesh' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
