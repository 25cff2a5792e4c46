"""Every public function and class of every package says what it does (docs/api.md's promise)."""

from __future__ import annotations

import importlib
import inspect

import pytest

PACKAGES = ["narrows.models", "narrows.data", "narrows.training", "narrows.runs",
            "narrows.interactions", "narrows.attribution", "narrows.decompose", "narrows.kvb"]


@pytest.mark.parametrize("package", PACKAGES)
def test_public_names_have_docstrings(package):
    module = importlib.import_module(package)
    names = getattr(module, "__all__", None)
    assert names, f"{package} declares its public names in __all__"
    bare = [name for name in names
            if (inspect.isfunction(obj := getattr(module, name)) or inspect.isclass(obj))
            and not (obj.__doc__ or "").strip()]
    assert bare == []
