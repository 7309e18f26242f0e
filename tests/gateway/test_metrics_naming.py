"""Every series on ``/metrics`` follows Prometheus' naming rules: checked here by hand (always)
and by the real ``promtool check metrics`` (when it is on PATH)."""

from __future__ import annotations

import re
import shutil
import subprocess
from types import SimpleNamespace

import pytest
from prometheus_client import generate_latest

from gateway.metrics import GatewayMetrics
from tests.gateway.test_metrics import _snapshot

NAME = re.compile(r"^stagemesh_[a-z0-9]+(_[a-z0-9]+)*$")
RESERVED_SUFFIXES = ("_total", "_count", "_sum", "_bucket")
ABBREVIATED_UNITS = ("s", "ms", "us", "ns", "sec", "b", "kb", "mb", "gb", "tb", "pb", "m", "h", "d")
"""promtool's ``lintUnitAbbreviations`` list: base units are spelled out (``_seconds``, ``_bytes``)."""
NON_BASE_UNITS = ("milliseconds", "microseconds", "nanoseconds", "minutes", "hours", "days",
                  "kilobytes", "megabytes", "gigabytes", "percent")


def _chain(chain_id: int) -> SimpleNamespace:
    scheduler = SimpleNamespace(num_running=1, num_waiting=2, kv_blocks_used=3, config=SimpleNamespace(num_blocks=64))
    return SimpleNamespace(chain_id=chain_id, healthy=True, engine=SimpleNamespace(scheduler=scheduler))


def _exposition() -> str:
    """The text a scrape returns with a request seen, a chain, stages and an expert worker."""
    metrics = GatewayMetrics()
    tracker = metrics.track()
    tracker.admitted(0)
    tracker.token()
    tracker.token()
    tracker.outcome = "ok"
    tracker.done()
    metrics.mesh.snapshot = _snapshot()
    metrics.mesh.snapshot.chains = [_chain(0)]
    return generate_latest(metrics.registry).decode()


def _declared(text: str) -> dict[str, dict[str, str]]:
    """family name (as exposed) -> {"help": ..., "type": ...}, from the HELP and TYPE lines."""
    families: dict[str, dict[str, str]] = {}
    for line in text.splitlines():
        match = re.match(r"^# (HELP|TYPE) (\S+) ?(.*)$", line)
        if match:
            families.setdefault(match[2], {})[match[1].lower()] = match[3]
    return families


def _problems(name: str, kind: str, help_text: str) -> list[str]:
    """What promtool's linter (and our own prefix rule) would say of one family."""
    problems = []
    if not NAME.match(name):
        problems.append("not snake_case under the stagemesh_ prefix")
    if kind == "counter" and not name.endswith("_total"):
        problems.append("a counter must end in _total")
    if kind != "counter" and name.endswith(RESERVED_SUFFIXES):
        problems.append(f"a {kind} must not end in {RESERVED_SUFFIXES} (reserved for counters and histograms)")
    if any(f"_{unit}_" in name + "_" for unit in ABBREVIATED_UNITS):
        problems.append("abbreviated unit")
    if any(unit in name for unit in NON_BASE_UNITS):
        problems.append("not a base unit (use _seconds, _bytes, a 0..1 _ratio/_fraction)")
    if re.search(r"_(gauge|counter|histogram|summary)(_|$)", name):
        problems.append("the type is in the name")
    if re.search(r"(latency|duration|time)(?!stamp)", name) and kind != "counter" and "_seconds" not in name:
        problems.append("a time without _seconds")
    if not help_text.strip():
        problems.append("no help text")
    return problems


def _is_created_companion(name: str, families: dict[str, dict[str, str]]) -> bool:
    """prometheus-client's ``<counter or histogram>_created`` gauge (its creation time)."""
    base = name.removesuffix("_created")
    return name != base and (base + "_total" in families or families.get(base, {}).get("type") == "histogram")


def test_every_series_follows_prometheus_naming_rules():
    families = _declared(_exposition())
    assert "stagemesh_chain_kv_blocks_capacity" in families and "stagemesh_stage_kv_blocks_capacity" in families
    found = {name: problems for name, doc in families.items() if not _is_created_companion(name, families)
             if (problems := _problems(name, doc.get("type", ""), doc.get("help", "")))}
    assert not found, found


@pytest.mark.parametrize("name, kind, expected", [
    ("stagemesh_chain_kv_blocks_total", "gauge", "must not end in"),
    ("stagemesh_requests", "counter", "must end in _total"),
    ("stagemesh_step_latency_ms", "histogram", "abbreviated unit"),
    ("stagemesh_stage_queueDepth", "gauge", "snake_case"),
])
def test_the_naming_check_catches_what_promtool_would(name, kind, expected):
    assert any(expected in problem for problem in _problems(name, kind, "Help.")), _problems(name, kind, "Help.")


@pytest.mark.skipif(shutil.which("promtool") is None,
                    reason="promtool (Prometheus' own linter) is not on PATH; CI installs it with prometheus")
def test_promtool_check_metrics_accepts_the_exposition():
    checked = subprocess.run(["promtool", "check", "metrics"], input=_exposition(), capture_output=True,
                             text=True, timeout=30)
    assert checked.returncode == 0, checked.stdout + checked.stderr
