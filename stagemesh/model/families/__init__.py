"""Model families as data: one module per family, each listing its ``Family`` values in ``FAMILIES``.

``for_config`` finds the family of a ``config.json``; nothing outside this package branches
on a family's name. Adding a family is adding a module here (and its parity test case):
the package finds it by listing its own modules.
"""

from __future__ import annotations

import importlib
import pkgutil

from stagemesh.model.families.base import ConfigMapping, DemoShape, Family, MoeMapping, TensorNames

__all__ = [
    "ARCHITECTURES", "FAMILIES", "ConfigMapping", "DemoShape", "Family", "MoeMapping", "TensorNames", "for_config", "named",
]


def _discover() -> dict[str, Family]:
    """Every family the modules of this package declare, by name."""
    modules = [importlib.import_module(f"{__name__}.{m.name}") for m in pkgutil.iter_modules(__path__) if m.name != "base"]
    return {f.name: f for module in modules for f in module.FAMILIES}


FAMILIES: dict[str, Family] = _discover()
"""Every supported family by name (its ``model_type``)."""
ARCHITECTURES: dict[str, Family] = {a: f for f in FAMILIES.values() for a in f.architectures}
"""Every supported Hugging Face architecture name, and its family."""


def named(name: str) -> Family:
    """The family called ``name``; a ValueError naming the known ones otherwise."""
    if name not in FAMILIES:
        raise ValueError(f"unknown family {name!r}; choose one of {', '.join(FAMILIES)}")
    return FAMILIES[name]


def for_config(raw: dict) -> tuple[str, Family]:
    """The architecture and family of ``config.json`` ``raw``: the first of its ``architectures``
    that is supported, else its ``model_type``'s first architecture; a ValueError naming the
    supported architectures otherwise."""
    archs = raw.get("architectures") or []
    arch = next((a for a in archs if a in ARCHITECTURES), None)
    if arch is not None:
        return arch, ARCHITECTURES[arch]
    if not archs and raw.get("model_type") in FAMILIES:
        family = FAMILIES[raw["model_type"]]
        return family.architectures[0], family
    raise ValueError(
        f"unsupported architecture {archs or raw.get('model_type')!r}; "
        f"stagemesh supports {', '.join(sorted(ARCHITECTURES))}"
    )
