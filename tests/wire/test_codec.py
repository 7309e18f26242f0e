"""Round trips through stagemesh.wire.codec: tensors, step plans and results, sampling, errors, status."""

from __future__ import annotations

import subprocess
import sys
import warnings

import pytest
import torch

from stagemesh.errors import Cancelled, InvalidArgument, ResourceExhausted, StagemeshError
from stagemesh.serving.types import SampleSpec, SamplingParams, SeqChunk, StepPlan, StepResult, TokenLogprobs
from stagemesh.v1 import stage_pb2, tensor_pb2
from stagemesh.wire.codec import messages as codec
from stagemesh.wire.codec.tensors import dtype_name, tensor_from_pb, tensor_to_pb, torch_dtype

# --- tensors -------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16, torch.int64, torch.int32])
@pytest.mark.parametrize("shape", [(5, 3), (0, 4), (), (2, 0, 3), (7,)])
def test_tensor_round_trip(dtype, shape):
    t = (torch.randn(shape) * 100).to(dtype)
    msg = tensor_to_pb(t)
    assert msg.dtype == dtype_name(dtype) and list(msg.shape) == list(shape)
    assert len(msg.data) == t.numel() * t.element_size()
    back = tensor_from_pb(msg)
    assert back.dtype == dtype and back.shape == t.shape
    assert torch.equal(back, t)


def test_tensor_round_trip_survives_serialization():
    t = torch.randn(4, 8).to(torch.bfloat16)
    wire = tensor_to_pb(t).SerializeToString()
    assert torch.equal(tensor_from_pb(tensor_pb2.Tensor.FromString(wire)), t)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.int64])
def test_non_contiguous_inputs(dtype):
    base = torch.arange(48).reshape(4, 12).to(dtype)
    for t in (base.t(), base[:, ::3], base[1:3, 2:7], base[2:], base[1], base.unsqueeze(0).expand(3, 4, 12)):
        assert torch.equal(tensor_from_pb(tensor_to_pb(t)), t)


def test_bfloat16_bytes_are_the_raw_memory():
    t = torch.tensor([1.0, -2.0], dtype=torch.bfloat16)
    assert tensor_to_pb(t).data == bytes([0x80, 0x3F, 0x00, 0xC0])  # little-endian 0x3F80, 0xC000


def test_from_pb_is_silent_and_shares_the_message_bytes():
    msg = tensor_to_pb(torch.ones(3, 2))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        back = tensor_from_pb(msg)
    assert back.shape == (3, 2) and back.is_contiguous()
    assert torch.equal(back.clone().add_(1), torch.full((3, 2), 2.0))


