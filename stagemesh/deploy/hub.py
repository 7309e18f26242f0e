"""Where a ``--model`` lives: a checkpoint directory, or a Hugging Face repo id (``org/name``)
resolved through ``huggingface_hub`` to a snapshot directory of its cache.

NOTE: the launcher and the CLI resolve once and hand the resolved directory to everything after
(the topology, hence every worker; the in-process engine; the bench; the compose planner), so no
worker ever talks to the Hub. The cache is read first (``local_files_only``: no network); only
when the repo is not there and the Hub is not offline (``HF_HUB_OFFLINE``) is it downloaded,
and then only the files stagemesh reads (``ALLOW_PATTERNS``).

Torch-free.
"""

from __future__ import annotations

import argparse
import re
from dataclasses import dataclass
from pathlib import Path

ALLOW_PATTERNS = ["*.json", "*.safetensors", "*.jinja", "tokenizer.model"]
"""What a download fetches: config, weights, their index, tokenizer and chat template (never
``*.bin`` / ``*.pt`` copies of the weights, which stagemesh does not read)."""
_REPO_ID = re.compile(r"^[A-Za-z0-9][\w.-]*(/[A-Za-z0-9][\w.-]*)?$")
"""``name`` or ``org/name``: what the Hub accepts as a model repo id."""


@dataclass(frozen=True)
class ModelSource:
    """A resolved ``--model``."""

    path: Path
    """The local checkpoint directory (for a repo: its snapshot in the Hugging Face cache)."""
    repo_id: str | None = None
    """The Hugging Face repo id it was given as; None for a directory."""
    revision: str | None = None
    """The revision asked for (branch, tag or commit), with ``repo_id``."""

    @property
    def name(self) -> str:
        """The model's name for humans and the OpenAI API: the repo id, or the directory's name."""
        return self.repo_id or self.path.resolve().name


def add_model_arguments(p: argparse.ArgumentParser, help: str, required: bool = True, group=None) -> None:
    """``--model`` (a directory or a repo id) and ``--revision``; ``group``: where ``--model`` goes
    (e.g. a mutually exclusive group), else ``p``."""
    (group or p).add_argument(
        "--model", required=required if group is None else False, metavar="DIR_OR_REPO",
        help=f"{help}: a checkpoint directory, or a Hugging Face repo id (org/name) from its cache "
             "(downloaded when not cached, unless HF_HUB_OFFLINE=1)",
    )
    p.add_argument("--revision", default=None,
                   help="with a Hugging Face repo id: the branch, tag or commit (default: main)")


def resolve_model(model: str | Path, revision: str | None = None) -> ModelSource:
    """``model`` as a local checkpoint directory; ValueError saying what was looked for, and how to
    download it, when it is neither a directory nor a repo that is cached (or can be downloaded)."""
    path = Path(model).expanduser()
    if path.is_dir():
        if revision is not None:
            raise ValueError(f"--revision {revision} needs a Hugging Face repo id, but --model {model} is a directory")
        return ModelSource(path)
    text = str(model)
    if not _REPO_ID.match(text) or path.exists():
        raise ValueError(
            f"--model {text}: no such directory, and not a Hugging Face repo id (org/name); "
            "give a checkpoint directory (config.json, *.safetensors) or a repo id"
        )
    return ModelSource(Path(_snapshot(text, revision)), repo_id=text, revision=revision)


def _snapshot(repo_id: str, revision: str | None) -> str:
    """The repo's snapshot directory: from the cache, else downloaded (unless offline)."""
    from huggingface_hub import constants, snapshot_download
    from huggingface_hub.utils import HFValidationError, LocalEntryNotFoundError

    try:
        return snapshot_download(repo_id, revision=revision, local_files_only=True, allow_patterns=ALLOW_PATTERNS)
    except (LocalEntryNotFoundError, HFValidationError) as err:
        cache_error = err
    if constants.HF_HUB_OFFLINE:
        raise ValueError(_not_cached(repo_id, revision, constants.HF_HUB_CACHE, "HF_HUB_OFFLINE is set")) from None
    try:
        return snapshot_download(repo_id, revision=revision, allow_patterns=ALLOW_PATTERNS)
    except Exception as err:  # noqa: BLE001 - the Hub's errors are many; each is reported in one line
        why = f"downloading it failed: {type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}"
        raise ValueError(_not_cached(repo_id, revision, constants.HF_HUB_CACHE, why)) from cache_error


def _not_cached(repo_id: str, revision: str | None, cache: str, why: str) -> str:
    at = f" at revision {revision}" if revision else ""
    rev = f" --revision {revision}" if revision else ""
    return (
        f"--model {repo_id}: no such directory, and the Hugging Face repo {repo_id}{at} is not in the cache "
        f"{cache} (HF_HUB_CACHE / HF_HOME) — {why}; download it first with "
        f"`hf download {repo_id}{rev}` (`huggingface-cli download` in older huggingface_hub), "
        "or give a checkpoint directory"
    )
