"""What the chaos tests share: a tiny checkpoint's greedy streams, run all at once against a
`stagemesh up` mesh and compared with a fault-free run, and the mesh's pids and health read
from its own status document (never guessed), and what the launcher printed."""

from __future__ import annotations

import asyncio
import os
import random
import select
import subprocess
import time
from collections.abc import Callable
from pathlib import Path

from stagemesh import AsyncClient, Client

CALL_TIMEOUT_S = 90.0


def greedy_requests(n: int, seed: int, max_new: int) -> list[dict]:
    """``n`` greedy requests (SDK ``stream`` keyword arguments) of random prompts, each ``max_new`` tokens long."""
    rng = random.Random(seed)
    return [{"token_ids": [rng.randrange(2, 320) for _ in range(rng.randint(2, 16))], "max_new_tokens": max_new,
             "ignore_eos": True, "temperature": 0.0} for _ in range(n)]


async def streams(addr: str, requests: list[dict], on_token: Callable[[int], None] | None = None) -> list[list[int]]:
    """Every request at once on one client; each one's tokens. ``on_token(total)`` after each token
    (``total``: tokens streamed so far over all requests). A token out of order fails the test."""
    total = 0
    async with AsyncClient(addr, timeout=CALL_TIMEOUT_S) as client:

        async def one(r: dict) -> list[int]:
            nonlocal total
            tokens = []
            async for item in client.stream(**r):
                if item.token_id is not None:
                    assert item.index == len(tokens), f"token index {item.index} after {len(tokens)} tokens"
                    tokens.append(item.token_id)
                    total += 1
                    if on_token is not None:
                        on_token(total)
            return tokens

        return list(await asyncio.gather(*(one(r) for r in requests)))


async def timed_streams(addr: str, requests: list[dict], fault: Callable[[], None] | None = None, fire_after: int = 0,
                        *, client_per_stream: bool = False) -> tuple[list[list[int]], float]:
    """Every request at once; each one's tokens and the longest gap between two tokens of a
    stream (what the fault cost the clients that waited longest). ``fault()`` once ``fire_after``
    tokens arrived in all. ``client_per_stream``: each request on its own client (connection),
    so the kernel spreads them over the frontends sharing the port."""
    received, longest = 0, 0.0

    async def one(client: AsyncClient, request: dict) -> list[int]:
        nonlocal received, longest
        tokens, last = [], None
        async for item in client.stream(**request):
            now = time.monotonic()
            if item.token_id is None:
                continue
            if last is not None:
                longest = max(longest, now - last)
            last = now
            tokens.append(item.token_id)
            received += 1
            if fault is not None and received == fire_after:
                fault()
        return tokens

    async def own_client(request: dict) -> list[int]:
        async with AsyncClient(addr, timeout=CALL_TIMEOUT_S) as client:
            return await one(client, request)

    if client_per_stream:
        results = list(await asyncio.gather(*(own_client(r) for r in requests)))
    else:
        async with AsyncClient(addr, timeout=CALL_TIMEOUT_S) as client:
            results = list(await asyncio.gather(*(one(client, r) for r in requests)))
    assert fault is None or received >= fire_after, "the fault never fired: the streams ended first"
    return results, longest


def same_tokens(model_dir: Path, requests: list[dict], fault_free: list[list[int]] | None,
                got: list[list[int]]) -> None:
    """Every request got the fault-free run's tokens, all of them. A stream that differs is judged
    by teacher forcing against transformers: a re-prefill batches differently, and where two
    logits tie within float noise either token is right. ``fault_free`` None: every stream is
    judged so (a long run's reference costs one forward pass per stream, not a second run)."""
    assert [len(t) for t in got] == [r["max_new_tokens"] for r in requests], [len(t) for t in got]
    if fault_free is None:
        differ = list(range(len(got)))
    else:
        differ = [n for n, (a, b) in enumerate(zip(fault_free, got)) if a != b]
    if differ:
        from tests.checkpoints import hf_model, teacher_forcing_check

        reference = hf_model(model_dir)
        for n in differ:
            teacher_forcing_check(reference, requests[n]["token_ids"], got[n], request=f"request #{n}")


def status(addr: str) -> dict:
    with Client(addr, timeout=10) as client:
        return client.status()


def worker(doc: dict, role: str, chain: int, index: int) -> dict | None:
    """The status entry of a stage (``index`` = stage) or expert worker, None when it is not registered."""
    return next((w for w in doc["workers"] if (w["role"], w["chain"], w["stage"]) == (role, chain, index)), None)


def whole(doc: dict, stages: int) -> bool:
    """Every stage worker registered and heartbeating, every chain in service."""
    workers = [w for w in doc["workers"] if w["role"] == "stage"]
    return len(workers) == stages and all(w["healthy"] for w in workers) and all(c["healthy"] for c in doc["chains"])


def wait_whole(addr: str, stages: int, since: float, within: float) -> float:
    """Seconds from ``since`` until the mesh is whole (``whole``); fails the test past ``within``."""
    while True:
        try:
            doc = status(addr)
            if whole(doc, stages):
                return time.monotonic() - since
        except Exception as err:  # noqa: BLE001 - the gateway may be restarting; keep asking
            doc = repr(err)
        assert time.monotonic() - since < within, f"the mesh is not whole {within:.0f} s after the fault: {doc}"
        time.sleep(0.1)


def launcher_output(up: subprocess.Popen) -> str:
    """What `stagemesh up` printed (its log lines) since it was last read, without blocking."""
    fd, out = up.stdout.fileno(), b""
    while select.select([fd], [], [], 0)[0] and (chunk := os.read(fd, 65536)):
        out += chunk
    return out.decode(errors="replace")
