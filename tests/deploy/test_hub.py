"""`--model` as a Hugging Face repo id: resolved from a cache in the standard layout (nothing is
downloaded: the Hub is offline here)."""

from __future__ import annotations

import json

import pytest

from stagemesh.deploy.hub import resolve_model
from tests.hf_cache import COMMIT, add_to_hf_cache


@pytest.fixture
def hub_cache(tmp_path, monkeypatch):
    """An empty cache the resolver reads, with the Hub offline."""
    from huggingface_hub import constants

    cache = tmp_path / "hf" / "hub"
    cache.mkdir(parents=True)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(cache))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    return cache


@pytest.fixture
def checkpoint(tmp_path):
    out = tmp_path / "ckpt"
    out.mkdir()
    (out / "config.json").write_text(json.dumps({"architectures": ["LlamaForCausalLM"]}))
    (out / "model.safetensors").write_bytes(b"weights")
    return out


def test_a_directory_is_taken_as_it_is(checkpoint):
    source = resolve_model(str(checkpoint))
    assert (source.path, source.repo_id, source.name) == (checkpoint, None, "ckpt")


def test_a_repo_id_resolves_to_its_cached_snapshot(hub_cache, checkpoint):
    snapshot = add_to_hf_cache(hub_cache, "acme/tiny-llama", checkpoint)
    source = resolve_model("acme/tiny-llama")
    assert source.path == snapshot and source.name == "acme/tiny-llama"
    assert json.loads((source.path / "config.json").read_text())["architectures"] == ["LlamaForCausalLM"]


def test_a_revision_picks_its_snapshot(hub_cache, checkpoint):
    add_to_hf_cache(hub_cache, "acme/tiny-llama", checkpoint)
    other = "f" * 40
    add_to_hf_cache(hub_cache, "acme/tiny-llama", checkpoint, commit=other, branch="v2")
    assert resolve_model("acme/tiny-llama", "v2").path.name == other
    assert resolve_model("acme/tiny-llama", other).path.name == other
    assert resolve_model("acme/tiny-llama").path.name == COMMIT


def test_a_repo_that_is_not_cached_says_where_it_looked_and_how_to_download_it(hub_cache):
    with pytest.raises(ValueError) as err:
        resolve_model("acme/missing", "v1")
    message = str(err.value)
    for part in ("acme/missing", "revision v1", str(hub_cache), "HF_HUB_OFFLINE", "hf download acme/missing --revision v1"):
        assert part in message, message


def test_neither_a_directory_nor_a_repo_id(tmp_path):
    with pytest.raises(ValueError, match="no such directory, and not a Hugging Face repo id"):
        resolve_model(str(tmp_path / "a" / "b" / "c"))


def test_a_revision_needs_a_repo_id(checkpoint):
    with pytest.raises(ValueError, match="--revision v1 needs a Hugging Face repo id"):
        resolve_model(str(checkpoint), "v1")
