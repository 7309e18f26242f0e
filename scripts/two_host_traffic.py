"""What crosses the network per token: the figures of docs/scaling.md.

Starts a real mesh (``--pp 2``, mutual TLS, Redis password) over two network namespaces
(``tests.integration.two_hosts``): by default stage 0 alone on host B, Redis, the gateway, the
frontend and stage 1 on host A, so every hop of a step crosses the veth link (gateway → stage 0
→ stage 1 and the answers back); ``--family mixtral --ep 1 --on-b expert-c0-e0`` puts the expert
worker alone on host B instead. Each process's TCP connections are read with ``ss -tinp`` inside both
namespaces before and after a load (bytes as TCP carries them: TLS records, HTTP/2 frames,
gRPC prefixes and protobuf all included; TCP/IP headers not), and the link's own counters give
the same with headers. A quiet window first measures what flows with no load (heartbeats,
health checks, figures), which the load's numbers have subtracted.

    sudo PYTHONPATH=. python scripts/two_host_traffic.py [--hidden 1024] [--dtype float32|bfloat16]

Two loads: *decode* (16 requests, 4-token prompts, 64 tokens each: one token per sequence per
step) and *prefill* (16 requests, 200-token prompts, 1 token each). Prints, per hop and
direction, bytes in all and per token that passed the hop.
"""

from __future__ import annotations

import argparse
import random
import re
import subprocess
import tempfile
import time
from collections import defaultdict
from pathlib import Path

from stagemesh.model import families
from stagemesh.model.families.llama import LLAMA
from tests.checkpoints import make_hf_checkpoint
from tests.integration import netns
from tests.integration.two_hosts import GATEWAY_PORT, REDIS_PORT, TwoHostMesh, two_host_mesh

QUIET_S = 6.0


def connections(mesh: TwoHostMesh) -> dict[tuple, dict[str, int]]:
    """(process, local address, peer address) -> bytes sent and received, of every TCP connection on both hosts."""
    names = {proc.pid: name for name, proc in mesh.procs.items()}
    found = {}
    for host in (mesh.hosts.a, mesh.hosts.b):
        out = subprocess.run(host.argv("ss", "-tinpH", "state", "established"), capture_output=True, text=True,
                             check=True).stdout
        head = None
        for line in out.splitlines():
            if not line[:1].isspace():
                head = line
                continue
            fields = head.split()
            pid = re.search(r"pid=(\d+)", head)
            owner = names.get(int(pid.group(1)), "?") if pid else "?"
            counts = {k: int(v) for k, v in re.findall(r"\b(bytes_sent|bytes_received):(\d+)", line)}
            found[(owner, fields[2], fields[3])] = {"sent": counts.get("bytes_sent", 0),
                                                   "received": counts.get("bytes_received", 0)}
    return found


def diff(after: dict, before: dict) -> dict:
    return {k: {d: v[d] - before.get(k, {}).get(d, 0) for d in v} for k, v in after.items()}


def _address(text: str) -> str:
    """``ip:port`` of an ``ss`` address (an IPv4-mapped IPv6 one included)."""
    return text.replace("[::ffff:", "").replace("]", "")


def hop_name(mesh: TwoHostMesh, key: tuple) -> str | None:
    """What a connection is, by its owner and the address it dials: one label per hop and
    direction, marked ``(link)`` when it crosses between the hosts."""
    owner, local, peer = key
    local, peer = _address(local), _address(peer)
    workers = {s.address: f"stage-c{c.index}-s{s.index}" for c in mesh.topology.chains for s in c.stages}
    workers |= {e.address: f"expert-c{c.index}-e{e.index}" for c in mesh.topology.chains for e in c.expert_workers}
    workers[f"{mesh.hosts.a.ip}:{REDIS_PORT}"] = "redis"
    workers[f"127.0.0.1:{GATEWAY_PORT}"] = "gateway"
    if peer not in workers:
        return None  # the server's end of a connection counted by its client, or the client's own calls
    crosses = local.rpartition(":")[0] != peer.rpartition(":")[0]
    return f"{owner} -> {workers[peer]}{' (link)' if crosses else ''}"


