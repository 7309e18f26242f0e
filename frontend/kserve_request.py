"""A KServe v2 inference request in the tensor names of Triton's vLLM backend, read into what the
mesh takes: the prompt text, the sampling parameters and how to answer.

Inputs: ``text_input`` (BYTES, one element), ``stream`` or ``streaming`` (BOOL),
``sampling_parameters`` (BYTES: a JSON object in vLLM's names), ``exclude_input_in_output``
(BOOL), and the backend's ``return_*`` flags (accepted; every output is always there).
Outputs: ``text_output`` (BYTES), ``finish_reason`` (BYTES), ``num_input_tokens`` and
``num_output_tokens`` (INT32).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

from frontend.kserve_tensors import read_inputs
from stagemesh.errors import InvalidArgument
from stagemesh.inference import grpc_service_pb2 as pb
from stagemesh.serving.params import KINDS, NAMES, SamplingParams, with_values

INPUTS = {"text_input": "BYTES", "stream": "BOOL", "streaming": "BOOL", "sampling_parameters": "BYTES",
          "exclude_input_in_output": "BOOL", "return_finish_reason": "BOOL", "return_num_input_tokens": "BOOL",
          "return_num_output_tokens": "BOOL"}
"""Input name -> its datatype."""
OUTPUTS = {"text_output": "BYTES", "finish_reason": "BYTES", "num_input_tokens": "INT32",
           "num_output_tokens": "INT32"}
"""Output name -> its datatype."""
RENAMED = {"max_tokens": "max_new_tokens"}
"""vLLM's sampling parameter names that differ from ``SamplingParams``'s."""
NEUTRAL = {"n": 1, "best_of": 1, "presence_penalty": 0, "frequency_penalty": 0, "repetition_penalty": 1}
"""vLLM parameters the mesh does not have, accepted at the value that leaves sampling as it is."""


@dataclass(frozen=True)
class InferInput:
    """What one ``ModelInferRequest`` asks for."""

    text: str
    """The prompt (``text_input``)."""
    params: SamplingParams
    """From ``sampling_parameters``; unset ones keep ``SamplingParams``'s defaults (16 tokens, greedy)."""
    stream: bool = False
    """One response per chunk of tokens (``ModelStreamInfer`` only), else one with the whole text."""
    exclude_input: bool = False
    """Leave the prompt out of a whole answer's ``text_output`` (vLLM's default puts it first)."""
    outputs: tuple[str, ...] = tuple(OUTPUTS)
    """The outputs to send, in this order."""


def parse_infer(request: pb.ModelInferRequest) -> InferInput:
    """InvalidArgument, naming the tensor and what to send instead, when an input is wrong."""
    values = read_inputs(request)
    for tensor in request.inputs:
        expected = INPUTS.get(tensor.name)
        if expected is None:
            raise InvalidArgument(f"unknown input {tensor.name!r}; known: {', '.join(INPUTS)}")
        if tensor.datatype != expected:
            raise InvalidArgument(f"input {tensor.name!r} must be {expected}, not {tensor.datatype}")
    if "text_input" not in values:
        raise InvalidArgument("the input text_input (BYTES, the prompt) is missing")
    stream_flag = "stream" if "stream" in values else "streaming"
    return InferInput(
        text=_text(_single(values, "text_input", b"")),
        params=parse_sampling(_single(values, "sampling_parameters", b"{}")),
        stream=bool(_single(values, stream_flag, False)),
        exclude_input=bool(_single(values, "exclude_input_in_output", False)),
        outputs=_outputs(request),
    )


def _single(values: dict[str, list[Any]], name: str, default: Any) -> Any:
    if name not in values:
        return default
    if len(values[name]) != 1:
        raise InvalidArgument(f"input {name!r} has {len(values[name])} elements; send exactly one "
                              "(one prompt per request: send several requests for a batch)")
    return values[name][0]


def _text(data: bytes) -> str:
    try:
        return data.decode()
    except UnicodeDecodeError as err:
        raise InvalidArgument(f"text_input is not UTF-8 ({err.reason} at byte {err.start})") from None


def _outputs(request: pb.ModelInferRequest) -> tuple[str, ...]:
    names = tuple(out.name for out in request.outputs)
    for name in names:
        if name not in OUTPUTS:
            raise InvalidArgument(f"unknown output {name!r} requested; known: {', '.join(OUTPUTS)}")
    return names or tuple(OUTPUTS)


def parse_sampling(data: bytes | str) -> SamplingParams:
    """``sampling_parameters`` -> ``SamplingParams``. Values may be JSON numbers or strings of
    them (Triton's examples send ``{"temperature": "0.1"}``); vLLM's ``top_k=-1`` is "off" (0)."""
    try:
        raw = json.loads(data)
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise InvalidArgument(f"sampling_parameters is not JSON ({err}); send a JSON object such as "
                              '{"max_tokens": 32, "temperature": 0}') from None
    if not isinstance(raw, dict):
        raise InvalidArgument(f"sampling_parameters must be a JSON object, not {type(raw).__name__}")
    values = {}
    for key, value in raw.items():
        if key in NEUTRAL:
            _check_neutral(key, value)
            continue
        name = RENAMED.get(key, key)
        if name not in NAMES or name == "max_new_tokens" and key != "max_tokens":
            known = sorted({*(k for k in NAMES if k != "max_new_tokens"), *RENAMED, *NEUTRAL})
            raise InvalidArgument(f"sampling_parameters: unknown parameter {key!r}; known: {', '.join(known)}")
        values[name] = _coerce(key, value, KINDS[name])
    if values.get("top_k") == -1:
        values["top_k"] = 0
    return with_values(SamplingParams(), values, "sampling_parameters")


def _check_neutral(key: str, value: Any) -> None:
    if _coerce(key, value, float) != NEUTRAL[key]:
        raise InvalidArgument(f"sampling_parameters: {key}={value!r} is not supported by this server; "
                              f"leave it out or send {NEUTRAL[key]}")


def _coerce(key: str, value: Any, kind: type) -> Any:
    """A string of a number or a boolean -> the value; anything else is left to validation."""
    if not isinstance(value, str):
        return value
    try:
        if kind is bool:
            return {"true": True, "false": False}[value.strip().lower()]
        if kind is tuple:
            return json.loads(value)
        return kind(value)
    except (KeyError, ValueError, json.JSONDecodeError):
        raise InvalidArgument(f"sampling_parameters: {key}={value!r} is not a valid {kind.__name__}") from None