def test_from_pb_is_silent_from_the_first_call_of_a_fresh_process():
    # torch warns about a read-only buffer once per process: in this test process some earlier
    # test may already have spent it, so the first call is made in a new interpreter.
    code = ("import torch; from stagemesh.wire.codec.tensors import tensor_from_pb, tensor_to_pb; "
            "assert tensor_from_pb(tensor_to_pb(torch.ones(2))).tolist() == [1.0, 1.0]")
    done = subprocess.run([sys.executable, "-W", "error", "-c", code], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr


def test_bytes_length_mismatch_is_a_value_error():
    msg = tensor_pb2.Tensor(data=b"\x00" * 10, dtype="float32", shape=[3])
    with pytest.raises(ValueError, match="needs 12 bytes, got 10"):
        tensor_from_pb(msg)


def test_unknown_dtype_and_negative_shape_are_value_errors():
    with pytest.raises(ValueError, match="unknown tensor dtype 'complex64'"):
        tensor_from_pb(tensor_pb2.Tensor(data=b"", dtype="complex64", shape=[0]))
    with pytest.raises(ValueError, match="negative dimension"):
        tensor_from_pb(tensor_pb2.Tensor(data=b"", dtype="float32", shape=[-1]))
    with pytest.raises(ValueError, match="cannot go on the wire"):
        tensor_to_pb(torch.zeros(2, dtype=torch.complex64))
    assert torch_dtype("bfloat16") is torch.bfloat16


# --- int64 columns, sampling ---------------------------------------------------------------


def test_pack_int64_round_trip():
    values = [0, 1, -1, 2**63 - 1, -(2**63), 151_645]
    msg = codec.pack_int64(values)
    assert (msg.dtype, list(msg.shape), len(msg.data)) == ("int64", [6], 48)
    assert list(codec.unpack_int64(msg)) == values
    assert torch.equal(tensor_from_pb(msg), torch.tensor(values))  # the same bytes torch reads


@pytest.mark.parametrize(
    "params",
    [
        SamplingParams(),
        SamplingParams(max_new_tokens=3, temperature=0.7, top_k=40, top_p=0.9, seed=0),
        SamplingParams(seed=2**40, stop_token_ids=(2, 32000), ignore_eos=True),
        SamplingParams(logprobs=True, top_logprobs=20),
    ],
)
def test_sampling_params_round_trip(params):
    assert codec.sampling_from_pb(codec.sampling_to_pb(params)) == params


def test_unset_sampling_fields_take_the_defaults():
    from stagemesh.v1 import sampling_pb2

    params = codec.sampling_from_pb(sampling_pb2.SamplingParams())
    assert params == SamplingParams()
    assert params.seed is None and params.max_new_tokens == 16 and params.top_p == 1.0


# --- StepPlan / StepResult -----------------------------------------------------------------


def _plan() -> StepPlan:
    return StepPlan(
        step_id=41,
        chunks=(
            SeqChunk(seq_id=7, start=0, token_ids=(1, 15043, 29892), sample=SampleSpec(
                temperature=0.8, top_k=50, top_p=0.95, seed=1234, index=0)),
            SeqChunk(seq_id=9, start=128, token_ids=tuple(range(300, 364))),  # mid-prompt prefill chunk
            SeqChunk(seq_id=3, start=17, token_ids=(2,), sample=SampleSpec(seed=2**62, index=5, logprobs=True,
                                                                           top_logprobs=4)),
        ),
        free=(1, 4),
    )


def test_step_plan_round_trip():
    plan = _plan()
    msg = codec.plan_to_pb(plan)
    assert list(msg.lengths) == [3, 64, 1] and list(msg.sample) == [True, False, True]
    assert len(msg.token_ids.data) == 8 * 68 and not msg.HasField("hidden")
    assert codec.plan_from_pb(stage_pb2.StageRequest.FromString(msg.SerializeToString())) == plan


def test_a_stage_before_the_last_reads_which_rows_sample_but_not_how():
    plan = _plan()
    unread = codec.plan_from_pb(codec.plan_to_pb(plan), specs=False)
    assert [c.sample for c in unread.chunks] == [codec.SPEC_NOT_READ, None, codec.SPEC_NOT_READ]
    assert [(c.seq_id, c.start, c.token_ids) for c in unread.chunks] == [(c.seq_id, c.start, c.token_ids)
                                                                          for c in plan.chunks]
    assert (unread.step_id, unread.free, unread.epoch) == (plan.step_id, plan.free, plan.epoch)
    msg = codec.plan_to_pb(plan)
    del msg.top_k[-1]  # the unread columns are still checked
    with pytest.raises(ValueError, match="'top_k' has 2 entries, seq_ids has 3"):
        codec.plan_from_pb(msg, specs=False)


def test_step_plan_carries_hidden_and_empty_plans():
    hidden = tensor_to_pb(torch.randn(68, 16))
    msg = codec.plan_to_pb(_plan(), hidden)
    assert torch.equal(tensor_from_pb(msg.hidden), tensor_from_pb(hidden))
    empty = StepPlan(step_id=0, chunks=(), free=(5,))
    assert codec.plan_from_pb(codec.plan_to_pb(empty)) == empty


def test_malformed_step_plans_are_value_errors():
    msg = codec.plan_to_pb(_plan())
    del msg.top_k[-1]
    with pytest.raises(ValueError, match="'top_k' has 2 entries, seq_ids has 3"):
        codec.plan_from_pb(msg)
    msg = codec.plan_to_pb(_plan())
    msg.lengths[0] = 4
    with pytest.raises(ValueError, match="token_ids has 68 ids, lengths add up to 69"):
        codec.plan_from_pb(msg)


def test_step_result_round_trip():
    result = StepResult(step_id=41, tokens={7: 3681, 3: 2})
    msg = codec.result_to_pb(result)
    assert codec.result_from_pb(stage_pb2.StageResponse.FromString(msg.SerializeToString())) == result
    # float32 on the wire: these values are exact in it
    with_logprobs = StepResult(41, {7: 3681, 3: 2},
                               {3: TokenLogprobs(-0.5, ((2, -0.5), (9, -1.25))), 7: TokenLogprobs(-3.0)})
    msg = codec.result_to_pb(with_logprobs)
    assert codec.result_from_pb(stage_pb2.StageResponse.FromString(msg.SerializeToString())) == with_logprobs
    msg.logprobs[5].logprob = -1.0
    with pytest.raises(ValueError, match=r"logprobs for sequences \[5\] it sampled no token for"):
        codec.result_from_pb(msg)


def test_failed_step_raises_its_error():
    msg = codec.failed_step_to_pb(41, ResourceExhausted("KV cache full: 0 of 512 blocks free"))
    assert msg.step_id == 41 and msg.error.code == "RESOURCE_EXHAUSTED"
    with pytest.raises(ResourceExhausted, match="KV cache full"):
        codec.result_from_pb(msg)


# --- errors --------------------------------------------------------------------------------


@pytest.mark.parametrize("err", [InvalidArgument("top_p must be in (0, 1], got 0"), Cancelled("client left")])
def test_error_round_trip(err):
    back = codec.error_from_pb(codec.error_to_pb(err))
    assert type(back) is type(err) and back.message == err.message and back.code == err.code


def test_foreign_exceptions_become_internal_and_unknown_codes_survive():
    back = codec.error_from_pb(codec.error_to_pb(RuntimeError("CUDA out of memory")))
    assert back.code == "INTERNAL" and back.message == "RuntimeError: CUDA out of memory"
    odd = codec.error_from_pb(tensor_pb2.Error(code="ABORTED", message="x"))
    assert type(odd) is StagemeshError and odd.code == "ABORTED"


# --- gateway messages ----------------------------------------------------------------------


def test_generate_request_round_trip():
    for inp in (
        codec.GenerateInput(prompt="Hello", params=SamplingParams(seed=0), request_id="r1"),
        codec.GenerateInput(token_ids=(1, 2, 3), params=SamplingParams(max_new_tokens=4, top_k=5)),
    ):
        assert codec.generate_request_from_pb(codec.generate_request_to_pb(inp)) == inp


def test_generate_request_needs_exactly_one_input():
    from stagemesh.v1 import gateway_pb2

    with pytest.raises(InvalidArgument, match="exactly one"):
        codec.generate_request_from_pb(gateway_pb2.GenerateRequest(request_id="r"))
    with pytest.raises(InvalidArgument, match="exactly one"):
        codec.GenerateInput(prompt="a", token_ids=(1,))


def test_generate_chunk_round_trip():
    for chunk in (
        codec.GenerateChunk("r1", (5, 6), 3, " wor", None),
        codec.GenerateChunk("r1", (), 5, "", "length"),
        codec.GenerateChunk("r1", (5, 6), 3, " wor", None, (TokenLogprobs(-0.25, ((5, -0.25),)), TokenLogprobs(None))),
    ):
        assert codec.chunk_from_pb(codec.chunk_to_pb(chunk)) == chunk
    unknown = codec.chunk_to_pb(codec.GenerateChunk("r1", (5,), 0, "", None, (None,)))  # not known: logprob unset
    assert codec.chunk_from_pb(unknown).logprobs == (TokenLogprobs(None),)


def test_status_document_round_trip():
    doc = {
        "chains": [{"id": 0, "healthy": True, "num_stages": 2, "requests_served": 12,
                    "requests_running": 1, "requests_waiting": 0}],
        "workers": [
            {"id": "stage-c0-s1", "role": "stage", "chain": 0, "stage": 1, "layers": [4, 8], "experts": {}, "address": "127.0.0.1:5001",
             "pid": 4242, "device": "cuda:1", "healthy": True, "tp_size": 2, "heartbeat_age_s": 0.5,
             "load": {"queue_depth": 2, "running_sequences": 3, "kv_blocks_used": 10, "kv_blocks_total": 512,
                      "busy_fraction": 0.25, "tokens_processed": 999, "step_latency_p50_s": 0.01,
                      "step_latency_p99_s": 0.05, "micro_batches_per_s": 40.0, "tokens_per_s": 320.0,
                      "bubble_fraction": 0.125, "bytes_sent": 123456}},
        ],
        "model": "tiny-llama",
        "version": "0.1.0",
        "bubble_fraction": 0.1,
    }
    assert codec.status_from_pb(codec.status_to_pb(doc)) == doc
    for cut in ([0, 2.5], [2.5, 5], [2.5, 3.5]):  # a boundary between a layer's attention and its MLP
        doc["workers"][0]["layers"] = cut
        assert codec.status_from_pb(codec.status_to_pb(doc))["workers"][0]["layers"] == cut
    partial = codec.status_from_pb(codec.status_to_pb({"workers": [{"role": "expert", "chain": -1, "experts": {"1": [0, 1]}}]}))
    assert partial["workers"][0]["layers"] == [0, 0] and partial["workers"][0]["load"]["queue_depth"] == 0
    with pytest.raises(ValueError, match=r"chain status has unknown keys \['colour'\]"):
        codec.status_to_pb({"chains": [{"id": 0, "colour": "red"}]})
    with pytest.raises(ValueError, match=r"worker load status has unknown keys \['qdepth'\]"):
        codec.status_to_pb({"workers": [{"role": "stage", "load": {"qdepth": 1}}]})


def test_an_expert_worker_keeps_its_experts_per_layer_and_its_per_expert_load():
    load = {"queue_depth": 1, "running_sequences": 0, "kv_blocks_used": 0, "kv_blocks_total": 0, "busy_fraction": 0.5,
            "tokens_processed": 12, "step_latency_p50_s": 0.0, "step_latency_p99_s": 0.0, "micro_batches_per_s": 0.0,
            "tokens_per_s": 0.0, "bubble_fraction": 0.0, "bytes_sent": 0, "expert_tokens": {"0:0": 5, "3:1": 7}}
    worker = {"id": "expert-c0-e1", "role": "expert", "chain": 0, "stage": -1, "layers": [0, 4], "experts": {"0": [0, 2], "3": [1]},
              "address": "127.0.0.1:5009", "pid": 7, "device": "cpu", "healthy": True, "tp_size": 1,
              "heartbeat_age_s": 0.0, "load": load}
    msg = codec.status_to_pb({"workers": [worker]})
    assert list(msg.workers[0].experts) == [0, 1, 2], "the flat field holds every expert held in any layer"
    assert codec.status_from_pb(msg)["workers"] == [worker]
