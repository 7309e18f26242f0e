"""The pure parts of `stagemesh bench`: the load, the statistics, the busy windows, the FLOPs."""

from __future__ import annotations

import os
import subprocess
import sys
from functools import partial

import pytest

from stagemesh.cli.bench import BenchSpec
from stagemesh.cli.bench import mesh as bench_mesh
from stagemesh.cli.bench.local import _import_transformers
from stagemesh.cli.bench.mesh import is_local, runs_module, stage_figures
from stagemesh.cli.bench.roofline import flops_needed, model_cost, roofline_figures
from stagemesh.cli.bench.workload import (
    BenchRequest,
    LoadShape,
    Trace,
    arrival_offsets,
    latency_figures,
    make_requests,
    percentile,
)
from stagemesh.cli.demo import write_demo_model
from stagemesh.runtime.net import free_port


def test_requests_are_seeded_within_their_ranges_and_avoid_reserved_ids():
    shape = LoadShape(requests=50, input_len=3, input_len_max=9, output_len=2, output_len_max=5, seed=7)
    a, b = make_requests(shape, 20, reserved=(0, 1)), make_requests(shape, 20, reserved=(0, 1))
    assert a == b and len(a) == 50
    assert all(3 <= len(r.token_ids) <= 9 and 2 <= r.output_len <= 5 for r in a)
    assert {t for r in a for t in r.token_ids} <= set(range(2, 20))
    assert make_requests(LoadShape(requests=5, input_len=3, output_len=2, seed=8), 20) != a[:5]


def test_arrivals_are_all_at_once_or_a_seeded_poisson_process():
    assert arrival_offsets(LoadShape(requests=3, input_len=1, output_len=1)) == [0.0, 0.0, 0.0]
    offsets = arrival_offsets(LoadShape(requests=2000, input_len=1, output_len=1, rate=50.0))
    assert offsets[0] == 0.0 and offsets == sorted(offsets)
    assert 35 < offsets[-1] < 45  # 1999 gaps of mean 1/50 s


@pytest.mark.parametrize("kwargs, message", [
    (dict(requests=0), "--requests=0"),
    (dict(input_len_max=2), "--input-len-max=2"),
    (dict(concurrency=2, rate=1.0), "not both"),
    (dict(rate=0.0), "--rate=0.0"),
])
def test_bad_load_shapes_are_refused(kwargs, message):
    with pytest.raises(ValueError, match=message):
        LoadShape(**{"requests": 2, "input_len": 4, "output_len": 4, **kwargs})


def test_bad_specs_are_refused(tmp_path):
    shape = LoadShape(requests=1, input_len=1, output_len=1)
    with pytest.raises(ValueError, match="--compare vllm"):
        BenchSpec(tmp_path, shape, compare=("vllm",))
    with pytest.raises(ValueError, match="nothing to run"):
        BenchSpec(tmp_path, shape, mesh=False)
    with pytest.raises(ValueError, match="--micro-batches=0 must be at least 1"):
        BenchSpec(tmp_path, shape, micro_batches=0)
    with pytest.raises(ValueError, match="not with --addr"):
        BenchSpec(tmp_path, shape, addr="127.0.0.1:1", micro_batches=2)
    assert BenchSpec(tmp_path, shape, pp=4, micro_batches=2).layout == "pp=4 tp=1 micro-batches=2"


def test_percentiles_interpolate_and_latencies_come_from_token_times():
    assert percentile([], 50) is None
    assert percentile([3.0, 1.0, 2.0], 50) == 2.0
    assert percentile([0.0, 10.0], 99) == pytest.approx(9.9)
    traces = [Trace(sent=0.0, token_times=[0.5, 0.6, 0.9]), Trace(sent=1.0, token_times=[1.1])]
    figures = latency_figures(traces)
    assert figures["ttft_s"]["p50"] == pytest.approx(0.3)  # first tokens after 0.5 s and 0.1 s
    assert figures["itl_s"]["mean"] == pytest.approx(0.2)  # gaps 0.1 and 0.3


def test_busy_fraction_clips_intervals_to_the_window_and_falls_back_to_busy_s():
    window = (10.0, 20.0)
    after = {
        # 3 steps in the window, all kept: [9, 11] counts 1 s, [12, 14] 2 s, [19, 22] 1 s -> 4 s of 10
        "stage-c0-s0": {"steps": 5, "busy_s": 9.0, "busy_intervals": [[5, 6], [9, 11], [12, 14], [19, 22]]},
        # 6 steps but only 2 intervals kept: busy_s grew by 5 s -> 50 %
        "stage-c0-s10": {"steps": 6, "busy_s": 6.0, "busy_intervals": [[18, 19], [19.5, 20]]},
        "stage-c0-s2": {"steps": 1, "busy_s": 1.0, "busy_intervals": [[12, 13]]},
    }
    before = {"stage-c0-s0": {"steps": 2, "busy_s": 1.0}, "stage-c0-s10": {"steps": 0, "busy_s": 1.0}}
    stages = stage_figures(before, after, *window)
    assert [s["worker"] for s in stages] == ["stage-c0-s0", "stage-c0-s2", "stage-c0-s10"]
    assert [s["busy_fraction"] for s in stages] == pytest.approx([0.4, 0.1, 0.5])
    assert [s["source"] for s in stages] == ["busy_intervals", "busy_intervals", "busy_s"]


