"""What a stage hop costs on this machine with nothing of stagemesh in it: a bare gRPC chain.

    python scripts/hop_floor.py [--stages 4] [--work-ms 0.3] [--steps 2000]

``--stages`` processes in a chain, each on uvloop, linked as a pipeline's stages are: the first
(the driver) runs a step, sends it down a long-lived ``Stage.Forward`` stream to the second,
which runs its step and sends it on, ...; the last answers, and each stage relays the answer back
up its stream, as the mesh relays the sampled tokens. A step is ``--work-ms`` of busy CPU on a
thread of its own (as a stage's step thread; 0.3 ms is a one-layer step of ``/tmp/tiny`` run
hot), the message a ``StageRequest`` holding one token's hidden state (``--hidden`` float32s).
One step at a time, as one stream's tokens at pp=N, whose critical path is the same: N steps,
N - 1 hops forward, N - 1 relays back.

Prints the median time from one of the driver's steps to its next (a token), a step as the
driver saw it (the work and the hand-off to its thread and back), and what each hop adds: (token
- N × work) / (N - 1), against the bare work as an in-process engine runs it — the figure issue
18's per-hop target ("ITL ≤ in-process + 0.5 ms per stage hop") is about, with no stagemesh code
on the path — and against the steps as seen, hand-offs included.
"""

from __future__ import annotations

import argparse
import asyncio
import multiprocessing
import statistics
import time
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager

import grpc
import grpc.aio
import uvloop

from stagemesh.v1 import stage_pb2, stage_pb2_grpc, tensor_pb2

ANSWER_TIMEOUT_S = 30.0


def _spin(seconds: float) -> None:
    end = time.perf_counter() + seconds
    while time.perf_counter() < end:
        pass


class _Down:
    """One long-lived ``Forward`` stream to the next stage: one answer per request, in order."""

    def __init__(self, addr: str):
        self._channel = grpc.aio.insecure_channel(addr)
        self._queue: asyncio.Queue = asyncio.Queue()
        self._call = stage_pb2_grpc.StageStub(self._channel).Forward(self._requests())

    async def _requests(self):
        while True:
            yield await self._queue.get()

    async def ask(self, request: stage_pb2.StageRequest) -> stage_pb2.StageResponse:
        self._queue.put_nowait(request)
        # a stage that stopped answering ends the run, not hangs it
        return await asyncio.wait_for(self._call.read(), ANSWER_TIMEOUT_S)


class _Hop(stage_pb2_grpc.StageServicer):
    def __init__(self, next_addr: str | None, work_s: float):
        self._next, self._work_s = next_addr, work_s
        self._thread = ThreadPoolExecutor(max_workers=1)
        self._down: _Down | None = None

    async def Forward(self, requests, context):
        loop = asyncio.get_running_loop()
        if self._next is not None and self._down is None:
            self._down = _Down(self._next)
        async for request in requests:
            await loop.run_in_executor(self._thread, _spin, self._work_s)
            if self._down is None:  # the last stage: the sampled token
                yield stage_pb2.StageResponse(step_id=request.step_id, seq_ids=[0], tokens=[1])
            else:
                yield await self._down.ask(request)


def _serve(port: int, next_addr: str | None, work_s: float, ready) -> None:
    async def serve() -> None:
        server = grpc.aio.server()
        stage_pb2_grpc.add_StageServicer_to_server(_Hop(next_addr, work_s), server)
        server.add_insecure_port(f"127.0.0.1:{port}")
        await server.start()
        ready.set()
        await server.wait_for_termination()

    uvloop.run(serve())


@contextmanager
def chain(ports: list[int], work_s: float):
    """Stages 1.. of the chain (one process each, on ``ports`` in order) while the block runs;
    the driver (stage 0) talks to the first."""
    context = multiprocessing.get_context("spawn")  # not fork: a forked child of a gRPC user hangs in gRPC
    servers = []
    try:
        for k, port in enumerate(ports):
            ready = context.Event()
            nxt = f"127.0.0.1:{ports[k + 1]}" if k + 1 < len(ports) else None
            servers.append(context.Process(target=_serve, args=(port, nxt, work_s, ready), daemon=True))
            servers[-1].start()
            if not ready.wait(30):
                raise SystemExit(f"stage {k + 1} on port {port} did not start")
        yield
    finally:
        for server in servers:
            server.kill()
            server.join()


async def _drive(addr: str, work_s: float, steps: int, hidden: int) -> tuple[list[float], list[float]]:
    """The driver, stage 0: (each step's start to the next one's, each step's own time), in seconds."""
    loop = asyncio.get_running_loop()
    thread = ThreadPoolExecutor(max_workers=1)
    down = _Down(addr)
    payload = tensor_pb2.Tensor(dtype="float32", shape=[1, hidden], data=bytes(4 * hidden))
    starts, works = [], []
    for step in range(steps):
        t0 = time.perf_counter()
        starts.append(t0)
        await loop.run_in_executor(thread, _spin, work_s)
        works.append(time.perf_counter() - t0)
        await down.ask(stage_pb2.StageRequest(step_id=step, seq_ids=[0], starts=[step], lengths=[1], hidden=payload))
    return [b - a for a, b in zip(starts, starts[1:])], works


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--stages", type=int, default=4)
    p.add_argument("--work-ms", type=float, default=0.3, help="each stage's step, busy CPU on its step thread")
    p.add_argument("--steps", type=int, default=2000)
    p.add_argument("--hidden", type=int, default=64, help="float32s of hidden state in each message")
    p.add_argument("--base-port", type=int, default=50950)
    p.add_argument("--rounds", type=int, default=3)
    args = p.parse_args()
    if args.stages < 2:
        raise SystemExit("--stages must be at least 2: a hop needs two stages")
    work_s = args.work_ms / 1e3
    ports = [args.base_port + k for k in range(1, args.stages)]
    with chain(ports, work_s):
        uvloop.run(_drive(f"127.0.0.1:{ports[0]}", work_s, 200, args.hidden))  # connect, warm up
        for r in range(args.rounds):
            tokens, works = uvloop.run(_drive(f"127.0.0.1:{ports[0]}", work_s, args.steps, args.hidden))
            token, work = statistics.median(tokens), statistics.median(works)
            hops = args.stages - 1
            over_work, over_steps = (token - args.stages * work_s) / hops, (token - args.stages * work) / hops
            print(f"round {r + 1}: {args.stages} stages, token {1e3 * token:.2f} ms, step {1e3 * work:.3f} ms "
                  f"({args.work_ms:g} ms of work); each hop adds {1e3 * over_work:.2f} ms to the work, "
                  f"{1e3 * over_steps:.2f} ms to the steps")


if __name__ == "__main__":
    main()
