"""The garbage collector a serving process runs with (``stagemesh.runtime.gc_policy``): each case
runs in a fresh interpreter, so that pytest's own heap is never frozen."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import pytest

from stagemesh.runtime import gc_policy
from stagemesh.runtime.startup import StartupError


def _python(code: str, **env: str) -> dict:
    """Runs ``code`` in a fresh interpreter (with ``env`` added); what it printed last, as JSON."""
    out = subprocess.run([sys.executable, "-c", textwrap.dedent(code)], env={**os.environ, **env},
                         capture_output=True, text=True, timeout=120, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


SERVE_THEN_REPORT = """
    import asyncio, gc, json, os, signal, weakref
    from stagemesh.runtime.net import free_port
    from stagemesh.runtime.server import Role, WorkerServer, run

    class Plain(Role):
        served = False

        async def load(self, server):
            await server.start(f"127.0.0.1:{free_port()}", lambda grpc_server: None)

        async def serve(self, server):
            await super().serve(server)
            self.served = True

    before = {"frozen": gc.get_freeze_count(), "threshold": gc.get_threshold()}

    async def main():
        role = Plain()
        life = asyncio.create_task(run(WorkerServer("test.Worker", grace_s=1.0), role))
        while not role.served:
            await asyncio.sleep(0.01)
        await asyncio.sleep(0.1)  # ``run`` goes on from ``serve`` at once: the settling is behind it

        class Node:
            pass
        a, b = Node(), Node()
        a.other, b.other = b, a  # a cycle made after the heap was settled
        gone = weakref.ref(a)
        del a, b
        gc.collect()
        after = {"frozen": gc.get_freeze_count(), "threshold": gc.get_threshold(),
                 "cycle_collected": gone() is None}
        os.kill(os.getpid(), signal.SIGTERM)
        return after, await life

    after, code = asyncio.run(main())
    print(json.dumps({"before": before, "after": after, "exit": code}))
"""


def test_a_serving_process_freezes_its_startup_heap_and_collects_the_young_in_larger_batches():
    seen = _python(SERVE_THEN_REPORT)
    assert seen["exit"] == 0
    assert seen["before"]["frozen"] == 0
    assert seen["after"]["frozen"] > 1_000  # modules, gRPC, the server: startup's objects
    assert seen["after"]["threshold"] == [gc_policy.YOUNGEST_THRESHOLD, *seen["before"]["threshold"][1:]]
    assert seen["after"]["cycle_collected"], "garbage made after the freeze must still be collected"


def test_python_s_own_collector_when_the_environment_asks_for_it():
    seen = _python(SERVE_THEN_REPORT, STAGEMESH_GC="python")
    assert seen["exit"] == 0
    assert seen["after"]["frozen"] == 0
    assert seen["after"]["threshold"] == seen["before"]["threshold"]
    assert seen["after"]["cycle_collected"]


def test_an_unknown_policy_is_a_startup_error_naming_the_choices(monkeypatch):
    monkeypatch.setenv(gc_policy.GC_ENV, "off")
    with pytest.raises(StartupError, match=r"STAGEMESH_GC='off': expected one of tuned, python"):
        gc_policy.wanted()
    monkeypatch.setenv(gc_policy.GC_ENV, " ")
    assert gc_policy.wanted() == "tuned"
