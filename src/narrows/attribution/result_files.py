"""What attribution's result classes share to follow the result contract: one-file save and
load with the format header (:mod:`narrows.runs.results`), and :class:`SavedAsTorch`, the
``save``/``load`` pair of a dataclass result kept in one torch file."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import fields
from pathlib import Path
from typing import Any, ClassVar

FORMAT_VERSION = 1


def with_header(kind: str, state: Mapping[str, Any], origin: Mapping[str, Any]) -> dict[str, Any]:
    """``state`` after the header of :func:`narrows.runs.results.header` (``kind``, version 1,
    provenance ``origin``)."""
    from narrows.runs.results import header

    return {**header(kind, FORMAT_VERSION, origin), **state}


def save_torch_result(path: str | Path, kind: str, state: Mapping[str, Any],
                      origin: Mapping[str, Any]) -> Path:
    """``torch.save`` of the header (``narrows.<kind>/1`` and ``origin``, a
    :func:`~narrows.runs.results.provenance`) followed by ``state`` (plain tensors and
    values), atomically."""
    from narrows.runs.files import atomic_torch_save

    return atomic_torch_save(path, with_header(kind, state, origin))


def load_torch_result(path: str | Path, kind: str, what: str, fix: str) -> dict[str, Any]:
    """The state saved by :func:`save_torch_result` (header checked, then dropped); files
    written before headers existed load too."""
    from narrows.runs.files import read_torch_file, reading

    state = read_torch_file(path, what, fix)
    with reading(path, what, fix):
        if not isinstance(state, dict):
            raise ValueError("not a dict")
    return without_header(state, kind, path)


def save_json_result(path: str | Path, kind: str, state: Mapping[str, Any],
                     origin: Mapping[str, Any]) -> Path:
    """A JSON file: the header, then ``state``."""
    from narrows.runs.files import atomic_write_json

    return atomic_write_json(path, with_header(kind, state, origin))


def load_json_result(path: str | Path, kind: str, what: str, fix: str,
                     required_keys: tuple[str, ...] = ()) -> dict[str, Any]:
    """The state saved by :func:`save_json_result` (header checked, then dropped)."""
    from narrows.runs.results import read_result_json

    return read_result_json(path, kind, FORMAT_VERSION, what, fix, required_keys=required_keys)


def without_header(state: Mapping[str, Any], kind: str, path: str | Path) -> dict[str, Any]:
    """``state`` without its header, checked first with :func:`narrows.runs.results.check_header`
    (a file of another kind or a newer version raises; one without a header passes)."""
    from narrows.runs.results import check_header

    check_header(state, kind, FORMAT_VERSION, str(path))
    return {k: v for k, v in state.items() if k not in ("format", "provenance")}


def plain(value: Any) -> Any:
    """A float, int, bool or None for a flat record (a 0-d tensor or numpy scalar unwrapped)."""
    if hasattr(value, "item"):
        return value.item()
    return value


class SavedAsTorch:
    """``save``/``load`` for a dataclass result whose fields are plain tensors and values:
    one torch file with the header. A class sets ``FORMAT_KIND``, ``WHAT`` (the file in error
    messages), ``FIX`` (what to do with a damaged one) and ``OPTIONS`` (the fields that are
    the options it was computed with, for the header's provenance; a ``seed`` field is the
    seed)."""

    FORMAT_KIND: ClassVar[str]
    WHAT: ClassVar[str]
    FIX: ClassVar[str]
    OPTIONS: ClassVar[tuple[str, ...]] = ()

    def header_options(self) -> dict[str, Any]:
        """The options recorded in the header: the ``OPTIONS`` fields."""
        return {name: getattr(self, name) for name in self.OPTIONS}

    def origin(self) -> dict[str, Any]:
        """The provenance written in the header (seed and options where the result has them)."""
        from narrows.runs.results import provenance

        return provenance(seed=getattr(self, "seed", None),
                          options=self.header_options() or None)

    def save(self, path: str | Path) -> Path:
        """Write the result (tensors and settings, after the format header) to one torch file."""
        state = {f.name: getattr(self, f.name) for f in fields(self)}  # type: ignore[arg-type]
        return save_torch_result(path, self.FORMAT_KIND, state, self.origin())

    @classmethod
    def load(cls, path: str | Path) -> Any:
        """Read a result written by :meth:`save` (or before headers existed)."""
        from narrows.runs.files import reading

        state = load_torch_result(path, cls.FORMAT_KIND, cls.WHAT, cls.FIX)
        with reading(path, cls.WHAT, cls.FIX):
            return cls(**state)
