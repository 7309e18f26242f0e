"""Regenerate the Python stubs from the .proto files: each set's stubs go into its package.

Run from anywhere with the project's venv (needs grpcio-tools)::

    python scripts/gen_protos.py             # every set
    python scripts/gen_protos.py inference   # one set (by its name in PROTO_SETS)

- ``stagemesh.v1`` (protos/stagemesh/v1/*.proto -> stagemesh/v1/): ``python -m
  grpc_tools.protoc -Iprotos --python_out=. --pyi_out=. --grpc_python_out=.`` from the
  repository root, so the generated ``from stagemesh.v1 import tensor_pb2`` imports resolve.
- ``inference`` (protos/inference/grpc_service.proto, the KServe v2 / Triton protocol ->
  stagemesh/inference/): the same with ``-Istagemesh/inference=protos/inference``, protoc's
  virtual path, so the stubs live in the stagemesh package (``from stagemesh.inference import
  grpc_service_pb2``) while the proto keeps its public package ``inference``.

tests/wire/test_protos.py fails when the committed stubs drift from the .proto files.
"""

from __future__ import annotations

import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


@dataclass(frozen=True)
class ProtoSet:
    """One folder of .proto files and the package its stubs go to."""

    proto_dir: Path
    out_dir: Path
    include: str
    """protoc's ``-I`` argument: the import root, or ``virtual=physical``."""


PROTO_SETS = {
    "v1": ProtoSet(ROOT / "protos" / "stagemesh" / "v1", ROOT / "stagemesh" / "v1", "protos"),
    "inference": ProtoSet(ROOT / "protos" / "inference", ROOT / "stagemesh" / "inference",
                          "stagemesh/inference=protos/inference"),
}


def protoc_command(protos: list[Path], include: str = "protos") -> list[str]:
    """The protoc invocation, with paths relative to the repository root."""
    return [
        sys.executable, "-m", "grpc_tools.protoc", f"-I{include}",
        "--python_out=.", "--pyi_out=.", "--grpc_python_out=.",
        *(str(p.relative_to(ROOT)) for p in protos),
    ]


def generate(proto_set: ProtoSet) -> int:
    protos = sorted(proto_set.proto_dir.glob("*.proto"))
    if not protos:
        print(f"no .proto files under {proto_set.proto_dir}", file=sys.stderr)
        return 1
    for stale in proto_set.out_dir.glob("*_pb2*.py*"):
        stale.unlink()
    subprocess.run(protoc_command(protos, proto_set.include), cwd=ROOT, check=True)
    print(f"generated stubs for {len(protos)} files in {proto_set.out_dir.relative_to(ROOT)}/")
    return 0


def main(argv: list[str]) -> int:
    names = argv or list(PROTO_SETS)
    unknown = sorted(set(names) - set(PROTO_SETS))
    if unknown:
        print(f"unknown proto set {unknown[0]!r}; known: {', '.join(PROTO_SETS)}", file=sys.stderr)
        return 2
    return max(generate(PROTO_SETS[name]) for name in names)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