def measure(mesh: TwoHostMesh, requests: list[dict], seconds_quiet: dict) -> tuple[dict, float]:
    before, link0, t0 = connections(mesh), mesh.hosts.link_bytes(mesh.hosts.b), time.monotonic()
    mesh.ask("streams", requests=requests)
    elapsed = time.monotonic() - t0
    moved = diff(connections(mesh), before)
    link = {d: v - link0[d] for d, v in mesh.hosts.link_bytes(mesh.hosts.b).items()}
    hops: dict[str, dict[str, float]] = defaultdict(lambda: {"sent": 0.0, "received": 0.0})
    for key, counts in moved.items():
        if (name := hop_name(mesh, key)) is not None:
            for d in counts:
                hops[name][d] += counts[d] - seconds_quiet.get(key, {}).get(d, 0.0) * elapsed
    hops["link (host B's end, with TCP/IP headers)"] = {"sent": link["tx"], "received": link["rx"]}
    return hops, elapsed


def load(n: int, prompt: int, new: int, seed: int) -> list[dict]:
    rng = random.Random(seed)
    return [{"token_ids": [rng.randrange(2, 320) for _ in range(prompt)], "max_new_tokens": new, "ignore_eos": True,
             "temperature": 0.0} for _ in range(n)]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--hidden", type=int, default=1024, help="the test model's hidden size")
    p.add_argument("--dtype", default=None, help="the mesh's dtype (default: the checkpoint's, float32)")
    p.add_argument("--family", choices=sorted(families.FAMILIES), default=LLAMA.name,
                   help="the test model's family (an MoE one, with --ep)")
    p.add_argument("--ep", type=int, default=0, help="expert workers (MoE families)")
    p.add_argument("--on-b", default="stage-c0-s0", help="the workers on host B, by id, comma-separated")
    args = p.parse_args()
    if (reason := netns.why_not()) is not None:
        raise SystemExit(reason)
    with tempfile.TemporaryDirectory(prefix="stagemesh-traffic-") as tmp:
        work = Path(tmp)
        model = make_hf_checkpoint(args.family, work / "model", num_layers=2, hidden_size=args.hidden,
                                   intermediate_size=2 * args.hidden, num_attention_heads=8, num_key_value_heads=4)

        def place_of(hosts):
            return lambda worker_id: hosts.b if worker_id in args.on_b.split(",") else hosts.a

        with two_host_mesh(model, work / "mesh", place_of, pp=2, dp=1, ep=args.ep,
                           dtype=args.dtype) as mesh:
            mesh.ask("streams", requests=load(4, 8, 8, seed=0))  # warm up
            start = connections(mesh)
            time.sleep(QUIET_S)
            quiet = {k: {d: c / QUIET_S for d, c in v.items()} for k, v in diff(connections(mesh), start).items()}
            print(f"{args.family}, hidden {args.hidden}, dtype {args.dtype or 'float32'}, ep {args.ep}, "
                  f"on host B: {args.on_b}; quiet (bytes/s, subtracted below):")
            for key, rate in sorted(quiet.items()):
                if (name := hop_name(mesh, key)) is not None:
                    print(f"  {name:32s} sent {rate['sent']:8.0f}  received {rate['received']:8.0f}")
            for what, requests in (("decode", load(16, 4, 64, seed=1)), ("prefill", load(16, 200, 1, seed=2))):
                tokens = sum(len(r["token_ids"]) + r["max_new_tokens"] - 1 for r in requests)
                hops, elapsed = measure(mesh, requests, quiet)
                print(f"{what}: {len(requests)} requests, {tokens} tokens through each stage, {elapsed:.1f} s")
                for name, counts in sorted(hops.items()):
                    print(f"  {name:44s} sent {counts['sent']:11.0f} B ({counts['sent'] / tokens:7.1f} B/token)  "
                          f"received {counts['received']:11.0f} B ({counts['received'] / tokens:7.1f} B/token)")


if __name__ == "__main__":
    main()
