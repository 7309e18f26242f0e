"""The typed topology: its JSON (today's document, read back exactly), its checks and its lookups."""

from __future__ import annotations

import copy
import json

import pytest

from stagemesh.mesh.topology import Chain, ExpertWorker, Stage, Topology

DOC = {
    "model": "/models/mixtral", "num_layers": 4, "block_size": 16, "dtype": "bfloat16",
    "chains": [{
        "chain": 0,
        "stages": [
            {"stage": 0, "start_layer": 0, "end_layer": 2, "mlp_only_start": False, "attn_only_end": True,
             "address": "h:1", "device": "cuda:0", "tp": 2, "devices": ["cuda:0", "cuda:1"], "tp_backend": "nccl",
             "kv_blocks": 64},
            {"stage": 1, "start_layer": 1, "end_layer": 4, "mlp_only_start": True, "attn_only_end": False,
             "address": "h:2", "device": "cuda:2", "tp": 1, "devices": ["cuda:2"], "tp_backend": None,
             "kv_blocks": None},
        ],
        "experts": [{"worker": 0, "address": "h:3", "device": "cuda:3", "experts": {"0": [0, 2], "3": [1]}}],
    }],
}


def _read(doc: dict) -> Topology:
    return Topology.from_json(json.dumps(doc))


def test_today_s_document_reads_into_objects_and_writes_back_unchanged():
    topology = _read(DOC)
    chain = topology.chain(0)
    assert chain.stage(0) == Stage(0, 0, 2, "h:1", ("cuda:0", "cuda:1"), attn_only_end=True, tp_backend="nccl",
                                   kv_blocks=64)
    assert (chain.stage(0).tp, chain.stage(0).device, chain.stage(1).tp) == (2, "cuda:0", 1)
    assert chain.expert_worker(0) == ExpertWorker(0, "h:3", "cuda:3", {0: (0, 2), 3: (1,)})
    assert json.loads(topology.to_json()) == DOC
    assert Topology.from_json(topology.to_json()) == topology


def test_layer_keys_become_ints_and_expert_ids_come_sorted():
    doc = copy.deepcopy(DOC)
    doc["chains"][0]["experts"][0]["experts"] = {"3": [2, 0], "1": [1]}
    assert _read(doc).chain(0).expert_worker(0).experts == {1: (1,), 3: (0, 2)}


def test_left_out_keys_take_today_s_defaults():
    doc = {"model": "/m", "num_layers": 4, "chains": [{"chain": 0, "stages": [
        {"stage": 0, "start_layer": 0, "end_layer": 4, "address": "h:1", "tp": 2, "tp_backend": None}]}]}
    topology = _read(doc)
    assert (topology.block_size, topology.dtype) == (16, None)
    assert topology.chain(0) == Chain(0, (Stage(0, 0, 4, "h:1", ("cpu", "cpu")),), ())


def test_chains_and_stages_are_kept_in_order_whatever_the_document_s_order():
    doc = copy.deepcopy(DOC)
    doc["chains"][0]["stages"].reverse()
    doc["chains"].insert(0, {**copy.deepcopy(doc["chains"][0]), "chain": 1})
    topology = _read(doc)
    assert [c.index for c in topology.chains] == [0, 1]
    assert [s.index for s in topology.chain(1).stages] == [0, 1]


def _without(path: list, key: str) -> dict:
    doc = copy.deepcopy(DOC)
    entry = doc
    for step in path:
        entry = entry[step]
    del entry[key]
    return doc


@pytest.mark.parametrize(
    ("path", "key", "message"),
    [
        ([], "model", "topology lacks 'model'"),
        ([], "chains", "topology lacks 'chains'"),
        (["chains", 0], "chain", r"topology chains\[0\] lacks 'chain'"),
        (["chains", 0, "stages", 1], "address", r"topology chains\[0\].stages\[1\] lacks 'address'"),
        (["chains", 0, "stages", 0], "end_layer", r"topology chains\[0\].stages\[0\] lacks 'end_layer'"),
        (["chains", 0, "experts", 0], "experts", r"topology chains\[0\].experts\[0\] lacks 'experts'"),
    ],
)
def test_a_missing_key_is_named_by_its_path(path, key, message):
    with pytest.raises(ValueError, match=f"^{message}$"):
        _read(_without(path, key))


def _with(edit) -> dict:
    doc = copy.deepcopy(DOC)
    edit(doc)
    return doc


def _stage(doc: dict, s: int = 0) -> dict:
    return doc["chains"][0]["stages"][s]


@pytest.mark.parametrize(
    ("edit", "message"),
    [
        (lambda d: d.update(num_layers="4"), r"^topology num_layers is '4': must be int$"),
        (lambda d: _stage(d).update(tp=True), r"^topology chains\[0\].stages\[0\].tp is True: must be int$"),
        (lambda d: _stage(d, 1).update(address=5), r"^topology chains\[0\].stages\[1\].address is 5: must be str$"),
        (lambda d: _stage(d).update(devices=["cuda:0"]),
         r"chains\[0\].stages\[0\] has tp=2 but 1 devices \['cuda:0'\]"),
        (lambda d: _stage(d, 1).update(stage=2),
         r"^topology chains\[0\].stages must be numbered 0..n-1, got \[0, 2\]$"),
        (lambda d: d["chains"][0].update(chain=1), r"^topology chains must be numbered 0..n-1, got \[1\]$"),
        (lambda d: _stage(d, 1).update(end_layer=9), r"^topology chains\[0\].stages\[1\]: stage layers \[1, 9\)"),
        (lambda d: d["chains"][0]["experts"][0]["experts"].update(x=[1]),
         r"^topology chains\[0\].experts\[0\].experts has the key 'x': keys are layer numbers$"),
        (lambda d: d["chains"][0]["experts"][0]["experts"].update({"1": "0"}),
         r"^topology chains\[0\].experts\[0\].experts.1 is '0': must be a list of expert ids$"),
        (lambda d: d["chains"][0]["experts"].append(d["chains"][0]["experts"][0]),
         r"^topology chains\[0\].experts numbers its workers \[0, 0\]: each number once$"),
        (lambda d: d["chains"].append([]), r"^topology chains\[1\] is list: must be an object$"),
    ],
)
def test_a_bad_value_is_named_by_its_path(edit, message):
    with pytest.raises(ValueError, match=message):
        _read(_with(edit))


def test_lookups_name_what_there_is():
    topology = _read(DOC)
    with pytest.raises(ValueError, match=r"^the topology has no chain 2; it has chains \[0\]$"):
        topology.chain(2)
    with pytest.raises(ValueError, match=r"^chain 0 has stages 0..1; there is no stage 2$"):
        topology.chain(0).stage(2)
    with pytest.raises(ValueError, match=r"^chain 0 has expert workers \[0\]; there is no expert worker 1$"):
        topology.chain(0).expert_worker(1)


def test_a_stage_gives_its_spec_with_the_half_layer_boundaries():
    first, second = _read(DOC).chain(0).stages
    assert (first.spec(4).attn_only_end, second.spec(4).mlp_only_start) == (True, True)
    assert (first.spec(4).is_first, second.spec(4).is_last) == (True, True)
