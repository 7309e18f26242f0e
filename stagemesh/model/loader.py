"""Reads only the tensors (and tensor slices) a worker holds from a safetensors checkpoint.

A checkpoint directory has one ``model.safetensors``, or several shards with a
``model.safetensors.index.json`` whose ``weight_map`` says which file holds which tensor.
Reads go through ``safe_open(...).get_slice`` so a TP rank reads only its rows or columns.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors import safe_open


class CheckpointReader:
    """Tensor-by-tensor access to a Hugging Face checkpoint directory."""

    def __init__(self, model_dir: str | Path):
        self.model_dir = Path(model_dir)
        self._file_of = _index(self.model_dir)
        self._handles: dict[Path, object] = {}
        self.names_read: set[str] = set()
        """Every tensor name this reader has read, so tests can prove a worker read only its own."""

    def has(self, name: str) -> bool:
        return name in self._file_of

    def read(
        self,
        name: str,
        *,
        dim: int | None = None,
        start: int = 0,
        end: int | None = None,
        dtype: torch.dtype | None = None,
    ) -> torch.Tensor:
        """The tensor ``name``, or its ``[start, end)`` slice along ``dim`` (0 or 1)."""
        if name not in self._file_of:
            raise ValueError(f"tensor {name!r} is not in the checkpoint at {self.model_dir}")
        self.names_read.add(name)
        sl = self._open(self._file_of[name]).get_slice(name)
        if dim is None:
            t = sl[:]
        elif dim == 0:
            t = sl[start:end]
        elif dim == 1:
            t = sl[:, start:end]
        else:
            raise ValueError(f"can only slice dim 0 or 1, not {dim}")
        return t if dtype is None else t.to(dtype)

    def shape(self, name: str) -> list[int]:
        return list(self._open(self._file_of[name]).get_slice(name).get_shape())

    def _open(self, path: Path):
        if path not in self._handles:
            self._handles[path] = safe_open(str(path), framework="pt")
        return self._handles[path]


def _index(model_dir: Path) -> dict[str, Path]:
    index = model_dir / "model.safetensors.index.json"
    if index.is_file():
        weight_map = json.loads(index.read_text())["weight_map"]
        return {name: model_dir / fname for name, fname in weight_map.items()}
    files = sorted(model_dir.glob("*.safetensors"))
    if not files:
        raise ValueError(f"{model_dir} has no *.safetensors files: stagemesh loads safetensors checkpoints only")
    file_of = {}
    for path in files:
        with safe_open(str(path), framework="pt") as f:
            file_of.update({name: path for name in f.keys()})
    return file_of
