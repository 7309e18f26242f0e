"""KServe v2 tensor packing: raw BYTES framing, raw numbers, contents, and what is refused."""

from __future__ import annotations

import struct

import pytest

from frontend.kserve_tensors import add_output, pack_bytes, read_inputs, unpack_bytes
from stagemesh.errors import InvalidArgument
from stagemesh.inference import grpc_service_pb2 as pb


def test_bytes_elements_are_a_little_endian_length_then_the_bytes():
    data = pack_bytes(["hé", b"", b"\x00x"])
    # "hé" is 3 UTF-8 bytes: 03 00 00 00 'h' c3 a9; then an empty element; then 2 bytes
    assert data == b"\x03\x00\x00\x00h\xc3\xa9" + b"\x00\x00\x00\x00" + b"\x02\x00\x00\x00\x00x"
    assert unpack_bytes(data) == ["hé".encode(), b"", b"\x00x"]


@pytest.mark.parametrize("data", [b"\x03\x00", b"\x05\x00\x00\x00abc"])
def test_truncated_bytes_contents_are_refused(data):
    with pytest.raises(InvalidArgument, match="'text_input'"):
        unpack_bytes(data, "text_input")


def _request(*tensors, raw=()):
    request = pb.ModelInferRequest(model_name="m", raw_input_contents=list(raw))
    for name, datatype, shape, contents in tensors:
        request.inputs.add(name=name, datatype=datatype, shape=shape, contents=contents)
    return request


def test_raw_inputs_as_tritonclient_sends_them():
    request = _request(("text_input", "BYTES", [1], None), ("stream", "BOOL", [1], None),
                       ("ids", "INT32", [2], None),
                       raw=[pack_bytes(["hi"]), b"\x01", struct.pack("<2i", 7, -1)])
    assert read_inputs(request) == {"text_input": [b"hi"], "stream": [True], "ids": [7, -1]}


def test_inputs_in_contents():
    request = _request(("text_input", "BYTES", [1, 1], pb.InferTensorContents(bytes_contents=[b"hi"])),
                       ("stream", "BOOL", [1], pb.InferTensorContents(bool_contents=[False])))
    assert read_inputs(request) == {"text_input": [b"hi"], "stream": [False]}


def test_a_shape_that_does_not_match_the_data_is_refused():
    request = _request(("text_input", "BYTES", [2], None), raw=[pack_bytes(["one"])])
    with pytest.raises(InvalidArgument, match=r"shape \[2\] but 1 element"):
        read_inputs(request)


def test_raw_contents_must_be_one_per_input():
    request = _request(("a", "BOOL", [1], None), ("b", "BOOL", [1], None), raw=[b"\x01"])
    with pytest.raises(InvalidArgument, match="1 entries for 2 inputs"):
        read_inputs(request)


def test_an_unknown_datatype_is_refused():
    with pytest.raises(InvalidArgument, match="datatype 'STRING'"):
        read_inputs(_request(("text_input", "STRING", [1], None)))


def test_outputs_are_one_dimensional_raw_tensors():
    response = pb.ModelInferResponse()
    add_output(response, "text_output", "BYTES", ["ok"])
    add_output(response, "num_output_tokens", "INT32", [5])
    assert [(o.name, o.datatype, list(o.shape)) for o in response.outputs] == [
        ("text_output", "BYTES", [1]), ("num_output_tokens", "INT32", [1])]
    assert list(response.raw_output_contents) == [b"\x02\x00\x00\x00ok", struct.pack("<i", 5)]
