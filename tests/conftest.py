"""Fixtures shared by every test package."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from stagemesh.deploy.redis_server import start_local_redis


@pytest.fixture(scope="session")
def redis_url():
    """URL of a real redis-server started for this test session on a free 127.0.0.1 port.

    Tests share the server; each should use its own deployment name (see ``Store.connect``)
    so their keys never meet.
    """
    with start_local_redis() as server:
        yield server.url


def pytest_collection_modifyitems(config, items):
    """Skips every ``gpu``-marked test, saying why, where torch sees no CUDA device."""
    gpu_items = [item for item in items if item.get_closest_marker("gpu") is not None]
    if not gpu_items:
        return
    reason = _no_cuda_reason()
    if reason is None:
        return
    for item in gpu_items:
        item.add_marker(pytest.mark.skip(reason=reason))


def _no_cuda_reason() -> str | None:
    """Why the CUDA tests cannot run here, or None when they can."""
    import torch  # only when gpu tests were collected: the torch-free test packages stay torch-free

    if torch.version.cuda is None:
        return f"needs a CUDA device: this torch ({torch.__version__}) is a CPU-only build; see scripts/gpu_check.sh"
    if not torch.cuda.is_available():
        return f"needs a CUDA device: torch {torch.__version__} (CUDA {torch.version.cuda}) sees no GPU"
    return None


LOGGED_TROUBLE = re.compile(r" (WARNING|ERROR|CRITICAL) |Traceback")


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    """A failing test's report ends with the last warnings of each mesh it was running (their
    logs are gone by the time anyone reads a CI run)."""
    outcome = yield
    report = outcome.get_result()
    if report.failed:
        from tests.integration.mesh_helpers import LIVE_LOG_DIRS

        for log_dir in LIVE_LOG_DIRS:
            report.sections.append((f"mesh logs in {log_dir} (warnings, last 8 per process)", _trouble(log_dir)))


def _trouble(log_dir: Path) -> str:
    lines = []
    for log in sorted(log_dir.glob("*.log")):
        found = [line for line in log.read_text(errors="replace").splitlines() if LOGGED_TROUBLE.search(line)]
        lines += [f"{log.name}: {line[:300]}" for line in found[-8:]]
    return "\n".join(lines) or "(no warnings logged)"
