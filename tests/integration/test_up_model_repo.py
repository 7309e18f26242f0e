"""`stagemesh up --model org/name` as a new user runs it: the repo resolved from a Hugging Face
cache (offline, nothing downloaded), the log directory printed at start, each worker's load
progress while it loads, the dashboard URL on the ready line, `generate --stream` from it, and
its temporary log directory gone after a clean stop."""

from __future__ import annotations

import json
import re
import subprocess
import sys
import threading
import urllib.request
from pathlib import Path

import pytest

from stagemesh.cli.demo import write_demo_model
from stagemesh.deploy.redis_server import free_port
from tests.cli_helpers import run_cli
from tests.hf_cache import add_to_hf_cache, offline_env
from tests.integration.mesh_helpers import stop_gracefully

pytestmark = pytest.mark.slow

REPO = "acme/tiny-mesh"


def test_up_serves_a_cached_repo_and_says_what_it_is_doing(tmp_path):
    checkpoint = write_demo_model(tmp_path / "ckpt", family="llama", num_layers=4, hidden_size=64, vocab_size=300)
    add_to_hf_cache(tmp_path / "home" / "hub", REPO, checkpoint)
    port, http_port = free_port(), free_port()
    proc = subprocess.Popen(
        [sys.executable, "-m", "stagemesh.cli", "up", "--model", REPO, "--pp", "2", "--port", str(port),
         "--http-port", str(http_port), "--frontends", "1"],
        stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
        env=offline_env(tmp_path / "home"),
    )
    lines = []
    watchdog = threading.Timer(180, proc.kill)  # a mesh that never gets ready fails the test, not the run
    watchdog.start()
    try:
        for line in proc.stdout:
            lines.append(line)
            if line.startswith("stagemesh ready"):
                break
        assert lines and lines[-1].startswith("stagemesh ready"), "".join(lines)
        assert lines[0].startswith("stagemesh up: logs in "), lines[0]
        log_dir = Path(lines[0].split("logs in ", 1)[1].strip())
        for stage in ("stage-c0-s0", "stage-c0-s1"):
            assert f"{stage}: loaded 2/2 layers\n" in lines, "".join(lines)
        ready = lines[-1]
        assert f"dashboard http://127.0.0.1:{http_port}/ " in ready and re.search(r"redis (\S+)", ready), ready
        with urllib.request.urlopen(f"http://127.0.0.1:{http_port}/v1/models", timeout=10) as answer:
            assert [m["id"] for m in json.load(answer)["data"]] == [REPO]
        with urllib.request.urlopen(f"http://127.0.0.1:{http_port}/", timeout=10) as answer:
            assert answer.status == 200
        args = ("generate", "--addr", f"127.0.0.1:{port}", "--prompt", "The river", "--max-new-tokens", "10",
                "--temperature", "0", "--ignore-eos")
        streamed, whole = run_cli(*args, "--stream"), run_cli(*args, "--json")
        assert streamed.returncode == 0, streamed.stderr
        assert streamed.stdout == json.loads(whole.stdout)["text"] + "\n"
    finally:
        watchdog.cancel()
        stop_gracefully(proc)
    assert proc.returncode == 0
    assert not log_dir.exists(), f"the temporary log dir {log_dir} outlived the mesh"
