"""What the decompose result classes share to follow the result contract
(:mod:`narrows.runs.results`): the header of their files and where ``save`` writes."""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from narrows.runs.results import header, provenance, without_header


def decompose_header(kind: str, meta: Mapping[str, Any] | None = None,
                     seed: int | None = None) -> dict[str, Any]:
    """``header("decompose.<kind>", 1, ...)`` with the model, data and seed ``meta`` records."""
    meta = meta or {}
    model, data = meta.get("model"), meta.get("data")
    seed = seed if seed is not None else meta.get("seed")
    origin = provenance(model=str(model) if model is not None else None,
                        data=str(data) if data is not None else None,
                        seed=int(seed) if isinstance(seed, int) and not isinstance(seed, bool)
                        else None)
    return header(f"decompose.{kind}", 1, origin)


def as_run(target: Any) -> Any:
    """``target`` as a run directory: a :class:`~narrows.runs.RunDir` is used as it is; a path
    becomes a plain (config-less) one, created if missing."""
    if isinstance(target, (str, os.PathLike)):
        from narrows.runs.run import RunDir

        Path(target).mkdir(parents=True, exist_ok=True)
        return RunDir(target)
    return target


#: ``document`` without the ``format`` and ``provenance`` keys of its header (the core's).
strip_header = without_header
