"""How a stage splits a MoE layer's grouped rows over expert workers (with replicas) and puts the
answers back: ``stagemesh.mesh.placement.split_rows`` and ``RemoteExperts`` with its network round
replaced by in-process workers (no gRPC)."""

from __future__ import annotations

import pytest
import torch

from stage_worker.remote_experts import RemoteExperts
from stagemesh.config import ModelConfig
from stagemesh.errors import Unavailable
from stagemesh.mesh.placement import Share, grouped_spans, holders, split_rows
from stagemesh.mesh.store import ExpertReplica
from stagemesh.model.moe import LocalExperts, SparseMoE
from stagemesh.model.parallel import TPGroup

# counts = [3, 0, 2, 1]: grouped rows 0-2 are expert 0's, 3-4 expert 2's, 5 expert 3's.
COUNTS = [3, 0, 2, 1]


def test_grouped_spans_leave_out_experts_without_rows():
    assert grouped_spans(COUNTS) == [(0, 0, 3), (2, 3, 5), (3, 5, 6)]


def test_a_replicated_experts_rows_are_cut_between_its_workers_and_each_worker_gets_one_share():
    # expert 0 on A and B (3 rows: 2 to A, 1 to B), expert 2 on B only, expert 3 on A and C (1 row: to A)
    who = {0: ["A", "B"], 1: ["C"], 2: ["B"], 3: ["A", "C"]}
    shares = split_rows(grouped_spans(COUNTS), who)
    assert shares == {"A": Share([(0, 0, 2), (3, 5, 6)]), "B": Share([(0, 2, 3), (2, 3, 5)])}
    assert (shares["A"].expert_ids, shares["A"].counts, shares["A"].num_rows) == ([0, 3], [2, 1], 3)
    assert (shares["B"].expert_ids, shares["B"].counts) == ([0, 2], [1, 2])


def test_resent_pieces_of_one_expert_merge_into_one_count():
    shares = split_rows([(0, 4, 6), (0, 0, 2), (1, 2, 4)], {0: ["A"], 1: ["A"]})
    assert shares["A"].pieces == [(0, 0, 2), (0, 4, 6), (1, 2, 4)]
    assert (shares["A"].expert_ids, shares["A"].counts) == ([0, 1], [4, 2])


def test_holders_skip_down_and_excluded_workers():
    replicas = [
        ExpertReplica("e0", "h:1", {5: [0, 1]}),
        ExpertReplica("e1", "h:2", {5: [1, 2]}, live=False),
        ExpertReplica("e2", "h:3", {5: [2, 0]}),
    ]
    assert holders(replicas, 5) == {0: ["e0", "e2"], 1: ["e0"], 2: ["e2"]}
    assert holders(replicas, 5, frozenset({"e0"})) == {0: ["e2"], 2: ["e2"]}
    assert holders(replicas, 6) == {}


def _fake_expert(layer: int, expert: int, rows: torch.Tensor) -> torch.Tensor:
    return rows * (expert + 1) + layer  # exact in float32 for these small values


def test_split_then_reassemble_is_exact():
    x = torch.arange(12.0).reshape(6, 2)  # [R, H] grouped rows
    direct = torch.cat([_fake_expert(7, e, x[s:t]) for e, s, t in grouped_spans(COUNTS)])
    out = torch.empty_like(x)
    for share in split_rows(grouped_spans(COUNTS), {0: ["A", "B"], 2: ["B", "A"], 3: ["C"]}).values():
        for expert, s, t in share.pieces:
            out[s:t] = _fake_expert(7, expert, x[s:t])
    assert torch.equal(out, direct)


# --- RemoteExperts, its network round replaced by workers in this process -----------------

MIXTRAL = {
    "architectures": ["MixtralForCausalLM"], "vocab_size": 320, "hidden_size": 16, "intermediate_size": 8,
    "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2, "max_position_embeddings": 64,
    "num_local_experts": 4, "num_experts_per_tok": 2,
}


