"""Packages whose names load on first use, so that their light modules (the options the command
line is built from) import without torch."""

from __future__ import annotations

import importlib
import sys
import types
from collections.abc import Iterable, Mapping
from typing import Any


def lazy_package(name: str, where: Mapping[str, str], shadowed: Iterable[str] = ()) -> list[str]:
    """Make package ``name`` import each public name from its submodule (``where[name]``: a
    submodule's name, or a full ``narrows.`` module path) when first used; returns the sorted
    public names for ``__all__``.

    ``shadowed`` are names that are also submodules (``narrows.training.evaluate``): the package
    attribute stays the function even after the submodule is imported by anyone.
    """
    module = sys.modules[name]
    locations = dict(where)
    kept = frozenset(shadowed)

    def __getattr__(attribute: str) -> Any:  # noqa: N807 - PEP 562
        if attribute not in locations:
            raise AttributeError(f"module {name!r} has no attribute {attribute!r}")
        where_ = locations[attribute]
        full = where_ if where_.startswith("narrows.") else f"{name}.{where_}"
        value = getattr(importlib.import_module(full), attribute)
        setattr(module, attribute, value)
        return value

    def __dir__() -> list[str]:  # noqa: N807
        return sorted(set(vars(module)) | set(locations))

    class Package(types.ModuleType):
        def __setattr__(self, attribute: str, value: Any) -> None:
            if attribute in kept and isinstance(value, types.ModuleType):
                value = getattr(value, attribute)  # importing the submodule binds its function
            super().__setattr__(attribute, value)

    module.__getattr__ = __getattr__  # type: ignore[method-assign]
    module.__dir__ = __dir__  # type: ignore[method-assign]
    module.__class__ = Package
    return sorted(locations)
