"""How close a frontend's CPU per client message is to what gRPC alone costs on this machine.

    python scripts/grpc_floor.py --addr 127.0.0.1:50100 [--requests 128 --output-len 128]

1. The mesh: ``--requests`` greedy streams at once against a running mesh (``stagemesh up ...
   --insecure``), through plain gRPC stubs that count every message and token each stream gets;
   the frontends' CPU (``/proc``, pids from the mesh's status) over the run.
2. The floor: a bare ``grpc.aio`` server on uvloop in a process of its own, serving
   ``stagemesh.v1.Gateway.Generate`` and nothing else, sends the same number of streams the
   same number of messages each, with as many tokens in each and the same pause between two
   messages of a stream; its CPU over the run.

Prints both, per client message and per token, and their ratio, for each of ``--rounds``. What
a frontend adds to gRPC's own work per message (the link to the gateway, detokenizing, pacing)
is the difference; with the frontend's message budget (``frontend.stream.MESSAGES_PER_S``) and
the mesh's tokens/s it sets the frontend's CPU per token.
"""

from __future__ import annotations

import argparse
import asyncio
import multiprocessing
import os
import random
import time

import grpc
import uvloop

from stagemesh.cli.bench.cpu import read_stats
from stagemesh.client import AsyncClient
from stagemesh.v1 import gateway_pb2, gateway_pb2_grpc, sampling_pb2

TICKS_PER_S = os.sysconf("SC_CLK_TCK")
CALL_TIMEOUT_S = 600.0
"""No stream of a run takes longer: a server that stopped answering ends the run, not hangs it."""


def _cpu_s(pids: list[int]) -> float:
    stats = read_stats()
    return sum(stats[pid].cpu_ticks for pid in pids) / TICKS_PER_S


async def _stream(stub, request: gateway_pb2.GenerateRequest) -> tuple[int, int]:
    messages = tokens = 0
    async for msg in stub.Generate(request, timeout=CALL_TIMEOUT_S):
        messages += 1
        tokens += len(msg.token_ids)
    return messages, tokens


async def _load(addr: str, n: int, input_len: int, output_len: int, seed: int) -> tuple[int, int, float]:
    """(messages, tokens, wall seconds) of ``n`` greedy streams at once."""
    rng = random.Random(seed)
    params = sampling_pb2.SamplingParams(max_new_tokens=output_len, temperature=0.0, ignore_eos=True)
    requests = [gateway_pb2.GenerateRequest(token_ids=gateway_pb2.TokenIds(ids=[rng.randrange(1, 256) for _ in
                                                                               range(input_len)]), params=params)
                for _ in range(n)]
    async with grpc.aio.insecure_channel(addr) as channel:
        stub = gateway_pb2_grpc.GatewayStub(channel)
        t0 = time.perf_counter()
        counts = await asyncio.gather(*[_stream(stub, r) for r in requests])
        wall = time.perf_counter() - t0
    return sum(m for m, _ in counts), sum(t for _, t in counts), wall


async def _frontend_pids(addr: str) -> list[int]:
    async with AsyncClient(addr) as client:
        status = await client.status()
    pids = [f.get("pid") for f in status.get("gateway", {}).get("frontends", [])]
    if not pids or not all(pids):
        raise SystemExit(f"{addr}: the status names no frontend pid (a mesh on this machine is needed)")
    return pids


class _Bare(gateway_pb2_grpc.GatewayServicer):
    def __init__(self, messages: int, tokens: int, gap_s: float):
        self.messages, self.tokens, self.gap_s = messages, tokens, gap_s

    async def Generate(self, request, context):
        for i in range(self.messages):
            await asyncio.sleep(self.gap_s)
            yield gateway_pb2.GenerateResponse(request_id=request.request_id, token_ids=[7] * self.tokens,
                                               index=i * self.tokens, text="x" * (2 * self.tokens))


def _serve_bare(port: int, messages: int, tokens: int, gap_s: float, ready) -> None:
    async def serve() -> None:
        server = grpc.aio.server()
        gateway_pb2_grpc.add_GatewayServicer_to_server(_Bare(messages, tokens, gap_s), server)
        server.add_insecure_port(f"127.0.0.1:{port}")
        await server.start()
        ready.set()
        await server.wait_for_termination()

    uvloop.run(serve())


class BareServer:
    """The bare ``Generate`` server in a process of its own, while the ``with`` block runs: each
    stream gets ``messages`` messages of ``tokens`` tokens, ``gap_s`` apart."""

    def __init__(self, port: int, messages: int, tokens: int, gap_s: float):
        self.addr = f"127.0.0.1:{port}"
        # spawn, not fork: a forked child of a process that has used gRPC hangs in gRPC
        context = multiprocessing.get_context("spawn")
        self._ready = context.Event()
        self._process = context.Process(target=_serve_bare, args=(port, messages, tokens, gap_s, self._ready),
                                        daemon=True)

    @property
    def pid(self) -> int:
        return self._process.pid

    def __enter__(self) -> BareServer:
        self._process.start()
        if not self._ready.wait(30):
            self.__exit__()
            raise SystemExit(f"the bare server on {self.addr} did not start")
        return self

    def __exit__(self, *exc) -> None:
        self._process.kill()
        self._process.join()


async def _bare_load(addr: str, n: int) -> tuple[int, int, float]:
    async with grpc.aio.insecure_channel(addr) as channel:
        stub = gateway_pb2_grpc.GatewayStub(channel)
        t0 = time.perf_counter()
        counts = await asyncio.gather(*[_stream(stub, gateway_pb2.GenerateRequest(request_id=str(k)))
                                        for k in range(n)])
        wall = time.perf_counter() - t0
    return sum(m for m, _ in counts), sum(t for _, t in counts), wall


def _row(name: str, cpu_s: float, messages: int, tokens: int, wall: float) -> str:
    return (f"{name:9s} {messages:7d} messages {tokens / messages:5.2f} tokens each  {wall:6.2f} s  "
            f"{1e6 * cpu_s / messages:6.1f} µs/message  {1e6 * cpu_s / tokens:6.1f} µs/token")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--addr", required=True, help="a running mesh's client address (started with --insecure)")
    p.add_argument("--requests", type=int, default=128)
    p.add_argument("--input-len", type=int, default=16)
    p.add_argument("--output-len", type=int, default=128)
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--bare-port", type=int, default=50999)
    args = p.parse_args()

    pids = uvloop.run(_frontend_pids(args.addr))
    uvloop.run(_load(args.addr, min(args.requests, 8), args.input_len, 8, 1))  # warm up
    for k in range(args.rounds):
        c0 = _cpu_s(pids)
        messages, tokens, wall = uvloop.run(_load(args.addr, args.requests, args.input_len, args.output_len, k))
        mesh_cpu = _cpu_s(pids) - c0

        per_stream = max(1, round(messages / args.requests))
        bare = BareServer(args.bare_port, per_stream, max(1, round(tokens / messages)), wall / per_stream)
        with bare:
            uvloop.run(_bare_load(bare.addr, 4))  # connect and warm up
            c0 = _cpu_s([bare.pid])
            b_messages, b_tokens, b_wall = uvloop.run(_bare_load(bare.addr, args.requests))
            bare_cpu = _cpu_s([bare.pid]) - c0

        print(f"round {k + 1}")
        print(_row("frontend", mesh_cpu, messages, tokens, wall))
        print(_row("bare gRPC", bare_cpu, b_messages, b_tokens, b_wall))
        print(f"frontend / bare gRPC per message: {(mesh_cpu / messages) / (bare_cpu / b_messages):.2f}")


if __name__ == "__main__":
    main()
