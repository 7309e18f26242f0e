"""A mesh over two hosts: two network namespaces joined by a veth link (``tests.integration.netns``).

Host A (10.77.0.1) runs Redis, the gateway, a frontend and chain 0's two stage workers; host B
(10.77.0.2) runs chain 1's, each advertising B's address; mutual TLS and a Redis password are on,
as `stagemesh up` runs them. Requests through both chains give transformers' greedy tokens;
host B's link taken down mid-generation moves its requests to chain 0 with no token lost or
changed (the fault-free run's streams); brought up again, chain 1 serves again. The client's
calls come from host A's namespace too (``tests.integration.netns_agent``): no traffic leaves
the namespaces. Skipped, with the reason, where network namespaces cannot be made (not root, no
``ip netns``).
"""

from __future__ import annotations

import time

import pytest

from tests.chaos.chaos_helpers import greedy_requests, same_tokens
from tests.checkpoints import hf_model, make_hf_checkpoint, teacher_forcing_check
from tests.integration import netns
from tests.integration.netns import HostPair
from tests.integration.two_hosts import two_host_mesh

pytestmark = pytest.mark.slow

OUT_S = 15.0
"""Host B's link down: chain 1 out of service within this (the step deadline fires first: 2.10-2.15 s measured)."""
DOWN_S = 5.0
"""How long host B's link stays down in all: past the heartbeats' 3 s expiry."""
BACK_S = 30.0
"""Host B's link up: chain 1 back in service within this (0.07-1.07 s measured)."""


def _chain_of(worker_id: str) -> int:
    return int(worker_id.split("-c")[1].split("-")[0])


def _chain0_on_a_chain1_on_b(hosts: HostPair):
    return lambda worker_id: hosts.a if _chain_of(worker_id) == 0 else hosts.b


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    reason = netns.why_not()  # here, not at collection: it creates (and deletes) a namespace
    if reason is not None:
        pytest.skip(reason)
    return make_hf_checkpoint("llama", tmp_path_factory.mktemp("llama4"), num_layers=4)


def _served(doc: dict) -> dict[int, int]:
    return {c["id"]: c["requests_served"] for c in doc["chains"]}


def test_two_hosts_serve_fail_over_when_host_b_drops_and_take_it_back(model_dir, tmp_path):
    with two_host_mesh(model_dir, tmp_path, _chain0_on_a_chain1_on_b, pp=2, dp=2) as mesh:
        doc = mesh.ask("status")
        addresses = {w["id"]: w["address"] for w in doc["workers"] if w["role"] == "stage"}
        assert all(a.startswith(f"{mesh.hosts.a.ip}:") for w, a in addresses.items() if "-c0-" in w), addresses
        assert all(a.startswith(f"{mesh.hosts.b.ip}:") for w, a in addresses.items() if "-c1-" in w), addresses

        # both chains serve transformers' greedy tokens
        parity = greedy_requests(8, seed=1, max_new=8)
        got = mesh.ask("streams", requests=parity)["tokens"]
        reference = hf_model(model_dir)
        for n, (req, tokens) in enumerate(zip(parity, got)):
            assert len(tokens) == req["max_new_tokens"], f"request #{n}: {tokens}"
            teacher_forcing_check(reference, req["token_ids"], tokens, request=f"request #{n}")
        before = _served(mesh.ask("status"))
        assert before[0] > 0 and before[1] > 0, f"both chains should have served: {before}"

        # host B's link down mid-generation: its requests move to chain 0, no token lost
        long = greedy_requests(8, seed=2, max_new=40)
        fault_free = mesh.ask("streams", requests=long)["tokens"]
        run = mesh.ask("streams", requests=long, fire_after=48, cmd=mesh.hosts.link_argv(up=False), watch_chain=1)
        assert int(run["running_at_fire"]["1"]) > 0, f"chain 1 held no request when its link went down: {run}"
        same_tokens(model_dir, long, fault_free, run["tokens"])
        assert run["chain_out_s"] < OUT_S, run
        exact = sum(a == b for a, b in zip(fault_free, run["tokens"]))
        print(f"\nhost B down: chain 1 out of service {run['chain_out_s']:.2f} s after the link went down "
              f"({run['running_at_fire']['1']} of its requests running); longest gap in a stream "
              f"{run['longest_gap_s']:.2f} s; {exact} of {len(long)} streams token for token the fault-free run's")

        # while the link stays down (past the heartbeats' 3 s TTL), chain 0 serves everything
        time.sleep(max(0.0, DOWN_S - run["since_fire_s"]))
        during = greedy_requests(4, seed=4, max_new=8)
        got = mesh.ask("streams", requests=during)["tokens"]
        for n, (req, tokens) in enumerate(zip(during, got)):
            teacher_forcing_check(reference, req["token_ids"], tokens, request=f"while host B is away #{n}")
        doc = mesh.ask("status")
        assert not next(c for c in doc["chains"] if c["id"] == 1)["healthy"], doc["chains"]
        after = _served(doc)

        # its link up again: chain 1 back in service, and serving
        back = mesh.ask("wait_chain", chain=1, healthy=True, timeout=BACK_S, cmd=mesh.hosts.link_argv(up=True))
        print(f"host B up: chain 1 back in service {back['seconds']:.2f} s after the link came up")
        again = greedy_requests(8, seed=3, max_new=8)
        got = mesh.ask("streams", requests=again)["tokens"]
        for n, (req, tokens) in enumerate(zip(again, got)):
            teacher_forcing_check(reference, req["token_ids"], tokens, request=f"after the link came back #{n}")
        final = _served(mesh.ask("status"))
        assert final[1] > after[1], f"chain 1 served nothing after its link came back: {after} -> {final}"
        assert not mesh.dead(), f"processes exited: {mesh.dead()}\n{mesh.logs()}"
