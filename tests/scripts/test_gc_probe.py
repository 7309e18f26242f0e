"""scripts/gc_probe: a process started with it counts its collections while the flag file exists."""

import json
import os
import subprocess
import sys
from pathlib import Path

PROBE = Path(__file__).resolve().parents[2] / "scripts" / "gc_probe"


def _run(tmp_path: Path, code: str) -> dict:
    env = {**os.environ, "PYTHONPATH": str(PROBE), "GC_PROBE_DIR": str(tmp_path)}
    subprocess.run([sys.executable, "-c", code], env=env, check=True, timeout=60)
    (written,) = tmp_path.glob("gc.*.json")
    return json.loads(written.read_text())


def test_collections_are_counted_only_while_the_flag_file_exists(tmp_path):
    code = "\n".join([
        "import gc, os",
        "flag = os.path.join(os.environ['GC_PROBE_DIR'], 'measuring')",
        "gc.collect()",
        "open(flag, 'w').close()",
        "gc.collect(0); gc.collect(2); gc.collect(2)",
        "os.remove(flag)",
        "gc.collect(2)",
    ])
    seen = _run(tmp_path, code)["generations"]
    assert [seen[g]["collections"] for g in ("0", "1", "2")] == [1, 0, 2]
    assert seen["2"]["total_s"] >= seen["2"]["max_s"] > 0
