"""CPU binding of the compute processes: the core lists, their sharing out, binding itself."""

from __future__ import annotations

import argparse
import os
import subprocess
import sys

import pytest

from stagemesh.runtime import cpus


def test_parse_reads_taskset_lists():
    assert cpus.parse("0") == [0]
    assert cpus.parse("0,2-4, 7") == [0, 2, 3, 4, 7]
    assert cpus.format_list(cpus.parse("3,1-2")) == "3,1,2"


@pytest.mark.parametrize(("text", "says"), [
    ("x", "'x' is not a core number"),
    ("1-", "'1-' is not a core number"),
    ("4-2", "'4-2' is not a core number"),
    ("-1", "'-1' is not a core number"),
    ("0,0-1", "names a core twice"),
])  # fmt: skip
def test_parse_refuses_bad_lists_and_says_which_part(text, says):
    with pytest.raises(ValueError, match=says):
        cpus.parse(text)
    with pytest.raises(argparse.ArgumentTypeError, match=says):
        cpus.arg(text)


def test_share_gives_disjoint_slices_in_order():
    # pp=2 on two cores: one core each
    assert cpus.share([0, 1], [1, 1]) == (1, [[0], [1]])
    # a tp=2 stage and an expert worker on 7 cores: 2 threads per rank, the 7th core left over
    assert cpus.share(list(range(7)), [2, 1]) == (2, [[0, 1, 2, 3], [4, 5]])
    # the cores this process may use need not start at 0 or be contiguous
    assert cpus.share([2, 3, 8, 9], [1, 1]) == (2, [[2, 3], [8, 9]])


def test_share_binds_nothing_when_ranks_outnumber_cores():
    assert cpus.share([0, 1], [2, 1]) == (1, None)
    with pytest.raises(ValueError, match="no compute processes"):
        cpus.share([0, 1], [])


def test_micro_batches_are_one_per_stage_unless_the_stages_cannot_compute_at_once():
    # every rank has a core of its own: every stage computes at once, one micro-batch each
    assert cpus.micro_batches(cores=2, ranks=2, stages=2, tp=1, chains=1) == 2
    assert cpus.micro_batches(cores=16, ranks=8, stages=4, tp=2, chains=1) == 4
    # pp=4 on two cores: two stages at a time
    assert cpus.micro_batches(cores=2, ranks=4, stages=4, tp=1, chains=1) == 2
    # pp=3 x tp=2 on four cores: two stages of two ranks at a time
    assert cpus.micro_batches(cores=4, ranks=6, stages=3, tp=2, chains=1) == 2
    # two chains of pp=2 share two cores: one stage each at a time
    assert cpus.micro_batches(cores=2, ranks=4, stages=2, tp=1, chains=2) == 1
    # fewer cores than one stage's ranks: still one micro-batch, never none
    assert cpus.micro_batches(cores=1, ranks=4, stages=2, tp=2, chains=1) == 1


def test_rank_slice_takes_the_ranks_own_cores_or_all_of_a_short_list():
    assert cpus.rank_slice([4, 5, 6, 7], 1, 2) == [6, 7]
    assert cpus.rank_slice([4, 5], 1, 2) == [4, 5]  # a list too short for rank 1: share it


def test_bind_rank_without_cores_leaves_the_process_alone():
    before = os.sched_getaffinity(0)
    assert cpus.bind_rank(None, 0, 3) == 3
    assert cpus.bind_rank(None, 0, None) is None
    assert os.sched_getaffinity(0) == before


def _in_child(code: str) -> subprocess.CompletedProcess:
    """Binding changes the calling process: run it in a fresh one."""
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)


def test_bind_rank_binds_every_thread_and_threads_started_later():
    core = cpus.available()[-1]
    code = f"""
import os, threading
from stagemesh.runtime import cpus
early = threading.Event(); done = threading.Event(); seen = {{}}
def watch(name, gate):
    gate.wait(); seen[name] = os.sched_getaffinity(0)
t = threading.Thread(target=watch, args=("early", early)); t.start()
threads = cpus.bind_rank([{core}], 0, None)
early.set(); t.join()
late = threading.Thread(target=watch, args=("late", done)); done.set(); late.start(); late.join()
print(threads, sorted(seen["early"]), sorted(seen["late"]), sorted(os.sched_getaffinity(0)))
"""
    out = _in_child(code)
    assert out.returncode == 0, out.stderr
    assert out.stdout.split("\n")[0] == f"1 [{core}] [{core}] [{core}]"


def test_bind_to_a_core_this_host_lacks_says_which_cores_it_has():
    out = _in_child("from stagemesh.runtime import cpus; cpus.bind([100000])")
    assert out.returncode != 0
    allowed = cpus.format_list(cpus.available())
    assert "cannot bind to cores 100000" in out.stderr and f"this host allows {allowed}" in out.stderr, out.stderr


def _python(code: str, **env: str) -> list[str]:
    """The lines ``code`` prints in a fresh interpreter without OMP_WAIT_POLICY (plus ``env``)."""
    clean = {k: v for k, v in os.environ.items() if k != "OMP_WAIT_POLICY"}
    out = subprocess.run([sys.executable, "-c", code], env={**clean, **env}, capture_output=True, text=True, check=True)
    return out.stdout.split()


def test_idle_team_sleeps_sets_passive_unless_the_environment_says_otherwise():
    code = "import os; from stagemesh.runtime import cpus; print(cpus.idle_team_sleeps(), os.environ['OMP_WAIT_POLICY'])"
    assert _python(code) == ["True", "passive"]
    assert _python(code, OMP_WAIT_POLICY="active") == ["True", "active"]


def test_idle_team_sleeps_too_late_once_torch_is_loaded():
    code = "import os, torch; from stagemesh.runtime import cpus; print(cpus.idle_team_sleeps(), 'OMP_WAIT_POLICY' in os.environ)"
    assert _python(code) == ["False", "False"]


def test_the_stage_worker_sets_the_policy_before_it_loads_torch():
    code = (
        "import os, runpy, sys\n"
        "sys.argv = ['stage_worker', '--help']\n"
        "try:\n    runpy.run_module('stage_worker', run_name='__main__')\n"
        "except SystemExit:\n    pass\n"
        "print('RESULT', os.environ.get('OMP_WAIT_POLICY'), 'torch' in sys.modules)"
    )
    assert _python(code)[-3:] == ["RESULT", "passive", "True"]
