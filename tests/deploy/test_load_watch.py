"""Load progress: a loader reports each layer, the worker logs it, `stagemesh up` follows the logs."""

from __future__ import annotations

import io
import logging

from stagemesh.cli.demo import write_demo_model
from stagemesh.config import StageSpec
from stagemesh.deploy.load_watch import LoadWatch
from stagemesh.runtime.load_progress import LoadProgress, latest, line, reporter


def test_a_stage_runner_reports_each_layer_it_loaded(tmp_path):
    from stagemesh.runners.stage import StageRunner

    model = write_demo_model(tmp_path / "m", family="llama", num_layers=3, hidden_size=32, vocab_size=300)
    seen = []
    StageRunner(model, StageSpec(1, 3, 3), num_kv_blocks=4, progress=lambda done, total: seen.append((done, total)))
    assert seen == [(1, 2), (2, 2)]


def test_the_log_line_is_read_back_as_written(caplog):
    with caplog.at_level(logging.INFO):
        reporter(logging.getLogger("w"), "layers")(3, 12)
    assert latest(caplog.text) == LoadProgress(3, 12, "layers")
    assert latest(f"x\n{line(1, 4, 'layers')}\ny\n{line(2, 4, 'layers')}\n") == LoadProgress(2, 4, "layers")
    assert latest("no progress here") is None


def test_without_a_terminal_each_worker_gets_lines_from_where_its_run_starts(tmp_path):
    log = tmp_path / "stage-c0-s0.log"
    log.write_text(f"an earlier run: {line(9, 9, 'layers')}\n")
    out = io.StringIO()
    watch = LoadWatch({"stage-c0-s0": (log, log.stat().st_size)}, out=out, tty=False)
    watch.poll()
    assert out.getvalue() == ""
    with log.open("a") as f:
        f.write(f"2024 INFO stage: {line(1, 2, 'layers')}\n2024 INFO stage: load progress 2/2 lay")  # half a line
    watch.poll()
    assert out.getvalue() == "stage-c0-s0: loading 1/2 layers\n"
    with log.open("a") as f:
        f.write("ers\n")
    watch.close()
    assert out.getvalue().splitlines() == ["stage-c0-s0: loading 1/2 layers", "stage-c0-s0: loaded 2/2 layers"]


def test_on_a_terminal_each_worker_gets_a_bar(tmp_path):
    logs = {}
    for name in ("stage-c0-s0", "stage-c0-s1"):
        (tmp_path / f"{name}.log").write_text(f"{line(1, 3, 'layers')}\n")
        logs[name] = (tmp_path / f"{name}.log", 0)
    out = io.StringIO()
    with LoadWatch(logs, out=out, tty=True) as watch:
        watch.poll()
        assert set(watch._bars) == set(logs)
        assert all(bar.n == 1 and bar.total == 3 for bar in watch._bars.values())
    assert "stage-c0-s1" in out.getvalue() and "1/3" in out.getvalue()
