"""The `stagemesh` command as a real process: a reader that leaves early, --version, no server."""

from __future__ import annotations

import os
import subprocess
import sys

from stagemesh import __version__
from stagemesh.runtime.net import free_port
from tests.client.serving import serving
from tests.client.test_sdk import FakeGateway


def _stagemesh(*args: str, **kwargs) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "stagemesh.cli", *args], text=True, timeout=60, **kwargs)


def test_status_into_a_pipe_whose_reader_left_exits_quietly():
    read, write = os.pipe()
    os.close(read)  # `| head -1` that already exited: every write gets EPIPE
    try:
        with serving(FakeGateway()) as address:
            done = _stagemesh("status", "--addr", address, stdout=write, stderr=subprocess.PIPE)
    finally:
        os.close(write)
    assert done.stderr == "" and done.returncode == 141  # 128 + SIGPIPE, as a shell reports for `cat`


def test_version():
    done = _stagemesh("--version", capture_output=True)
    assert done.returncode == 0 and done.stdout.strip() == f"stagemesh {__version__}"


def test_status_without_a_server_names_the_address_and_asks_for_stagemesh_up():
    address = f"127.0.0.1:{free_port()}"
    done = _stagemesh("status", "--addr", address, capture_output=True)
    assert done.returncode == 1
    hint = f"error: UNAVAILABLE: no stagemesh server answers at {address}: is `stagemesh up` running there"
    assert hint in done.stderr
