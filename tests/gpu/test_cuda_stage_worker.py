"""Stage workers on ``cuda:0`` as real processes: a 5-layer llama split in two stages that share
the GPU (hidden states leave one process's GPU over gRPC and land on the other's), a real
redis-server holding the topology. Their tokens are the in-process chain's on the same GPU,
and in float32 transformers' greedy tokens (teacher-forced)."""

from __future__ import annotations

import contextlib
import json
import uuid

import pytest

from stagemesh.config import ModelConfig
from stagemesh.deploy.redis_server import free_port
from stagemesh.mesh.layout import split_layers
from stagemesh.mesh.topology import Topology
from stagemesh.runners.local import LocalChain
from stagemesh.wire.codec.messages import plan_to_pb, result_from_pb
from tests.checkpoints import hf_model, make_hf_checkpoint, teacher_forcing_check
from tests.gpu.runs import BLOCK_SIZE, FLOAT32_TOL, KV_BLOCKS, greedy, prompts
from tests.stage_worker.test_service import Mesh, _info, _store_call, forward_stream

pytestmark = [pytest.mark.gpu, pytest.mark.slow]

NUM_LAYERS, NEW_TOKENS = 5, 8


def cuda_topology(model_dir, addresses: list[str], dtype: str) -> Topology:
    """Every stage of ``split_layers`` on ``cuda:0``, with the KV blocks the workers are started with."""
    specs = split_layers(ModelConfig.from_dir(model_dir), len(addresses))
    stages = [
        {"stage": s, "start_layer": spec.start_layer, "end_layer": spec.end_layer, "address": address,
         "mlp_only_start": spec.mlp_only_start, "attn_only_end": spec.attn_only_end, "devices": ["cuda:0"]}
        for s, (spec, address) in enumerate(zip(specs, addresses))
    ]
    doc = {"model": str(model_dir), "num_layers": NUM_LAYERS, "block_size": BLOCK_SIZE, "dtype": dtype,
           "chains": [{"chain": 0, "stages": stages}]}
    return Topology.from_json(json.dumps(doc))


@contextlib.contextmanager
def cuda_mesh(redis_url: str, model_dir, log_dir, dtype: str):
    """Two stage workers on cuda:0, SERVING; killed on the way out."""
    addresses = [f"127.0.0.1:{free_port()}" for _ in range(2)]
    mesh = Mesh(redis_url, f"gpu-{uuid.uuid4().hex[:8]}", model_dir, log_dir, addresses)
    topology = cuda_topology(model_dir, addresses, dtype)
    _store_call(redis_url, mesh.deployment, lambda store: store.set_topology(topology))
    try:
        for stage in (0, 1):
            mesh.start(stage)
        for stage in (0, 1):
            mesh.wait_serving(stage, timeout_s=120)
        yield mesh
    finally:
        mesh.kill_all()


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return make_hf_checkpoint("llama", tmp_path_factory.mktemp("llama5"), num_layers=NUM_LAYERS)


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_two_stages_on_cuda_give_the_in_process_chain_tokens(dtype, redis_url, model_dir, tmp_path):
    batch = prompts(320)
    reference = LocalChain.load(model_dir, 2, device="cuda:0", dtype=dtype, num_kv_blocks=KV_BLOCKS,
                                block_size=BLOCK_SIZE)
    expected = greedy(lambda plan: reference.run(plan).tokens, batch, NEW_TOKENS)
    with cuda_mesh(redis_url, model_dir, tmp_path, dtype) as mesh:
        assert [(_info(a).device, _info(a).dtype) for a in mesh.addresses] == [("cuda:0", dtype)] * 2
        with forward_stream(mesh.addresses[0]) as stream:
            got = greedy(lambda plan: result_from_pb(stream.step(plan_to_pb(plan))).tokens, batch, NEW_TOKENS)
    assert got == expected
    if dtype == "float32":
        reference_hf = hf_model(model_dir)
        for n, (prompt, generated) in enumerate(zip(batch, got)):
            teacher_forcing_check(reference_hf, prompt, generated, FLOAT32_TOL, request=f"mesh request {n}")

