"""Which event loop a mesh process runs on."""

import asyncio

import pytest

from stagemesh.runtime import event_loop
from stagemesh.runtime.startup import StartupError


async def _loop_module() -> str:
    return type(asyncio.get_running_loop()).__module__


def test_a_process_runs_on_uvloop_by_default(monkeypatch):
    pytest.importorskip("uvloop", reason="uvloop is a dependency on Linux; this platform has none")
    monkeypatch.delenv(event_loop.EVENT_LOOP_ENV, raising=False)
    assert event_loop.run(_loop_module()).startswith("uvloop")


def test_the_environment_can_ask_for_asyncio_s_own_loop(monkeypatch):
    monkeypatch.setenv(event_loop.EVENT_LOOP_ENV, "asyncio")
    assert event_loop.run(_loop_module()).startswith("asyncio")


def test_an_unknown_loop_is_a_startup_error_naming_the_choices(monkeypatch):
    monkeypatch.setenv(event_loop.EVENT_LOOP_ENV, "tokio")
    main = _loop_module()
    with pytest.raises(StartupError, match=r"STAGEMESH_EVENT_LOOP='tokio': expected one of uvloop, asyncio"):
        event_loop.run(main)
    main.close()
