"""Running the `stagemesh` command as a user would: a real subprocess, JSONL in, JSON out."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

STAGEMESH = [sys.executable, "-m", "stagemesh.cli"]


def run_cli(*args: str, timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run([*STAGEMESH, *args], capture_output=True, text=True, timeout=timeout, stdin=subprocess.DEVNULL)


def write_jsonl(path: Path, lines: list[dict]) -> Path:
    path.write_text("".join(json.dumps(line) + "\n" for line in lines))
    return path


def generate_json(*args: str) -> list[dict]:
    """`stagemesh generate ... --json`; fails the test with stderr when the command fails."""
    proc = run_cli("generate", *args, "--json")
    if proc.returncode != 0:
        raise AssertionError(f"stagemesh generate exited {proc.returncode}:\n{proc.stderr}")
    return [json.loads(line) for line in proc.stdout.splitlines()]
