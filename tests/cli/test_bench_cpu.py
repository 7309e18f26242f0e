"""Where a benchmark's CPU goes (`stagemesh.cli.bench.cpu`): /proc lines written by hand, and one real child."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from stagemesh.cli.bench.cpu import (
    CpuProbe,
    MeshProcess,
    ProcStat,
    cpu_figures,
    parse_stat,
    read_stats,
    role_of,
    subtree,
)


def _stat(pid: int, comm: str, ppid: int, utime: int, stime: int) -> str:
    """A /proc/PID/stat line: fields 3-13, then utime (14), stime (15), then the rest."""
    return f"{pid} ({comm}) S {ppid} {pid} {pid} 0 -1 4194560 900 0 0 0 {utime} {stime} 0 0 20 0 3 0 1234 0 0\n"


def test_stat_lines_parse_even_with_spaces_and_parentheses_in_the_name():
    assert parse_stat(_stat(42, "python3", 7, 150, 25)) == ProcStat(pid=42, ppid=7, cpu_ticks=175)
    # a name such as "a) S 1 (b" must not shift the fields: they count after the last ")"
    assert parse_stat(_stat(43, "a) S 1 (b", 42, 3, 4)) == ProcStat(pid=43, ppid=42, cpu_ticks=7)


def test_process_names_fall_into_role_groups():
    names = ["gateway", "frontend-0", "frontend-12", "stage-c0-s1", "expert-c1-e0", "redis", "client", "grafana"]
    assert [role_of(n) for n in names] == [
        "gateway", "frontends", "frontends", "stages", "experts", "redis", "client", "other"]


def test_a_subtree_takes_descendants_but_stops_at_other_mesh_processes():
    # 1 (bench) -> 10 (stage) -> 11 (TP rank) -> 12 (its helper); 1 -> 20 (gateway) -> 21 (frontend, a mesh process)
    stats = {p: ProcStat(p, parent, 0) for p, parent in [(1, 0), (10, 1), (11, 10), (12, 11), (20, 1), (21, 20)]}
    assert subtree(10, stats, stop={10, 20, 21}) == [10, 11, 12]
    assert subtree(20, stats, stop={10, 20, 21}) == [20]
    assert subtree(1, stats, stop=set()) == [1, 10, 11, 12, 20, 21]


def _probe(before: dict[int, ProcStat], after: dict[int, ProcStat]) -> CpuProbe:
    probe = CpuProbe()
    probe.before, probe.after = before, after
    return probe


def test_cpu_figures_sum_each_process_with_its_children_per_role_and_per_token():
    # ticks of 10 ms. pid 1 is the bench client, parent of everything; 10 a stage, 11 its TP rank
    # (started inside the window: counted from 0); 20 the gateway; 30 Redis; 40 a stage that died.
    before = {1: ProcStat(1, 0, 100), 10: ProcStat(10, 1, 500), 20: ProcStat(20, 1, 50), 30: ProcStat(30, 1, 7),
              40: ProcStat(40, 1, 9)}
    after = {1: ProcStat(1, 0, 130), 10: ProcStat(10, 1, 700), 11: ProcStat(11, 10, 100), 20: ProcStat(20, 1, 90),
             30: ProcStat(30, 1, 8)}
    procs = [MeshProcess("gateway", 20), MeshProcess("stage-c0-s0", 10), MeshProcess("stage-c0-s1", 40),
             MeshProcess("redis", 30), MeshProcess("client", 1, with_children=False)]
    doc = cpu_figures(procs, _probe(before, after), output_tokens=1000, window_s=2.0, tick_s=0.01)
    rows = {r["name"]: r for r in doc["processes"]}
    assert rows["stage-c0-s0"]["pids"] == [10, 11] and rows["stage-c0-s0"]["cpu_s"] == pytest.approx(3.0)  # 200 + 100
    assert rows["stage-c0-s1"]["cpu_s"] is None  # gone at the second reading
    assert rows["client"]["pids"] == [1] and rows["client"]["cpu_s"] == pytest.approx(0.3)
    roles = doc["roles"]
    assert list(roles) == ["gateway", "frontends", "stages", "experts", "redis", "client", "total"]
    assert roles["gateway"] == pytest.approx({"processes": 1, "unknown": 0, "cpu_s": 0.4, "us_per_token": 400.0,
                                              "cores": 0.2})
    assert roles["frontends"] == {"processes": 0, "unknown": 0, "cpu_s": 0, "us_per_token": 0.0, "cores": 0.0}
    assert roles["stages"]["unknown"] == 1 and roles["stages"]["cpu_s"] == pytest.approx(3.0)
    assert roles["total"]["cpu_s"] == pytest.approx(0.4 + 3.0 + 0.01 + 0.3)
    assert roles["total"]["us_per_token"] == pytest.approx(roles["total"]["cpu_s"] / 1000 * 1e6)


def test_an_unknown_pid_is_reported_as_unknown_not_guessed():
    stats = {5: ProcStat(5, 1, 10)}
    doc = cpu_figures([MeshProcess("gateway", None), MeshProcess("stage-c0-s0", 5)], _probe(stats, stats), 10, 1.0, 0.01)
    assert doc["roles"]["gateway"] == {"processes": 1, "unknown": 1, "cpu_s": None, "us_per_token": None, "cores": None}
    assert doc["roles"]["total"]["unknown"] == 1 and doc["roles"]["total"]["cpu_s"] == 0


def test_read_stats_reads_every_numbered_entry_of_a_proc_folder(tmp_path):
    for pid, text in [(3, _stat(3, "redis-server", 1, 5, 6)), (4, "garbage")]:
        (tmp_path / str(pid)).mkdir()
        (tmp_path / str(pid) / "stat").write_text(text)
    (tmp_path / "self").mkdir()
    assert read_stats(tmp_path) == {3: ProcStat(3, 1, 11)}


BURNER = """
import sys, time
sys.stdin.readline()
t = time.process_time()
while time.process_time() - t < 0.3:
    pass
print("done", flush=True)
sys.stdin.readline()
"""


def test_a_real_child_that_burns_cpu_shows_in_the_figures():
    child = subprocess.Popen([sys.executable, "-c", BURNER], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        probe = CpuProbe()
        probe.start()
        child.stdin.write("go\n")
        child.stdin.flush()
        assert child.stdout.readline() == "done\n"
        probe.stop()
    finally:
        child.kill()
        child.wait()
    procs = [MeshProcess("stage-c0-s0", child.pid), MeshProcess("client", os.getpid(), with_children=False)]
    rows = {r["name"]: r for r in cpu_figures(procs, probe, output_tokens=1, window_s=1.0)["processes"]}
    assert 0.25 <= rows["stage-c0-s0"]["cpu_s"] < 2.0  # 0.3 s of user CPU, read in clock ticks
    assert rows["client"]["pids"] == [os.getpid()] and rows["client"]["cpu_s"] >= 0
