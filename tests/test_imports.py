"""Dependencies point one way (STYLE.md habit 2), checked by importing in a fresh interpreter."""

from __future__ import annotations

import ast
import pkgutil
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _modules(package: str) -> list[str]:
    path = ROOT / package.replace(".", "/")
    return [package] + [f"{package}.{m.name}" for m in pkgutil.iter_modules([str(path)]) if m.name != "__main__"]


def _loaded_after_import(modules: list[str]) -> set[str]:
    code = f"import importlib, sys\nfor m in {modules!r}: importlib.import_module(m)\nprint('\\n'.join(sys.modules))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, check=True).stdout
    return {name.split(".")[0] for name in out.split()}


TORCH_FREE = ["stagemesh", "stagemesh.client", "stagemesh.serving", "gateway", "frontend"]


@pytest.mark.parametrize("package", TORCH_FREE)
def test_client_gateway_and_scheduler_do_not_import_torch(package):
    assert "torch" not in _loaded_after_import(_modules(package) if package != "stagemesh" else ["stagemesh"])


def test_the_model_core_imports_no_transport():
    loaded = _loaded_after_import(_modules("stagemesh.model"))
    assert not {"grpc", "redis", "google"} & loaded, {"grpc", "redis", "google"} & loaded


def test_only_the_store_imports_redis():
    offenders = []
    for path in ROOT.glob("**/*.py"):
        rel = path.relative_to(ROOT)
        if rel.parts[0] in (".venv", "tests") or rel == Path("stagemesh/mesh/store.py"):
            continue
        if re.search(r"^\s*(import redis|from redis)\b(?!lite)", path.read_text(), re.MULTILINE):
            offenders.append(str(rel))
    assert offenders == []


ROLES = ("gateway", "frontend", "stage_worker", "expert_worker")
"""The role packages: each imports the library, never the reverse."""


def _imported_packages(path: Path) -> set[str]:
    """Top-level packages ``path`` imports anywhere (function-local imports included)."""
    names = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            names.update(alias.name.split(".")[0] for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names.add(node.module.split(".")[0])
    return names


def _importers(package: str, imported: tuple[str, ...]) -> list[str]:
    """``file: package`` for every file under ``package`` that imports one of ``imported``."""
    found = []
    for path in sorted((ROOT / package).rglob("*.py")):
        for name in sorted(_imported_packages(path) & set(imported)):
            found.append(f"{path.relative_to(ROOT)}: {name}")
    return found


def test_the_library_imports_no_role_package():
    assert _importers("stagemesh", ROLES) == []


def test_the_expert_worker_does_not_import_the_stage_worker():
    assert _importers("expert_worker", ("stage_worker",)) == []


def test_the_gateway_and_its_frontends_talk_only_over_the_wire():
    assert _importers("gateway", ("frontend",)) + _importers("frontend", ("gateway", "stage_worker", "expert_worker")) == []


@pytest.mark.parametrize("entry", ["gateway.main", "frontend.main"])
def test_a_gateway_or_frontend_without_http_imports_no_http_stack(entry):
    """aiohttp and jinja2 are ~0.3-0.4 s of a restarted process's start here, which its streams wait
    for; only a process given ``--http-port`` imports them (``Gateway._start_server``,
    ``Frontend._start_http``)."""
    assert not {"aiohttp", "jinja2"} & _loaded_after_import([entry])
