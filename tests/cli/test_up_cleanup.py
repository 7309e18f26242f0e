"""`stagemesh up` leaves no temporary directory behind when it stops before anything started."""

from __future__ import annotations

from pathlib import Path

from stagemesh.cli.demo import write_demo_model
from tests.cli_helpers import run_cli


def test_a_layout_the_model_cannot_take_fails_and_leaves_no_temp_dir(tmp_path):
    model = write_demo_model(tmp_path / "m", family="llama", num_layers=2, hidden_size=32, vocab_size=300)
    done = run_cli("up", "--model", str(model), "--pp", "5", "--insecure", timeout=60)
    assert done.returncode == 1 and "error:" in done.stderr, done.stderr
    first = done.stdout.splitlines()[0]
    assert first.startswith("stagemesh up: logs in "), done.stdout
    assert not Path(first.split("logs in ", 1)[1]).exists()
