"""KServe v2 tensors <-> Python values: the inputs of a ``ModelInferRequest`` read into lists,
the outputs of a ``ModelInferResponse`` written as raw contents (Triton's own way, which every
client reads).

NOTE: a tensor's elements come either in its ``contents`` (one repeated field per datatype) or
in the request's ``raw_input_contents`` entry at the input's position (tritonclient sends them
so). Raw BYTES elements are each a 4-byte little-endian length and the bytes; raw numbers are
little-endian in row-major order.
"""

from __future__ import annotations

import struct
from collections.abc import Sequence
from typing import Any

from stagemesh.errors import InvalidArgument
from stagemesh.inference import grpc_service_pb2 as pb

RAW_FORMATS = {"BOOL": "?", "INT8": "b", "INT16": "h", "INT32": "i", "INT64": "q", "UINT8": "B", "UINT16": "H",
               "UINT32": "I", "UINT64": "Q", "FP32": "f", "FP64": "d"}
"""Datatype -> its ``struct`` format letter (little-endian, as the protocol sends raw numbers)."""
CONTENTS_FIELDS = {"BOOL": "bool_contents", "INT8": "int_contents", "INT16": "int_contents",
                   "INT32": "int_contents", "INT64": "int64_contents", "UINT8": "uint_contents",
                   "UINT16": "uint_contents", "UINT32": "uint_contents", "UINT64": "uint64_contents",
                   "FP32": "fp32_contents", "FP64": "fp64_contents", "BYTES": "bytes_contents"}
"""Datatype -> the ``InferTensorContents`` field that holds its elements."""


def read_inputs(request: pb.ModelInferRequest) -> dict[str, list[Any]]:
    """Every input's elements by name (BYTES as ``bytes``); InvalidArgument when a tensor's
    datatype is unknown, its data is missing or does not match its shape."""
    raw = request.raw_input_contents
    if raw and len(raw) != len(request.inputs):
        raise InvalidArgument(f"raw_input_contents has {len(raw)} entries for {len(request.inputs)} inputs; "
                              "send one per input, in order, or put every input's data in its contents")
    values = {}
    for i, tensor in enumerate(request.inputs):
        if tensor.datatype not in CONTENTS_FIELDS:
            raise InvalidArgument(f"input {tensor.name!r} has datatype {tensor.datatype!r}; "
                                  f"known: {', '.join(CONTENTS_FIELDS)}")
        if raw:
            elements = _unpack_raw(tensor, raw[i])
        else:
            elements = list(getattr(tensor.contents, CONTENTS_FIELDS[tensor.datatype]))
        if len(elements) != _count(tensor.shape):
            raise InvalidArgument(f"input {tensor.name!r} has shape {list(tensor.shape)} but {len(elements)} "
                                  "element(s); make the shape match the data")
        values[tensor.name] = elements
    return values


def _count(shape: Sequence[int]) -> int:
    n = 1
    for dim in shape:
        n *= dim
    return n


def _unpack_raw(tensor: pb.ModelInferRequest.InferInputTensor, data: bytes) -> list[Any]:
    if tensor.datatype == "BYTES":
        return unpack_bytes(data, tensor.name)
    letter = RAW_FORMATS[tensor.datatype]
    size = struct.calcsize(letter)
    if len(data) % size:
        raise InvalidArgument(f"input {tensor.name!r}: {len(data)} raw bytes is not a whole number of "
                              f"{tensor.datatype} elements ({size} bytes each)")
    return list(struct.unpack(f"<{len(data) // size}{letter}", data))


def unpack_bytes(data: bytes, name: str = "tensor") -> list[bytes]:
    """Raw BYTES contents -> its elements."""
    out, at = [], 0
    while at < len(data):
        if at + 4 > len(data):
            raise InvalidArgument(f"input {name!r}: raw BYTES contents end inside an element's 4-byte length")
        (length,) = struct.unpack_from("<I", data, at)
        at += 4
        if at + length > len(data):
            raise InvalidArgument(f"input {name!r}: a BYTES element of {length} bytes runs past the contents")
        out.append(data[at:at + length])
        at += length
    return out


def pack_bytes(elements: Sequence[bytes | str]) -> bytes:
    """BYTES elements -> raw contents (a str is sent as UTF-8)."""
    parts = []
    for element in elements:
        data = element.encode() if isinstance(element, str) else element
        parts.append(struct.pack("<I", len(data)) + data)
    return b"".join(parts)


def add_output(response: pb.ModelInferResponse, name: str, datatype: str, elements: Sequence[Any]) -> None:
    """Append a 1-D output tensor of ``elements`` to ``response`` (its data as raw contents)."""
    response.outputs.add(name=name, datatype=datatype, shape=[len(elements)])
    if datatype == "BYTES":
        data = pack_bytes(elements)
    else:
        data = struct.pack(f"<{len(elements)}{RAW_FORMATS[datatype]}", *elements)
    response.raw_output_contents.append(data)
