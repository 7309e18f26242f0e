"""A Hugging Face hub cache in the standard layout, built from a local checkpoint (nothing is
downloaded): ``<cache>/models--org--name/{blobs,refs/main,snapshots/<commit>/...}``, each
snapshot file a symlink into ``blobs/`` as ``huggingface_hub`` writes them.

Point ``HF_HUB_CACHE`` (or ``HF_HOME``, whose ``hub/`` it is) at it and set ``HF_HUB_OFFLINE=1``.
"""

from __future__ import annotations

import hashlib
import os
import shutil
from pathlib import Path

COMMIT = "0123456789abcdef0123456789abcdef01234567"
"""The fake commit of the one snapshot (``refs/main`` names it)."""


def add_to_hf_cache(cache: Path, repo_id: str, checkpoint: Path, commit: str = COMMIT, branch: str = "main") -> Path:
    """Puts ``checkpoint``'s files in ``cache`` as repo ``repo_id`` at ``commit`` (``refs/<branch>``);
    the snapshot directory."""
    repo = cache / f"models--{repo_id.replace('/', '--')}"
    snapshot = repo / "snapshots" / commit
    (repo / "blobs").mkdir(parents=True, exist_ok=True)
    snapshot.mkdir(parents=True, exist_ok=True)
    for src in sorted(p for p in checkpoint.rglob("*") if p.is_file()):
        data = src.read_bytes()
        blob = repo / "blobs" / hashlib.sha256(data).hexdigest()
        if not blob.exists():
            shutil.copyfile(src, blob)
        link = snapshot / src.relative_to(checkpoint)
        link.parent.mkdir(parents=True, exist_ok=True)
        link.symlink_to(os.path.relpath(blob, link.parent))
    (repo / "refs").mkdir(exist_ok=True)
    (repo / "refs" / branch).write_text(commit)
    return snapshot


def offline_env(hf_home: Path) -> dict[str, str]:
    """The environment of a process that finds the cache under ``hf_home`` and never reaches the Hub."""
    return {**os.environ, "HF_HOME": str(hf_home), "HF_HUB_CACHE": str(hf_home / "hub"), "HF_HUB_OFFLINE": "1"}
