"""Model families are data: each resolves from its config, its tensor table matches the
checkpoints transformers writes, and no code outside the families package names a family."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
from safetensors import safe_open

from stagemesh.cli.demo import tensor_shapes
from stagemesh.config import ModelConfig, StageSpec
from stagemesh.model import families
from stagemesh.model.decoder import StageModel
from stagemesh.model.families.qwen2_moe import sparse_layers
from stagemesh.model.loader import CheckpointReader

pytest.importorskip("transformers")
from tests.checkpoints import FAMILIES, make_hf_checkpoint  # noqa: E402

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.parametrize("family", FAMILIES)
def test_every_family_resolves_from_its_architecture_or_model_type(family):
    fam = families.named(family)
    for arch in fam.architectures:
        assert families.for_config({"architectures": ["SomethingElse", arch]}) == (arch, fam)
    assert families.for_config({"model_type": family}) == (fam.architectures[0], fam)


def test_an_unknown_architecture_names_the_supported_ones():
    with pytest.raises(ValueError, match=r"unsupported architecture \['GPT2LMHeadModel'\]") as err:
        families.for_config({"architectures": ["GPT2LMHeadModel"], "model_type": "gpt2"})
    assert all(arch in str(err.value) for arch in families.ARCHITECTURES)
    with pytest.raises(ValueError, match="unknown family 'gpt2'; choose one of llama"):
        families.named("gpt2")


def test_the_qwen2_moe_layer_rule():
    # decoder_sparse_step=2: layers 1, 3, 5 ((i + 1) % 2 == 0); mlp_only_layers drops 3.
    assert sparse_layers({"decoder_sparse_step": 2, "mlp_only_layers": [3]}, 6) == (1, 5)
    assert sparse_layers({}, 3) == (0, 1, 2)


def _stored_names(model_dir: Path) -> set[str]:
    names = set()
    for path in model_dir.glob("*.safetensors"):
        with safe_open(str(path), "pt") as f:
            names |= set(f.keys())
    return names


@pytest.mark.parametrize("family", FAMILIES)
def test_the_tensor_table_names_exactly_what_transformers_saves(family, tmp_path):
    model_dir = make_hf_checkpoint(family, tmp_path, num_layers=3)
    config = ModelConfig.from_dir(model_dir)
    reader = CheckpointReader(model_dir)
    StageModel(config, StageSpec.whole(3)).load(reader)
    stored = _stored_names(model_dir)
    assert reader.names_read == stored  # the loader asks for every tensor, and for none that is missing
    assert set(tensor_shapes(json.loads((model_dir / "config.json").read_text()))) == stored  # the demo's too


def _sources() -> list[Path]:
    """The code that must look families up rather than name them, the test checkpoints included."""
    roots = ("stagemesh", "gateway", "stage_worker", "expert_worker", "scripts")
    files = [p for root in roots for p in (ROOT / root).rglob("*.py")]
    return [p for p in files if "families" not in p.relative_to(ROOT).parts] + [ROOT / "tests/checkpoints.py"]


def test_nothing_outside_the_families_package_names_a_family():
    names = sorted({*families.FAMILIES, *families.ARCHITECTURES}, key=len, reverse=True)
    quoted = re.compile(r"""["'](%s)["']""" % "|".join(map(re.escape, names)))
    offenders = [
        f"{path.relative_to(ROOT)}:{n}: {line.strip()}"
        for path in _sources()
        for n, line in enumerate(path.read_text().splitlines(), start=1)
        if quoted.search(line)
    ]
    assert offenders == [], "look the family up in stagemesh.model.families instead:\n" + "\n".join(offenders)
