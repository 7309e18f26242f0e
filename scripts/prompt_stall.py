"""How long a huge text prompt stalls the other streams of a running mesh.

Streams ``--streams`` greedy requests through the mesh at ``--addr`` and, once they are all
under way, sends one prompt of ``--prompt-mb`` MB of text (far past any context: it is
tokenized, then refused with INVALID_ARGUMENT). Prints the longest gap between two tokens of
the other streams while that prompt was in flight, against their median gap::

    stagemesh up --model /tmp/tiny --port 50051 &
    python scripts/prompt_stall.py --addr 127.0.0.1:50051 --prompt-mb 3
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import sys
import time

from stagemesh import AsyncClient


async def stream(client: AsyncClient, arrivals: list[float], tokens: int) -> None:
    async for _ in client.stream(token_ids=[5, 6, 7, 8], max_new_tokens=tokens, ignore_eos=True):
        arrivals.append(time.monotonic())


HUGE = """
import sys
from stagemesh import Client, StagemeshError
text = "lorem ipsum dolor sit amet " * ({mb} * 1_000_000 // 27)
try:
    with Client({addr!r}, timeout=600) as client:
        client.generate(text, max_new_tokens=1)
    print("accepted")
except StagemeshError as err:
    print(f"{{err.code}}: {{err.message[:80]}}")
"""


async def send_huge(addr: str, mb: int) -> str:
    """The huge prompt, from another process: this client's own stalls must not be what is measured."""
    proc = await asyncio.create_subprocess_exec(sys.executable, "-c", HUGE.format(mb=mb, addr=addr),
                                                stdout=asyncio.subprocess.PIPE)
    out, _ = await proc.communicate()
    return out.decode().strip()


async def main(args: argparse.Namespace) -> None:
    async with AsyncClient(args.addr, timeout=600) as client:
        arrivals: list[list[float]] = [[] for _ in range(args.streams)]
        streams = [asyncio.ensure_future(stream(client, a, args.tokens)) for a in arrivals]
        while min(len(a) for a in arrivals) < 5:
            await asyncio.sleep(0.01)
        t0 = time.monotonic()
        outcome = await send_huge(args.addr, args.prompt_mb)
        t1 = time.monotonic()
        await asyncio.gather(*streams)
    during, before = [], []
    for a in arrivals:
        gaps = [(b - x, b) for x, b in zip(a, a[1:])]
        during += [g for g, end in gaps if t0 <= end <= t1 + 0.5]
        before += [g for g, end in gaps if end < t0]
    print(f"{args.prompt_mb} MB prompt: {outcome} after {t1 - t0:.2f} s")
    print(f"other streams: longest gap while it was in flight {max(during, default=0) * 1e3:.1f} ms; "
          f"median gap before it {statistics.median(before) * 1e3:.1f} ms")


if __name__ == "__main__":
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--addr", required=True)
    p.add_argument("--prompt-mb", type=int, default=3)
    p.add_argument("--streams", type=int, default=8)
    p.add_argument("--tokens", type=int, default=2000)
    asyncio.run(main(p.parse_args()))
