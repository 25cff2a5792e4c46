"""Every public function and class of every package says what it does and what it takes
(docs/api.md's promise)."""

from __future__ import annotations

import importlib
import inspect
import re

import pytest

PACKAGES = ["narrows.models", "narrows.data", "narrows.training", "narrows.runs",
            "narrows.interactions", "narrows.attribution", "narrows.decompose", "narrows.kvb",
            "narrows.ssl"]

#: parameters described once in docs/api.md ("Conventions"), not in every docstring
CONVENTIONAL = {"self", "cls", "args", "kwargs", "device", "progress", "say", "log", "dist",
                "batch_size", "workers", "seed", "threads"}


def _public(package: str) -> list[tuple[str, object]]:
    module = importlib.import_module(package)
    names = getattr(module, "__all__", None)
    assert names, f"{package} declares its public names in __all__"
    return [(name, getattr(module, name)) for name in names]


@pytest.mark.parametrize("package", PACKAGES)
def test_public_names_have_docstrings(package):
    bare = [name for name, obj in _public(package)
            if (inspect.isfunction(obj) or inspect.isclass(obj))
            and not (obj.__doc__ or "").strip()]
    assert bare == []


def test_conventions_are_documented_once():
    from pathlib import Path

    text = (Path(__file__).parents[2] / "docs" / "api.md").read_text()
    conventions = text.split("## Conventions", 1)[1].split("\n## ", 1)[0]
    missing = [name for name in sorted(CONVENTIONAL - {"self", "cls", "args", "kwargs"})
               if f"`{name}`" not in conventions]
    assert missing == []


@pytest.mark.parametrize("package", PACKAGES)
def test_public_functions_name_their_parameters(package):
    """A function's docstring names each of its parameters (but the conventional ones)."""
    silent = {}
    for name, obj in _public(package):
        if not inspect.isfunction(obj):
            continue
        doc = obj.__doc__ or ""
        missing = [p for p in inspect.signature(obj).parameters
                   if p not in CONVENTIONAL and not re.search(rf"\b{re.escape(p)}\b", doc)]
        if missing:
            silent[name] = missing
    assert silent == {}
