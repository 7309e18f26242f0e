"""What one SIGKILL (or SIGSTOP) costs the streams of a running mesh: the longest gap between two
tokens that any stream saw while a gateway, a frontend or a stage worker died (or froze) and the
mesh took it back.

    python scripts/kill_gap.py --model /tmp/tiny --victim gateway|frontend|stage [--trials 5]
        [--pp 2] [--frontends 1] [--spare-frontends 0] [--standby-gateway] [--streams 16] [--tree DIR]
        [--port 50720]
        [--signal KILL|STOP] [--liveness-s S]

Starts ``stagemesh up --model MODEL --pp P --frontends F --insecure`` from the tree ``--tree``
(this checkout by default: two trees give a before/after pair), then per trial runs
``--streams`` greedy streams at once, each on a client of its own, SIGKILLs the victim once
every stream is well under way (the gateway and the stage by the pid the status document
gives, a frontend as the launcher's child), checks each stream got every token once, and
prints the longest gap; between trials it waits until the launcher restarted the victim and
the mesh is whole. With one frontend its clients wait for its restart, unless a spare frontend
takes its place (``--spare-frontends``: the victim is then the one serving slot 0); with a
standby gateway the standby takes over. ``--signal STOP`` freezes the victim instead: the launcher kills it once
it answered no health check for ``--liveness-s`` (its default unless given) and restarts it.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
MAX_NEW = 200


def _children(pid: int, module: str) -> list[int]:
    """Pids of ``pid``'s children running ``python -m module`` (its main thread's children)."""
    kids = Path(f"/proc/{pid}/task/{pid}/children").read_text().split()
    found = []
    for kid in kids:
        try:
            if module.encode() in Path(f"/proc/{kid}/cmdline").read_bytes().split(b"\0"):
                found.append(int(kid))
        except OSError:  # exited meanwhile
            pass
    return found


async def _status(addr: str) -> dict:
    from stagemesh import AsyncClient

    async with AsyncClient(addr, timeout=10) as client:
        return await client.status()


async def _whole(addr: str, pp: int) -> bool:
    try:
        doc = await _status(addr)
    except Exception:  # noqa: BLE001 - not serving yet
        return False
    stages = [w for w in doc["workers"] if w["role"] == "stage" and w["healthy"]]
    return len(stages) == pp and all(c["healthy"] for c in doc["chains"])


async def trial(addr: str, streams: int, kill) -> tuple[float, int]:
    """(the longest gap any stream saw, tokens in all) of one run with one kill."""
    from stagemesh import AsyncClient

    received, longest, fired = 0, 0.0, False

    async def one(i: int) -> int:
        nonlocal received, longest, fired
        prompt = [(7 * i + j) % 250 + 3 for j in range(4 + i % 5)]
        async with AsyncClient(addr, timeout=60) as client:
            last, count = time.monotonic(), 0
            async for _ in client.stream(token_ids=prompt, max_new_tokens=MAX_NEW, ignore_eos=True):
                now = time.monotonic()
                longest = max(longest, now - last) if count else longest
                last, count, received = now, count + 1, received + 1
                if not fired and received >= streams * MAX_NEW // 4:
                    fired = True
                    kill()
        return count

    counts = await asyncio.gather(*(one(i) for i in range(streams)))
    if any(c != MAX_NEW for c in counts):
        raise SystemExit(f"a stream lost or repeated tokens: {counts}")
    return longest, sum(counts)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", required=True)
    parser.add_argument("--victim", choices=["gateway", "frontend", "stage"], required=True)
    parser.add_argument("--trials", type=int, default=5)
    parser.add_argument("--pp", type=int, default=2)
    parser.add_argument("--frontends", type=int, default=1)
    parser.add_argument("--spare-frontends", type=int, default=0)
    parser.add_argument("--standby-gateway", action="store_true")
    parser.add_argument("--streams", type=int, default=16)
    parser.add_argument("--tree", type=Path, default=ROOT, help="the checkout whose code runs")
    parser.add_argument("--port", type=int, default=50720)
    parser.add_argument("--signal", choices=["KILL", "STOP"], default="KILL", help="kill the victim, or freeze it")
    parser.add_argument("--liveness-s", type=float, default=None, help="`up`'s --liveness-s (default: its own)")
    args = parser.parse_args()
    sig = getattr(signal, f"SIG{args.signal}")
    tree = args.tree.resolve()
    command = [sys.executable, "-m", "stagemesh.cli", "up", "--model", args.model, "--pp", str(args.pp), "--insecure",
               "--frontends", str(args.frontends), "--port", str(args.port)]
    command += ["--standby-gateway"] if args.standby_gateway else []
    logs = Path(tempfile.mkdtemp(prefix="kill-gap-"))  # where a spare's slot files are
    command += ["--spare-frontends", str(args.spare_frontends), "--log-dir", str(logs)]
    command += ["--liveness-s", str(args.liveness_s)] if args.liveness_s is not None else []
    up = subprocess.Popen(command, cwd=tree, env=dict(os.environ, PYTHONPATH=str(tree)), stdout=subprocess.PIPE,
                          stderr=subprocess.STDOUT, text=True, start_new_session=True)
    addr = f"127.0.0.1:{args.port}"
    try:
        for line in up.stdout:
            if line.startswith("stagemesh ready"):
                break
        else:
            raise SystemExit("stagemesh up ended before its ready line")
        for n in range(args.trials):
            doc = asyncio.run(_status(addr))
            if args.victim == "gateway":
                victim = doc["gateway"]["pid"]
            elif args.victim == "stage":
                victim = next(w["pid"] for w in doc["workers"] if w["role"] == "stage" and w["stage"] == args.pp - 1)
            elif args.spare_frontends:  # a serving one: it holds a slot's lock and wrote its pid there
                victim = int((logs / f"frontend-slot-0-{args.port}.lock").read_text())
            else:
                victim = _children(up.pid, "frontend")[0]
            gap, tokens = asyncio.run(trial(addr, args.streams, lambda: os.kill(victim, sig)))
            print(f"{tree.name} {args.victim} SIG{args.signal} {n + 1}/{args.trials}: {tokens} tokens whole, "
                  f"longest gap {gap:.3f} s", flush=True)
            module, count = {"gateway": ("gateway", 1 + args.standby_gateway),
                             "frontend": ("frontend", args.frontends + args.spare_frontends),
                             "stage": ("stage_worker", args.pp)}[args.victim]
            deadline = time.monotonic() + 60
            while not (asyncio.run(_whole(addr, args.pp)) and len(_children(up.pid, module)) >= count):
                if time.monotonic() > deadline:
                    raise SystemExit("the mesh was not whole again 60 s after the kill")
                time.sleep(0.2)
            time.sleep(2.0)  # the restarted process settles (a standby or spare reaches its wait for the lock)
    finally:
        up.send_signal(signal.SIGTERM)
        up.wait(60)
        shutil.rmtree(logs, ignore_errors=True)


if __name__ == "__main__":
    main()
