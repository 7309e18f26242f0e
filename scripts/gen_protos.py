"""Regenerate the Python stubs in stagemesh/v1/ from protos/stagemesh/v1/*.proto.

Run from anywhere with the project's venv (needs grpcio-tools)::

    python scripts/gen_protos.py

It runs ``python -m grpc_tools.protoc -Iprotos --python_out=. --pyi_out=.
--grpc_python_out=. protos/stagemesh/v1/*.proto`` from the repository root, so the
generated ``from stagemesh.v1 import tensor_pb2`` imports resolve inside the package.
tests/wire/test_protos.py fails when the committed stubs drift from the .proto files.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PROTO_DIR = ROOT / "protos" / "stagemesh" / "v1"
OUT_DIR = ROOT / "stagemesh" / "v1"


def protoc_command(protos: list[Path]) -> list[str]:
    """The protoc invocation, with paths relative to the repository root."""
    return [
        sys.executable, "-m", "grpc_tools.protoc", "-Iprotos",
        "--python_out=.", "--pyi_out=.", "--grpc_python_out=.",
        *(str(p.relative_to(ROOT)) for p in protos),
    ]


def main() -> int:
    protos = sorted(PROTO_DIR.glob("*.proto"))
    if not protos:
        print(f"no .proto files under {PROTO_DIR}", file=sys.stderr)
        return 1
    for stale in OUT_DIR.glob("*_pb2*.py*"):
        stale.unlink()
    subprocess.run(protoc_command(protos), cwd=ROOT, check=True)
    print(f"generated stubs for {len(protos)} files in {OUT_DIR.relative_to(ROOT)}/")
    return 0


if __name__ == "__main__":
    sys.exit(main())
