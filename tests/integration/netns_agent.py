"""The client side of a two-host test, run inside host A's namespace (``python -m
tests.integration.netns_agent``): the test process lives outside every namespace it creates, so
whatever must reach the mesh — the SDK's calls, the topology written to Redis — goes through this
agent, and the mesh's traffic stays inside the namespaces.

One JSON command per line on stdin, one JSON answer per line on stdout (``{"error": ...}`` when
it failed); logs go to stderr. The Redis URL and the certificates come from the environment
(``STAGEMESH_REDIS_URL``, ``STAGEMESH_TLS_DIR``), as for every process of the mesh. Commands:

- ``{"op": "write_topology", "topology": JSON, "deployment": D}``: write it, signed with the mesh key.
- ``{"op": "status", "addr": A}``: the gateway's status document.
- ``{"op": "wait_chain", "addr": A, "chain": C, "healthy": B, "timeout": S, "cmd": [...]}``: run
  ``cmd`` (optional), then wait until chain ``C``'s ``healthy`` is ``B``; ``{"seconds": ...}`` since ``cmd``.
- ``{"op": "streams", "addr": A, "requests": [...], "fire_after": N, "cmd": [...], "watch_chain": C}``:
  every request at once; once ``N`` tokens arrived in all, the running requests per chain are
  read and ``cmd`` is run (optional); then ``{"tokens": [[...], ...], "longest_gap_s": ...,
  "running_at_fire": {...}, "chain_out_s": seconds from ``cmd`` until chain ``C`` left service,
  "since_fire_s": seconds from ``cmd`` until the answer}``.
"""

from __future__ import annotations

import asyncio
import json
import os
import sys
import time
from subprocess import PIPE, STDOUT

from stagemesh import AsyncClient
from stagemesh.mesh.signing import load_signer
from stagemesh.mesh.topology import Topology
from stagemesh.runtime.startup import REDIS_URL_ENV
from stagemesh.runtime.tls import TLS_DIR_ENV

CALL_TIMEOUT_S = 90.0


async def run(argv: list[str]) -> None:
    """Run a command (the link down or up); RuntimeError with its output when it fails."""
    proc = await asyncio.create_subprocess_exec(*argv, stdout=PIPE, stderr=STDOUT)
    out, _ = await proc.communicate()
    if proc.returncode != 0:
        raise RuntimeError(f"{argv} exited with {proc.returncode}: {out.decode(errors='replace')}")


async def write_topology(cmd: dict) -> dict:
    from stagemesh.deploy.up_plan import write_topology as write

    signer = load_signer(os.environ.get(TLS_DIR_ENV))
    await write(os.environ[REDIS_URL_ENV], cmd["deployment"], Topology.from_json(cmd["topology"]), signer=signer)
    return {"ok": True}


async def status(cmd: dict) -> dict:
    async with AsyncClient(cmd["addr"], timeout=10) as client:
        return await client.status()


async def wait_chain(cmd: dict) -> dict:
    start = time.monotonic()
    if cmd.get("cmd"):
        await run(cmd["cmd"])
    async with AsyncClient(cmd["addr"], timeout=10) as client:
        while True:
            try:
                chains = {c["id"]: c for c in (await client.status())["chains"]}
                if chains.get(cmd["chain"], {}).get("healthy") == cmd["healthy"]:
                    return {"seconds": time.monotonic() - start}
            except Exception as err:  # noqa: BLE001 - the gateway may be busy starting; keep asking
                print(f"status: {err!r}", file=sys.stderr)
            if time.monotonic() - start > cmd["timeout"]:
                return {"error": f"chain {cmd['chain']} not healthy={cmd['healthy']} after {cmd['timeout']} s"}
            await asyncio.sleep(0.05)


async def streams(cmd: dict) -> dict:
    """Every request at once on one client (see the module docstring)."""
    fire_after, fired = cmd.get("fire_after"), asyncio.Event()
    received, longest, report = 0, 0.0, {}

    async with AsyncClient(cmd["addr"], timeout=CALL_TIMEOUT_S) as client:

        async def one(request: dict) -> list[int]:
            nonlocal received, longest
            tokens, last = [], None
            async for item in client.stream(**request):
                if item.token_id is None:
                    continue
                if item.index != len(tokens):
                    raise AssertionError(f"token index {item.index} after {len(tokens)} tokens")
                now = time.monotonic()
                longest = max(longest, now - last) if last is not None else longest
                last = now
                tokens.append(item.token_id)
                received += 1
                if received == fire_after:
                    fired.set()
            return tokens

        async def fault() -> None:
            await fired.wait()
            doc = await client.status()
            report["running_at_fire"] = {str(c["id"]): c["requests_running"] for c in doc["chains"]}
            t_fire = report["t_fire"] = time.monotonic()
            await run(cmd["cmd"])
            report["fired_after_tokens"] = received
            while (watch := cmd.get("watch_chain")) is not None:
                chains = {c["id"]: c for c in (await client.status())["chains"]}
                if not chains[watch]["healthy"]:
                    report["chain_out_s"] = time.monotonic() - t_fire
                    return
                await asyncio.sleep(0.05)

        watcher = asyncio.ensure_future(fault()) if cmd.get("cmd") else None
        t0 = time.monotonic()
        tokens = await asyncio.gather(*(one(r) for r in cmd["requests"]))
        report["wall_s"] = time.monotonic() - t0
        if watcher is not None and not fired.is_set():
            watcher.cancel()
            raise AssertionError(f"the command never ran: the streams ended after {received} tokens")
        if watcher is not None:
            await asyncio.wait_for(watcher, 30)
            report["since_fire_s"] = time.monotonic() - report.pop("t_fire")
    return {"tokens": tokens, "longest_gap_s": longest, **report}


OPS = {"write_topology": write_topology, "status": status, "wait_chain": wait_chain, "streams": streams}


def main() -> int:
    for line in sys.stdin:
        cmd = json.loads(line)
        try:
            answer = asyncio.run(OPS[cmd["op"]](cmd))
        except Exception as err:  # noqa: BLE001 - the test reads the error and fails there
            answer = {"error": f"{type(err).__name__}: {err}"}
        print(json.dumps(answer), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
