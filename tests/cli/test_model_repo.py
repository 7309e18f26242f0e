"""`--model org/name`: the CLI resolves a Hugging Face repo id from a cache in the standard layout
(built here from a demo checkpoint; the Hub is offline, nothing is downloaded)."""

from __future__ import annotations

import json
import subprocess

import pytest
import yaml

from stagemesh.cli.commands import main
from stagemesh.cli.demo import write_demo_model
from tests.cli_helpers import STAGEMESH
from tests.hf_cache import COMMIT, add_to_hf_cache, offline_env

REPO = "acme/tiny-demo"


@pytest.fixture(scope="module")
def hf_home(tmp_path_factory):
    """``HF_HOME`` whose cache holds ``REPO`` (a 2-layer demo checkpoint), and the checkpoint itself."""
    root = tmp_path_factory.mktemp("hf")
    checkpoint = write_demo_model(root / "ckpt", family="llama", num_layers=2, hidden_size=64, vocab_size=300)
    add_to_hf_cache(root / "home" / "hub", REPO, checkpoint)
    return root / "home", checkpoint


def _generate(model: str, env: dict, *extra: str) -> subprocess.CompletedProcess:
    return subprocess.run([*STAGEMESH, "generate", "--model", model, "--prompt", "The river", "--max-new-tokens", "6",
                           "--temperature", "0", "--json", *extra],
                          check=False, capture_output=True, text=True, timeout=180, env=env, stdin=subprocess.DEVNULL)


def test_generate_runs_a_cached_repo_like_its_directory(hf_home):
    home, checkpoint = hf_home
    env = offline_env(home)
    by_repo, by_dir = _generate(REPO, env), _generate(str(checkpoint), env)
    assert by_repo.returncode == 0, by_repo.stderr
    assert json.loads(by_repo.stdout) == json.loads(by_dir.stdout)
    assert _generate(REPO, env, "--revision", COMMIT).stdout == by_repo.stdout


def test_a_repo_missing_from_the_cache_is_one_line_saying_how_to_download_it(hf_home):
    home, _ = hf_home
    done = _generate("acme/not-there", offline_env(home))
    assert done.returncode == 1
    assert "error: --model acme/not-there" in done.stderr and "hf download acme/not-there" in done.stderr
    assert str(home / "hub") in done.stderr and "Traceback" not in done.stderr


def test_compose_mounts_the_repos_cache_folder_and_plans_from_its_snapshot(hf_home, monkeypatch, capsys):
    from huggingface_hub import constants

    home, _ = hf_home
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(home / "hub"))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    assert main(["compose", "--model", REPO, "--pp", "2", "--gpus", "2"]) == 0
    text = capsys.readouterr().out
    doc = yaml.safe_load(text)
    repo_folder = str(home / "hub" / "models--acme--tiny-demo")
    planner = doc["services"]["planner"]
    assert planner["volumes"][0]["source"] == repo_folder and planner["volumes"][0]["target"] == "/model"
    command = planner["command"]
    assert command[command.index("--model") + 1] == f"/model/snapshots/{COMMIT}"
    assert f"stagemesh compose --model {REPO} --pp 2" in text.splitlines()[1]
