"""The one place where protobuf messages become domain objects and tensors, and back.

``stagemesh.wire.codec.messages`` is torch-free (the gateway and the SDK use it) and is
re-exported here; ``stagemesh.wire.codec.tensors`` needs torch (workers use it), so its names load
it on first use and importing this package never imports torch.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from stagemesh.wire.codec.messages import *  # noqa: F403
from stagemesh.wire.codec.messages import __all__ as _MESSAGES_ALL

_TENSORS_ALL = ["tensor_to_pb", "tensor_from_pb", "dtype_name", "torch_dtype"]
__all__ = _MESSAGES_ALL + _TENSORS_ALL

if TYPE_CHECKING:
    from stagemesh.wire.codec.tensors import dtype_name, tensor_from_pb, tensor_to_pb, torch_dtype  # noqa: F401


def __getattr__(name: str) -> Any:
    if name in _TENSORS_ALL:
        from stagemesh.wire.codec import tensors

        return getattr(tensors, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
