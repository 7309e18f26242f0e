"""Sampling parameters are declared once (``serving.params``): every copy is derived from the fields."""

from __future__ import annotations

import dataclasses
import json

import pytest

from stagemesh.cli.commands import build_parser
from stagemesh.cli.requests_io import read_inputs, sampling_from_args
from stagemesh.client._common import generate_request
from stagemesh.errors import InvalidArgument
from stagemesh.model.sampling import SamplingBatch
from stagemesh.serving.params import NAMES, PARAMS, SAMPLE_FIELDS, Bounds, SampleSpec, SamplingParams, sample_spec
from stagemesh.v1 import sampling_pb2, stage_pb2

CHANGED = SamplingParams(
    max_new_tokens=5, temperature=0.5, top_k=7, top_p=0.8, min_p=0.1, seed=3, stop_token_ids=(4, 9), ignore_eos=True,
    logprobs=True, top_logprobs=3,
)
"""Every field off its default, so a field the copies miss shows up as a default."""


def test_every_field_is_changed_by_the_fixture_above():
    assert all(getattr(CHANGED, f.name) != f.default for f in PARAMS)


def test_the_proto_mirrors_the_fields():
    proto = sampling_pb2.SamplingParams.DESCRIPTOR.fields_by_name
    assert set(NAMES) <= set(proto), set(NAMES) - set(proto)
    for f in PARAMS:  # a field whose default is not the proto's zero must know when it is unset
        if f.default is None or f.default:
            assert proto[f.name].has_presence, f"sampling.proto: make {f.name} optional"


def test_every_sample_spec_field_is_a_stage_request_column_and_a_sampler_tensor():
    columns = stage_pb2.StageRequest.DESCRIPTOR.fields_by_name
    assert all(columns[name].is_repeated for name in SAMPLE_FIELDS)
    assert [f.name for f in dataclasses.fields(SampleSpec)] == list(SAMPLE_FIELDS)
    # what asks for something back (logprobs) the stage runner reads from the specs, not as tensors
    assert {f.name for f in dataclasses.fields(SamplingBatch)} == set(SAMPLE_FIELDS) - {"logprobs", "top_logprobs"}
    spec = sample_spec(CHANGED, seed=11, index=2)
    assert (spec.temperature, spec.top_k, spec.top_p, spec.min_p, spec.seed) == (0.5, 7, 0.8, 0.1, 11)
    assert (spec.logprobs, spec.top_logprobs) == (True, 3)


def test_sdk_keywords_are_the_fields():
    sent = generate_request([1, 2], None, request_id=None, **dataclasses.asdict(CHANGED))
    assert sent.params.min_p == pytest.approx(0.1) and list(sent.params.stop_token_ids) == [4, 9]
    with pytest.raises(InvalidArgument, match="generate: unknown sampling parameter 'min_pp'; known: max_new_tokens"):
        generate_request([1, 2], None, request_id=None, min_pp=0.1)


def test_cli_flags_and_jsonl_keys_are_the_fields(tmp_path):
    flags = ["--max-new-tokens", "5", "--temperature", "0.5", "--top-k", "7", "--top-p", "0.8", "--min-p", "0.1",
             "--seed", "3", "--stop-token-ids", "4,9", "--ignore-eos", "--logprobs", "--top-logprobs", "3"]
    args = build_parser().parse_args(["generate", "--addr", "x:1", "--token-ids", "1", *flags])
    assert sampling_from_args(args) == CHANGED
    line = {"token_ids": [1], **dataclasses.asdict(CHANGED)}
    path = tmp_path / "in.jsonl"
    path.write_text(json.dumps(line) + '\n{"token_ids": [2], "min_p": 0.3}\n')
    first, second = read_inputs(None, None, str(path), SamplingParams())
    assert first.params == CHANGED and second.params == SamplingParams(min_p=0.3)
    path.write_text('{"token_ids": [1], "minp": 0.3}\n')
    with pytest.raises(InvalidArgument, match="line 1 of --input: unknown sampling parameter 'minp'"):
        read_inputs(None, None, str(path), SamplingParams())


@pytest.mark.parametrize(
    "bounds, text",
    [(Bounds(0), ">= 0"), (Bounds(0, low_open=True), "> 0"), (Bounds(0, 1, low_open=True), "in (0, 1]"),
     (Bounds(0, 2**63, high_open=True), "in [0, 2**63)"), (Bounds(high=1.5), "<= 1.5")],
)
def test_bounds_say_what_they_accept(bounds, text):
    assert str(bounds) == text
