"""Layout planning: the pp × tp (× ep) checks made before anything starts, the device of every
rank, the layer split, the expert placement, and the topology entries `stagemesh up` writes for
the workers."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from expert_worker.place import find_expert_worker
from stage_worker.topology import find_stage
from stagemesh.config import ModelConfig, StageSpec
from stagemesh.deploy.up_plan import UpOptions, plan_topology
from stagemesh.mesh.layout import place_experts, split_layers, stage_devices, validate_layout
from stagemesh.mesh.placement import chain_replicas
from stagemesh.mesh.topology import Topology

LLAMA = {
    "architectures": ["LlamaForCausalLM"], "vocab_size": 320, "hidden_size": 64, "intermediate_size": 128,
    "num_hidden_layers": 4, "num_attention_heads": 4, "num_key_value_heads": 2, "max_position_embeddings": 256,
}
QWEN2_MOE = {
    **LLAMA, "architectures": ["Qwen2MoeForCausalLM"], "num_experts": 4, "num_experts_per_tok": 2,
    "moe_intermediate_size": 32, "shared_expert_intermediate_size": 96, "mlp_only_layers": [1],
}


def config(base: dict = LLAMA, **changes) -> ModelConfig:
    return ModelConfig.from_dict({**base, **changes})


@pytest.mark.parametrize("tp", [1, 2, 4])
def test_a_tp_that_divides_every_split_dimension_passes(tp):
    validate_layout(config(), 2, tp)
    validate_layout(config(QWEN2_MOE), 2, tp)


@pytest.mark.parametrize(
    ("model", "pp", "tp", "message"),
    [
        (config(), 1, 3, "tp=3 must divide num_attention_heads=4"),
        (config(num_attention_heads=12, num_key_value_heads=4), 1, 6,
         "tp=6 and num_key_value_heads=4: one must divide the other"),
        (config(num_attention_heads=4, num_key_value_heads=4, intermediate_size=130), 1, 4,
         "tp=4 must divide intermediate_size=130"),
        (config(QWEN2_MOE, moe_intermediate_size=30), 1, 4, "tp=4 must divide moe_intermediate_size=30"),
        (config(QWEN2_MOE, shared_expert_intermediate_size=90), 2, 4,
         "tp=4 must divide shared_expert_intermediate_size=90"),
        (config(), 1, 0, "tp=0 must be at least 1"),
        (config(), 5, 1, "pp=5 must be between 1 and the model's 4 layers"),
    ],
)
def test_a_layout_the_model_cannot_take_is_refused_naming_the_constraint(model, pp, tp, message):
    with pytest.raises(ValueError, match="^" + message.replace("(", r"\(").replace(")", r"\)")):
        validate_layout(model, pp, tp)


def test_kv_heads_fewer_than_ranks_are_replicated_so_the_layout_passes():
    validate_layout(config(num_attention_heads=8, num_key_value_heads=2), 1, 4)  # 4 % 2 == 0
    validate_layout(config(num_attention_heads=8, num_key_value_heads=1), 1, 8)


def test_the_dense_width_only_counts_when_a_layer_is_dense():
    all_moe = config(QWEN2_MOE, mlp_only_layers=[], intermediate_size=130)
    validate_layout(all_moe, 1, 4)
    with pytest.raises(ValueError, match="intermediate_size=130"):
        validate_layout(config(QWEN2_MOE, intermediate_size=130), 1, 4)  # layer 1 is dense


def test_more_ranks_than_visible_gpus_is_refused():
    with pytest.raises(ValueError, match=r"^pp=2 x tp=2 needs 4 GPUs \(one per rank\) but 3 are visible$"):
        validate_layout(config(), 2, 2, gpus=3)
    validate_layout(config(), 2, 2, gpus=4)


def test_each_stage_gets_its_own_run_of_gpus():
    assert stage_devices("cuda", 2, 2) == [["cuda:0", "cuda:1"], ["cuda:2", "cuda:3"]]
    assert stage_devices("cuda", 3, 1) == [["cuda:0"], ["cuda:1"], ["cuda:2"]]
    assert stage_devices("cpu", 2, 2) == [["cpu", "cpu"], ["cpu", "cpu"]]


@pytest.mark.parametrize("base", [LLAMA, QWEN2_MOE])
@pytest.mark.parametrize("pp", [1, 2, 3, 4])
def test_layers_still_split_into_contiguous_stages(base, pp):
    specs = split_layers(config(base), pp)
    assert len(specs) == pp and specs[0].is_first and specs[-1].is_last
    assert all(a.bounds[1] == b.bounds[0] for a, b in zip(specs, specs[1:]))
    assert all(spec.attention_layers for spec in specs)  # every stage has a KV cache
    for a, b in zip(specs, specs[1:]):
        # a cut layer: the stage before runs its attention, the stage after its MLP, nobody twice
        assert a.attn_only_end == b.mlp_only_start and (a.end_layer - 1 == b.start_layer) == a.attn_only_end


def test_a_boundary_cuts_a_dense_layer_between_attention_and_mlp_when_that_balances_better():
    # The 40M shape: 6 layers, lm_head 10000 x 640 on the last stage. Whole layers give
    # 4 + 2 (or 3 + 3); half a layer more balances them.
    shape = config(hidden_size=640, intermediate_size=1728, num_hidden_layers=6, num_attention_heads=10,
                   num_key_value_heads=5, vocab_size=10000)
    first, last = split_layers(shape, 2)
    assert (first.label, last.label) == ("[0, 3.5)", "[3.5, 6)")
    assert (list(first.attention_layers), list(first.mlp_layers)) == ([0, 1, 2, 3], [0, 1, 2])
    assert (list(last.attention_layers), list(last.mlp_layers)) == ([4, 5], [3, 4, 5])
    assert first.is_first and not first.is_last and last.is_last and not last.is_first


def test_an_moe_layer_is_never_cut():
    all_moe = config(QWEN2_MOE, mlp_only_layers=[], num_hidden_layers=6)
    assert not any(s.attn_only_end for pp in range(2, 7) for s in split_layers(all_moe, pp))


def test_a_whole_layer_split_wins_a_tie():
    # 4 equal layers, no head to speak of: 2 + 2 is as balanced as any cut, so nothing is cut
    tiny_head = config(vocab_size=1)
    assert [s.label for s in split_layers(tiny_head, 2)] == ["[0, 2)", "[2, 4)"]


def _model_dir(tmp_path: Path, raw: dict) -> Path:
    (tmp_path / "config.json").write_text(json.dumps(raw))
    return tmp_path


def test_the_topology_gives_each_stage_its_tp_and_devices_and_the_worker_reads_them(tmp_path):
    doc = plan_topology(UpOptions(model=_model_dir(tmp_path, LLAMA), pp=2, tp=2, tp_backend="gloo"))
    entries = json.loads(doc.to_json())["chains"][0]["stages"]
    assert [(e["tp"], e["devices"], e["tp_backend"]) for e in entries] == [(2, ["cpu", "cpu"], "gloo")] * 2
    place = find_stage(doc, 0, 1)
    assert (place.tp, place.devices, place.device, place.tp_backend) == (2, ("cpu", "cpu"), "cpu", "gloo")


def test_plan_topology_refuses_a_bad_tp_before_anything_starts(tmp_path):
    with pytest.raises(ValueError, match="tp=3 must divide num_attention_heads=4"):
        plan_topology(UpOptions(model=_model_dir(tmp_path, LLAMA), tp=3))


@pytest.mark.parametrize("options, message", [
    ({"liveness_s": -1.0}, r"--liveness-s -1.0: give how long a process may answer nothing, or 0: never"),
    ({"standby_fence_s": 2.0}, r"--standby-fence-s 2.0: give it with --standby-gateway"),
    ({"standby_gateway": True, "standby_fence_s": 0.0}, r"--standby-fence-s 0.0: .* more than 0 s"),
    ({"spare_frontends": -1}, r"--spare-frontends -1: give how many spare frontends, or 0: none"),
])
def test_plan_topology_refuses_bad_supervision_flags_before_anything_starts(tmp_path, options, message):
    with pytest.raises(ValueError, match=message):
        plan_topology(UpOptions(model=_model_dir(tmp_path, LLAMA), **options))


def test_an_entry_without_tp_is_one_rank_and_a_devices_mismatch_is_refused():
    doc = {"model": "/m", "num_layers": 4, "chains": [{"chain": 0, "stages": [
        {"stage": 0, "start_layer": 0, "end_layer": 4, "address": "h:1", "device": "cuda:3"}]}]}
    place = find_stage(Topology.from_json(json.dumps(doc)), 0, 0)
    assert (place.tp, place.devices) == (1, ("cuda:3",))
    doc["chains"][0]["stages"][0].update(tp=2, devices=["cuda:0"])
    with pytest.raises(ValueError, match=r"tp=2 but 1 devices \['cuda:0'\]"):
        Topology.from_json(json.dumps(doc))


# --- expert parallelism ------------------------------------------------------------------------

MIXTRAL = {**LLAMA, "architectures": ["MixtralForCausalLM"], "num_local_experts": 4, "num_experts_per_tok": 2}


@pytest.mark.parametrize(("ep", "replicas"), [(1, 1), (2, 1), (3, 1), (4, 1), (2, 2), (3, 2), (4, 3), (8, 2)])
def test_every_expert_of_every_moe_layer_sits_on_replicas_distinct_workers_evenly(ep, replicas):
    model = config(MIXTRAL)
    placed = place_experts(model, ep, replicas)
    assert len(placed) == ep
    for layer in model.moe_layers:
        holders = [[w for w, held in enumerate(placed) if e in held.get(layer, [])] for e in range(4)]
        assert all(len(h) == replicas for h in holders), (layer, holders)  # R distinct workers each
        per_worker = [len(held.get(layer, [])) for held in placed]
        assert max(per_worker) - min(per_worker) <= 1 and min(per_worker) >= 1, per_worker
    totals = [sum(map(len, held.values())) for held in placed]
    assert max(totals) - min(totals) <= 1, totals  # uneven layers even out over the model


def test_three_workers_share_four_experts_unevenly_by_hand():
    # slots dealt round-robin, layer after layer: layer 0 -> w0 {0, 3}, w1 {1}, w2 {2};
    # layer 1 continues at slot 4 -> w1 {0, 3}, w2 {1}, w0 {2}; ...
    placed = place_experts(config(MIXTRAL, num_hidden_layers=2), 3)
    assert placed == [{0: [0, 3], 1: [2]}, {0: [1], 1: [0, 3]}, {0: [2], 1: [1]}]


def test_qwen2_moe_dense_layers_hold_no_experts():
    placed = place_experts(config(QWEN2_MOE), 2)  # layer 1 is dense (mlp_only_layers)
    assert all(1 not in held for held in placed)
    assert sorted(e for held in placed for e in held[0]) == [0, 1, 2, 3]


@pytest.mark.parametrize(
    ("model", "ep", "replicas", "message"),
    [
        (config(), 2, 1, "ep=2 needs a Mixture-of-Experts model, but LlamaForCausalLM is dense; leave --ep out"),
        (config(MIXTRAL), 2, 3, r"expert replicas=3 must be between 1 and ep=2 \(each replica on its own worker\)"),
        (config(MIXTRAL), 2, 0, "expert replicas=0 must be between 1 and ep=2"),
        (config(MIXTRAL), 5, 1, "ep=5 is more expert workers than num_experts=4 x replicas=1 slots per layer"),
        (config(MIXTRAL), 0, 1, "ep=0 must be at least 1"),
    ],
)
def test_an_expert_placement_that_cannot_be_made_is_refused_clearly(model, ep, replicas, message):
    with pytest.raises(ValueError, match="^" + message):
        place_experts(model, ep, replicas)


def test_ep_is_validated_with_the_layout():
    validate_layout(config(MIXTRAL), 2, 1, ep=3)
    with pytest.raises(ValueError, match="^ep=2 needs a Mixture-of-Experts model"):
        validate_layout(config(), 1, 1, ep=2)
    validate_layout(config(MIXTRAL), 1, 2, ep=2)  # TP rank 0 asks the expert workers for its stage
    with pytest.raises(ValueError, match=r"^pp=2 x tp=1 \+ ep=3 needs 5 GPUs \(one per rank and expert worker\) but 4"):
        validate_layout(config(MIXTRAL), 2, 1, ep=3, gpus=4)


def test_the_topology_gives_each_chain_its_expert_workers_on_their_own_gpus(tmp_path, monkeypatch):
    monkeypatch.setattr("stagemesh.deploy.up_plan.visible_gpus", lambda: 8)
    doc = plan_topology(UpOptions(model=_model_dir(tmp_path, MIXTRAL), pp=2, ep=3, expert_replicas=2, device="cuda"))
    experts = json.loads(doc.to_json())["chains"][0]["experts"]
    assert [(e["worker"], e["device"]) for e in experts] == [(0, "cuda:2"), (1, "cuda:3"), (2, "cuda:4")]
    assert all(set(e["experts"]) == {"0", "1", "2", "3"} for e in experts)  # JSON keys: layers as strings
    assert len({e["address"] for e in experts}) == 3
    place = find_expert_worker(doc, 0, 1)
    assert (place.worker_id, place.device, place.experts) == ("expert-c0-e1", "cuda:3", {
        int(layer): ids for layer, ids in experts[1]["experts"].items()})
    assert [r.worker_id for r in chain_replicas(doc.chain(0))] == ["expert-c0-e0", "expert-c0-e1", "expert-c0-e2"]
    assert plan_topology(UpOptions(model=_model_dir(tmp_path, MIXTRAL))).chain(0).expert_workers == ()


def test_replicas_without_expert_workers_are_refused(tmp_path):
    with pytest.raises(ValueError, match="expert replicas=2 needs expert workers: give --ep too"):
        plan_topology(UpOptions(model=_model_dir(tmp_path, MIXTRAL), expert_replicas=2))


# --- data parallelism ------------------------------------------------------------------------


def test_dp_chains_are_complete_replicas_on_their_own_ports_and_gpus(tmp_path, monkeypatch):
    monkeypatch.setattr("stagemesh.deploy.up_plan.visible_gpus", lambda: 10)
    doc = plan_topology(UpOptions(model=_model_dir(tmp_path, MIXTRAL), pp=2, ep=3, dp=2, device="cuda"))
    assert [c.index for c in doc.chains] == [0, 1]
    devices = [[s.device for s in c.stages] + [e.device for e in c.expert_workers] for c in doc.chains]
    assert devices == [[f"cuda:{g}" for g in range(5)], [f"cuda:{g}" for g in range(5, 10)]]  # none booked twice
    addresses = [a for c in doc.chains for a in [s.address for s in c.stages] + [e.address for e in c.expert_workers]]
    assert len(set(addresses)) == 10
    first, second = (c.stages for c in doc.chains)
    assert [(s.start_layer, s.end_layer) for s in first] == [(s.start_layer, s.end_layer) for s in second]
    assert (find_stage(doc, 1, 1).next_address, find_stage(doc, 1, 1).device) == (None, "cuda:6")
    assert find_stage(doc, 1, 0).next_address == second[1].address
    assert [r.worker_id for r in chain_replicas(doc.chain(1))] == ["expert-c1-e0", "expert-c1-e1", "expert-c1-e2"]


def test_dp_counts_every_chain_s_gpus_and_must_be_positive():
    with pytest.raises(ValueError, match=r"^dp=2 x \(pp=2 x tp=2\) needs 8 GPUs \(one per rank\) but 7 are visible$"):
        validate_layout(config(), 2, 2, dp=2, gpus=7)
    validate_layout(config(), 2, 2, dp=2, gpus=8)
    with pytest.raises(ValueError, match=r"^dp=0 must be at least 1"):
        validate_layout(config(), 1, 1, dp=0)


def test_a_stage_without_attention_is_refused():
    with pytest.raises(ValueError, match=r"stage layers \[1.5, 2\) hold no attention"):
        StageSpec(1, 2, 4, mlp_only_start=True)
    assert StageSpec(1, 3, 4, mlp_only_start=True, attn_only_end=True).label == "[1.5, 2.5)"