class InProcessExperts(RemoteExperts):
    """``RemoteExperts`` whose round runs each share on that worker's own ``LocalExperts``."""

    def __init__(self, replicas: list[ExpertReplica], weights: LocalExperts, dead: set[str] = frozenset()):
        super().__init__("c0-s0", replicas, loop=None)
        self.weights, self.dead = weights, set(dead)
        self.rounds: list[dict[str, list]] = []
        """Each round's pieces per worker."""

    def _round(self, layer, x, shares):
        self.rounds.append({w: s.pieces for w, s in shares.items()})
        self.rows_sent += sum(s.num_rows for s in shares.values())
        results = {}
        for worker, share in shares.items():
            if worker in self.dead:
                results[worker] = (share, Unavailable(f"expert worker {worker} is unreachable"))
                continue
            rows = torch.cat([x[s:t] for _, s, t in share.pieces])
            results[worker] = (share, _held(self.weights, share.expert_ids)(rows, share.counts))
        return results


def _held(full: LocalExperts, ids: list[int]) -> LocalExperts:
    """A worker's ``LocalExperts`` holding only experts ``ids`` of ``full``."""
    held = LocalExperts(ModelConfig.from_dict(MIXTRAL), ids, TPGroup())
    held.load_state_dict({"w_gate_up": full.w_gate_up[ids].clone(), "w_down": full.w_down[ids].clone()})
    return held


@pytest.fixture
def experts():
    config = ModelConfig.from_dict(MIXTRAL)
    torch.manual_seed(0)
    full = LocalExperts(config, [0, 1, 2, 3], TPGroup())
    torch.nn.init.normal_(full.w_gate_up, std=0.3)
    torch.nn.init.normal_(full.w_down, std=0.3)
    return config, full


REPLICATED = [  # every expert of layer 1 on two of three workers
    ExpertReplica("e0", "h:1", {1: [0, 1, 3]}),
    ExpertReplica("e1", "h:2", {1: [1, 2]}),
    ExpertReplica("e2", "h:3", {1: [0, 2, 3]}),
]


def test_remote_experts_send_one_request_per_worker_and_match_local_experts(experts):
    config, full = experts
    x = torch.randn(10, config.hidden_size)
    counts = torch.tensor([4, 1, 3, 2])
    remote = InProcessExperts(REPLICATED, full)
    out = remote(1, x, counts)
    assert len(remote.rounds) == 1 and remote.retries == 0
    assert sorted(remote.rounds[0]) == ["e0", "e1", "e2"]
    assert torch.allclose(out, full(x, counts.tolist()), atol=1e-6)


def test_a_dead_workers_rows_go_to_the_other_replica_in_the_same_call(experts):
    config, full = experts
    x = torch.randn(10, config.hidden_size)
    counts = torch.tensor([4, 1, 3, 2])
    remote = InProcessExperts(REPLICATED, full, dead={"e0"})
    out = remote(1, x, counts)
    assert remote.retries == 1 and len(remote.rounds) == 2
    assert "e0" not in remote.rounds[1], "the failed worker is not tried again in the same call"
    assert torch.allclose(out, full(x, counts.tolist()), atol=1e-6)
    remote(1, x, counts)  # the next call passes e0 over at once
    assert "e0" not in remote.rounds[2] and remote.retries == 1


def test_no_live_replica_left_fails_naming_the_expert_and_layer(experts):
    config, full = experts
    remote = InProcessExperts(REPLICATED, full, dead={"e0", "e2"})
    with pytest.raises(Unavailable, match=r"no live expert worker holds expert 0 of layer 1"):
        remote(1, torch.randn(3, config.hidden_size), torch.tensor([1, 1, 1, 0]))


def test_sparse_moe_with_remote_experts_equals_the_whole_block_in_process(experts):
    config, full = experts
    local = SparseMoE(config, 1, TPGroup())
    torch.nn.init.normal_(local.gate.weight, std=0.3)
    local.local.load_state_dict(full.state_dict())
    remote = SparseMoE(config, 1, TPGroup(), experts=InProcessExperts(REPLICATED, full))
    remote.gate.load_state_dict(local.gate.state_dict())
    x = torch.randn(7, config.hidden_size)
    assert torch.allclose(remote(x), local(x), atol=1e-6)