def test_step_overhead_is_the_chains_step_interval_less_each_stages_compute():
    # a 2 s window. chain 0: s0 ran 100 steps (a step every 20 ms), busy 1.2 s (12 ms a step), s1 busy 0.8 s;
    # chain 1: s0 ran 50 steps (every 40 ms), busy 1.0 s (20 ms a step); its s1 ran none
    after = {"stage-c0-s0": {"steps": 100, "busy_s": 1.2}, "stage-c0-s1": {"steps": 100, "busy_s": 0.8},
             "stage-c1-s0": {"steps": 50, "busy_s": 1.0}, "stage-c1-s1": {"steps": 0, "busy_s": 0.0}}
    stages = stage_figures({}, after, 10.0, 12.0)
    figures = [(s["step_interval_ms"], s["compute_ms"], s["overhead_ms"]) for s in stages]
    assert figures[:3] == [pytest.approx((20, 12, 8)), pytest.approx((20, 8, 12)), pytest.approx((40, 20, 20))]
    assert figures[3] == (pytest.approx(40), None, None)


def test_a_running_meshs_processes_come_from_its_status_and_are_unknown_elsewhere():
    workers = [{"role": "stage", "chain": 0, "stage": 1, "pid": 11, "address": "127.0.0.1:5001"},
               {"role": "expert", "chain": 0, "stage": -1, "pid": 12, "address": "127.0.0.1:5002"}]
    status_processes = partial(bench_mesh.status_processes, runs=lambda pid, module: True)  # as the document says
    procs = status_processes({"workers": workers}, local=True)
    assert [(p.name, p.role, p.pid) for p in procs[:-1]] == [
        ("gateway", "gateway", None), ("redis", "redis", None),  # the status document gives neither pid
        ("stage-c0-s1", "stages", 11), ("expert-127.0.0.1:5002", "experts", 12)]
    assert procs[-1].role == "client" and not procs[-1].with_children
    assert status_processes({"workers": workers, "gateway": {"pid": 9}}, local=True)[0].pid == 9
    attached = {"pid": 9, "frontends": [{"name": "frontend-0", "pid": 21, "requests": 3},
                                        {"name": "web-1", "pid": None}]}
    procs = status_processes({"workers": [], "gateway": attached}, local=True)
    assert [(p.name, p.role, p.pid) for p in procs[:-1]] == [
        ("gateway", "gateway", 9), ("redis", "redis", None),
        ("frontend-0", "frontends", 21), ("frontend-web-1", "frontends", None)]
    assert [p.pid for p in status_processes({"workers": workers}, local=False)[:-1]] == [None] * 4
    assert [is_local(a) for a in ("127.0.0.1:5", "localhost:5", "[::1]:5", "10.1.2.3:5")] == [True, True, True, False]


def test_a_pid_that_here_runs_another_program_than_its_role_is_unknown():
    """Against compose's published port the status document gives the containers' own pids: here
    they name other processes, whose CPU would be reported as the mesh's."""
    module = "tests.runtime.watched_server"
    other = subprocess.Popen([sys.executable, "-m", module, str(free_port()), "0"], stdout=subprocess.PIPE, text=True)
    try:
        assert other.stdout.readline().strip() == "serving"  # past its exec: /proc shows its own command line
        assert runs_module(other.pid, module) and not runs_module(other.pid, "gateway")
        doc = {"gateway": {"pid": other.pid, "frontends": [{"name": "frontend-0", "pid": os.getpid()}]},
               "workers": [{"role": "stage", "chain": 0, "stage": 0, "pid": 1, "address": "a:1"}]}
        assert [(p.name, p.pid) for p in bench_mesh.status_processes(doc, local=True)[:-1]] == [
            ("gateway", None), ("redis", None), ("frontend-0", None), ("stage-c0-s0", None)]
    finally:
        other.kill()
        other.wait()
    assert not runs_module(other.pid, module)  # gone


def test_flops_follow_the_documented_formula(tmp_path):
    write_demo_model(tmp_path, family="llama", hidden_size=32, num_layers=2, num_heads=4, num_kv_heads=2,
                     intermediate_size=48, vocab_size=300)
    cost = model_cost(tmp_path)
    # per layer: q 32*32 + k, v 32*16 each + o 32*32 + MLP 3*32*48 + 2 norms of 32; plus the final norm
    layer = 1024 + 2 * 512 + 1024 + 3 * 32 * 48 + 64
    assert cost.layer_params == 2 * layer + 32 and cost.lm_head_params == 300 * 32
    assert cost.weight_bytes == 4 * (cost.layer_params + cost.lm_head_params)
    # prompt 3 + 2 outputs: T = 4 positions run; attention sees 1+2+3+4 = 10 keys in all
    flops = flops_needed(cost, [BenchRequest((5, 6, 7), 2)])
    assert flops == 2 * cost.layer_params * 4 + 2 * 300 * 32 * 2 + 4 * 2 * 32 * 10


def test_a_missing_transformers_is_a_clear_error(monkeypatch):
    monkeypatch.setitem(sys.modules, "transformers", None)
    with pytest.raises(ValueError, match="--compare hf needs Hugging Face transformers"):
        _import_transformers()


def test_roofline_is_flops_on_cpu_and_weight_bytes_on_cuda(tmp_path):
    write_demo_model(tmp_path, family="llama", hidden_size=32, num_layers=1, vocab_size=300)
    cost = model_cost(tmp_path)
    cpu = {"kind": "cpu", "peak_flops_per_s": 100.0, "peak_bytes_per_s": 4.0 * cost.weight_bytes}
    figures = roofline_figures(2.0, 4, 50.0, cost, cpu)
    assert figures["roofline_fraction"] == 0.25 and figures["bandwidth_fraction"] == 0.5
    cuda = {"kind": "cuda", "peak_bytes_per_s": 4.0 * cost.weight_bytes}
    assert roofline_figures(2.0, 4, 50.0, cost, cuda)["roofline_fraction"] == 0.5
    assert roofline_figures(2.0, None, 50.0, cost, cuda)["roofline_fraction"] is None
