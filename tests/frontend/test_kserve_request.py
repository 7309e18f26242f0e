"""Triton vLLM-backend inputs -> the mesh's request: tensors, sampling_parameters, and errors."""

from __future__ import annotations

import json

import pytest

from frontend.kserve_request import OUTPUTS, parse_infer, parse_sampling
from frontend.kserve_tensors import pack_bytes
from stagemesh.errors import InvalidArgument
from stagemesh.inference import grpc_service_pb2 as pb
from stagemesh.serving.params import SamplingParams


def infer_request(text="hi", outputs=(), model="tiny", **inputs) -> pb.ModelInferRequest:
    """``text_input`` and any other inputs as raw contents (BOOL for bools, BYTES for the rest)."""
    request = pb.ModelInferRequest(model_name=model)
    for name, value in {"text_input": text, **inputs}.items():
        if isinstance(value, bool):
            request.inputs.add(name=name, datatype="BOOL", shape=[1])
            request.raw_input_contents.append(bytes([value]))
        else:
            request.inputs.add(name=name, datatype="BYTES", shape=[1])
            data = value if isinstance(value, (str, bytes)) else json.dumps(value)
            request.raw_input_contents.append(pack_bytes([data]))
    for name in outputs:
        request.outputs.add(name=name)
    return request


def test_defaults_are_vllms():
    inp = parse_infer(infer_request("héllo"))
    assert (inp.text, inp.stream, inp.exclude_input, inp.outputs) == ("héllo", False, False, tuple(OUTPUTS))
    assert inp.params == SamplingParams()  # 16 tokens, greedy: vLLM's defaults too


def test_every_input():
    inp = parse_infer(infer_request(stream=True, exclude_input_in_output=True, outputs=["text_output"],
                                    sampling_parameters={"max_tokens": 8, "temperature": 0.5, "seed": 3}))
    assert inp.stream and inp.exclude_input and inp.outputs == ("text_output",)
    assert (inp.params.max_new_tokens, inp.params.temperature, inp.params.seed) == (8, 0.5, 3)


def test_streaming_is_accepted_for_stream():
    assert parse_infer(infer_request(streaming=True)).stream


def test_sampling_parameters_in_vllm_names_and_as_strings():
    params = parse_sampling(json.dumps({
        "max_tokens": "12", "temperature": "0.1", "top_p": "0.95", "top_k": -1, "min_p": 0.05, "seed": 7,
        "stop_token_ids": [2, 3], "ignore_eos": "true", "n": 1, "presence_penalty": 0}))
    assert params == SamplingParams(max_new_tokens=12, temperature=0.1, top_p=0.95, top_k=0, min_p=0.05, seed=7,
                                    stop_token_ids=(2, 3), ignore_eos=True)


@pytest.mark.parametrize("data, match", [
    ("{not json", "not JSON"),
    ("[1]", "must be a JSON object"),
    ('{"stop": ["x"]}', "unknown parameter 'stop'; known: .*max_tokens"),
    ('{"max_new_tokens": 3}', "unknown parameter 'max_new_tokens'"),
    ('{"n": 2}', "n=2 is not supported"),
    ('{"temperature": "warm"}', "temperature='warm' is not a valid float"),
    ('{"stop_token_ids": "x"}', "stop_token_ids='x' is not a valid tuple"),
])
def test_bad_sampling_parameters_say_what_to_fix(data, match):
    with pytest.raises(InvalidArgument, match=match):
        parse_sampling(data)


def test_bad_inputs_say_what_to_fix():
    with pytest.raises(InvalidArgument, match="text_input .* is missing"):
        parse_infer(pb.ModelInferRequest(model_name="m"))
    with pytest.raises(InvalidArgument, match="unknown input 'prompt'; known: text_input"):
        parse_infer(infer_request(prompt="x"))
    with pytest.raises(InvalidArgument, match="'stream' must be BOOL, not BYTES"):
        parse_infer(infer_request(stream="true"))
    with pytest.raises(InvalidArgument, match="unknown output 'logits'"):
        parse_infer(infer_request(outputs=["logits"]))
    with pytest.raises(InvalidArgument, match="not UTF-8"):
        parse_infer(infer_request(text=b"\xff"))


def test_one_prompt_per_request():
    request = pb.ModelInferRequest(model_name="m", raw_input_contents=[pack_bytes(["a", "b"])])
    request.inputs.add(name="text_input", datatype="BYTES", shape=[2])
    with pytest.raises(InvalidArgument, match="2 elements; send exactly one"):
        parse_infer(request)
