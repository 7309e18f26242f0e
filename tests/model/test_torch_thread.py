"""One thread does a process's torch work: ``stagemesh.model.torch_thread`` and the places that
must load a model on the thread that steps it (see the module's NOTE for why)."""

from __future__ import annotations

import asyncio
import threading
from concurrent.futures import ThreadPoolExecutor

import expert_worker.servicer
import stagemesh.runners.local
from expert_worker.place import ExpertPlace
from expert_worker.servicer import ExpertServicer
from stagemesh.cli.demo import write_demo_model
from stagemesh.cli.inprocess import InProcessEngine
from stagemesh.cli.requests_io import InputLine
from stagemesh.model import torch_thread
from stagemesh.runners.expert import ExpertRunner
from stagemesh.serving.types import SamplingParams

TINY = dict(hidden_size=32, num_layers=2, intermediate_size=48, vocab_size=300)


def test_call_and_run_use_one_thread_that_is_not_the_callers():
    async def from_a_loop():
        return await torch_thread.run(threading.get_ident)

    first = torch_thread.call(threading.get_ident)
    assert first != threading.get_ident()
    assert torch_thread.call(threading.get_ident) == first
    assert asyncio.run(from_a_loop()) == first
    assert torch_thread.call(torch_thread.on_torch_thread) and not torch_thread.on_torch_thread()


def test_torch_work_that_calls_torch_work_runs_inline_instead_of_waiting_on_itself():
    async def nested_loop():  # an event loop running on the torch thread (e.g. a script under ``call``)
        return await torch_thread.run(threading.get_ident)

    def outer():
        return threading.get_ident(), torch_thread.call(threading.get_ident), asyncio.run(nested_loop())

    with ThreadPoolExecutor(1) as watchdog:  # a deadlock fails the test instead of hanging it
        outer_id, nested_call, nested_run = watchdog.submit(torch_thread.call, outer).result(timeout=30)
    assert outer_id == nested_call == nested_run


def _recording_builds(monkeypatch, module, name):
    """Replaces ``module.name`` (a class) by a subclass that records the thread building it."""
    built_on = []

    class Recorded(getattr(module, name)):
        def __init__(self, *args, **kwargs):
            built_on.append(threading.get_ident())
            super().__init__(*args, **kwargs)

    monkeypatch.setattr(module, name, Recorded)
    return built_on


def test_the_in_process_chain_is_built_and_stepped_on_the_torch_thread(tmp_path, monkeypatch):
    model = write_demo_model(tmp_path, family="llama", seed=1, **TINY)
    built_on = _recording_builds(monkeypatch, stagemesh.runners.local, "StageRunner")
    engine = InProcessEngine(model, pp=2, num_kv_blocks=16)
    stepped_on = []
    run = engine.chain.run

    def recording_run(plan):
        stepped_on.append(threading.get_ident())
        return run(plan)

    engine.chain.run = recording_run
    [out] = asyncio.run(engine.run([InputLine(None, (5, 6, 7), SamplingParams(max_new_tokens=3, ignore_eos=True))]))
    assert len(out.token_ids) == 3 and out.error is None
    torch_id = torch_thread.call(threading.get_ident)
    assert len(built_on) == 2 and set(built_on) == {torch_id}
    assert stepped_on and set(stepped_on) == {torch_id}


def test_an_expert_worker_builds_its_experts_on_the_thread_that_runs_them(tmp_path, monkeypatch):
    model = write_demo_model(tmp_path, family="qwen2_moe", seed=1, num_experts=4, moe_intermediate_size=16,
                             shared_expert_intermediate_size=24, **TINY)
    built_on = _recording_builds(monkeypatch, expert_worker.servicer, "ExpertRunner")
    place = ExpertPlace(chain=0, worker=0, address="127.0.0.1:1", device="cpu", model=str(model), dtype=None,
                        experts={0: [0, 1], 1: [2, 3]})
    servicer = ExpertServicer(place)
    runner = asyncio.run(servicer.load())
    assert isinstance(runner, ExpertRunner) and servicer.runner is runner
    compute_id = servicer._thread.submit(threading.get_ident).result()
    assert built_on == [compute_id] and compute_id != threading.get_ident()
    servicer.close()
