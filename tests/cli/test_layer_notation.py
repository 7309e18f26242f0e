"""One notation for a stage's layers: half-open bounds, in the logs, `stagemesh status` and the
dashboard (server-rendered and redrawn)."""

from __future__ import annotations

from pathlib import Path

from stagemesh.cli.remote import format_status
from stagemesh.config import StageSpec, layer_range

ROOT = Path(__file__).resolve().parents[2]


def _worker(role: str, stage: int, layers: list) -> dict:
    return {"role": role, "chain": 0, "stage": stage, "layers": layers, "address": "127.0.0.1:1", "device": "cpu",
            "tp_size": 1, "pid": 1, "healthy": True, "load": {}}


def test_layer_ranges_are_half_open_bounds():
    assert layer_range(0, 12) == "[0, 12)"
    assert layer_range(3.5, 7) == "[3.5, 7)"
    assert StageSpec(0, 4, 8, attn_only_end=True).label == "[0, 3.5)"


def test_status_writes_them_so_and_a_dash_for_an_expert_worker():
    doc = {"model": "m", "version": "v", "chains": [],
           "workers": [_worker("stage", 0, [0, 3.5]), _worker("stage", 1, [3.5, 8]), _worker("expert", -1, [0, 0])]}
    rows = format_status(doc).splitlines()[-3:]
    assert "[0, 3.5)" in rows[0] and "[3.5, 8)" in rows[1]
    assert rows[2].split()[3] == "-"


def test_the_dashboard_writes_them_so():
    script = (ROOT / "gateway" / "static" / "dashboard.js").read_text()
    assert "`layers [${start}, ${end})`" in script
    dashboard = ROOT / "gateway" / "dashboard.py"
    if dashboard.exists():  # the server-rendered first paint
        from gateway.dashboard import holdings

        assert holdings(_worker("stage", 0, [0, 3.5])) == "layers [0, 3.5)"
