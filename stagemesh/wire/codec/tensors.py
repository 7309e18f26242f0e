"""torch.Tensor <-> ``stagemesh.v1.Tensor``: raw bytes with dtype and shape, no per-element encoding.

NOTE: the wire carries the bytes of a contiguous tensor as they lie in memory: row-major and
little-endian (every platform torch ships for is little-endian). Sending copies the tensor
once into the ``bytes`` field; receiving wraps the message's bytes with ``torch.frombuffer``
without a copy.
"""

from __future__ import annotations

import ctypes
import math
import warnings

import torch

from stagemesh.v1 import tensor_pb2

_DTYPES: dict[str, torch.dtype] = {
    "float32": torch.float32,
    "bfloat16": torch.bfloat16,
    "float16": torch.float16,
    "float64": torch.float64,
    "int64": torch.int64,
    "int32": torch.int32,
    "int16": torch.int16,
    "int8": torch.int8,
    "uint8": torch.uint8,
    "bool": torch.bool,
}
_NAMES: dict[torch.dtype, str] = {dtype: name for name, dtype in _DTYPES.items()}


def dtype_name(dtype: torch.dtype) -> str:
    """The wire name of a torch dtype, e.g. ``torch.bfloat16`` -> ``"bfloat16"``."""
    name = _NAMES.get(dtype)
    if name is None:
        raise ValueError(f"dtype {dtype} cannot go on the wire; supported: {', '.join(_DTYPES)}")
    return name


def torch_dtype(name: str) -> torch.dtype:
    """The torch dtype of a wire name, e.g. ``"bfloat16"`` -> ``torch.bfloat16``."""
    dtype = _DTYPES.get(name)
    if dtype is None:
        raise ValueError(f"unknown tensor dtype {name!r}; supported: {', '.join(_DTYPES)}")
    return dtype


def tensor_to_pb(t: torch.Tensor) -> tensor_pb2.Tensor:
    """The wire form of ``t`` (any device, any layout: it is moved to CPU and made contiguous)."""
    name = dtype_name(t.dtype)
    t = t.detach().cpu().contiguous()
    return tensor_pb2.Tensor(data=_raw_bytes(t), dtype=name, shape=list(t.shape))


def _raw_bytes(t: torch.Tensor) -> bytes:
    """One copy of a contiguous CPU tensor's memory, whatever its dtype (bfloat16 included).

    NOTE: ``ctypes.string_at`` reads ``nbytes`` from the first element's address; it avoids
    numpy (which has no bfloat16) and a per-element walk of the storage.
    """
    nbytes = t.numel() * t.element_size()
    return ctypes.string_at(t.data_ptr(), nbytes) if nbytes else b""


def tensor_from_pb(msg: tensor_pb2.Tensor) -> torch.Tensor:
    """The tensor a ``Tensor`` message holds, on CPU, without copying its bytes.

    The result shares memory with the message's immutable ``bytes``: treat it as read-only
    (in-place ops would write into a Python ``bytes`` object). ``.clone()`` it, or move it to
    another device or dtype, before modifying it. Raises ValueError on an unknown dtype, a
    negative dimension, or a byte count that is not ``product(shape) * itemsize``.
    """
    dtype = torch_dtype(msg.dtype)
    shape = tuple(msg.shape)
    if any(d < 0 for d in shape):
        raise ValueError(f"tensor shape {list(shape)} has a negative dimension")
    expected = math.prod(shape) * dtype.itemsize
    data = msg.data
    if len(data) != expected:
        raise ValueError(
            f"tensor of dtype {msg.dtype} and shape {list(shape)} needs {expected} bytes, got {len(data)}"
        )
    if expected == 0:  # torch.frombuffer refuses an empty buffer
        return torch.empty(shape, dtype=dtype)
    return torch.frombuffer(data, dtype=dtype).view(shape)


def _warn_once_about_read_only_buffers_now() -> None:
    """Spend, here and silenced, the one warning torch gives per process for a read-only buffer
    (the docstring of ``tensor_from_pb`` says how to treat such a tensor).

    NOTE: why not silence each call (``warnings.catch_warnings`` around ``torch.frombuffer``):
    torch warns about it once per process (``TORCH_WARN_ONCE``), and the context manager cost
    6–13 µs a call for nothing after the first (15 µs a [128, 64] tensor against 2 µs for
    ``frombuffer`` itself, ``timeit``, one core), twice a step on every stage; it also changes
    the process's warning filters under the other threads' feet, which Python documents as not
    thread-safe."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="The given buffer is not writable", category=UserWarning)
        torch.frombuffer(b"\0", dtype=torch.uint8)


_warn_once_about_read_only_buffers_now()
