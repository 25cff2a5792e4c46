"""The result contract every method's result class follows, and the header its files carry.

A result class has ``save(path)``, ``load(path)`` (a class method), ``to_rows()`` (flat records
for CSV and pandas), ``summary()`` (one line for the terminal) and ``plot(ax=None) -> (fig,
ax)``; :class:`Result` states it for type checkers and the contract test. A saved result starts
with :func:`header`: its format and version, and the provenance of the numbers (versions of
narrows, torch, timm and Python, the model, the data, the seed, the options and the compute
used), so a file found later says what made it.
"""

from __future__ import annotations

import platform
from collections.abc import Mapping
from pathlib import Path
from typing import Any, ClassVar, Protocol, runtime_checkable

from narrows.errors import UserError


@runtime_checkable
class Result(Protocol):
    """What every result class offers (checked by ``tests/test_result_contract.py``)."""

    def save(self, path: Any) -> Any: ...

    def to_rows(self) -> list[dict[str, Any]]: ...

    def summary(self) -> str: ...

    def plot(self, ax: Any = None) -> tuple[Any, Any]: ...


def versions() -> dict[str, str]:
    """The versions of narrows and the libraries whose numbers a result depends on."""
    from importlib import metadata

    found = {"python": platform.python_version()}
    for package in ("narrows", "torch", "timm", "numpy"):
        try:
            found[package] = metadata.version(package)
        except metadata.PackageNotFoundError:
            continue
    return found


def provenance(*, model: str | None = None, data: str | None = None, seed: int | None = None,
               options: Mapping[str, Any] | None = None,
               compute: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """What made a result: versions, model, data, seed, options and compute (device, seconds,
    forward passes...); ``None`` entries are left out."""
    found: dict[str, Any] = {"versions": versions()}
    for key, value in (("model", model), ("data", data), ("seed", seed),
                       ("options", dict(options) if options is not None else None),
                       ("compute", dict(compute) if compute is not None else None)):
        if value is not None:
            found[key] = value
    return found


def header(kind: str, version: int, origin: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """The first keys of a saved result: ``format`` (``narrows.<kind>/<version>``) and
    ``provenance`` (from :func:`provenance`, or the given mapping)."""
    return {"format": f"narrows.{kind}/{version}",
            "provenance": dict(origin) if origin is not None else provenance()}


def check_header(document: Mapping[str, Any], kind: str, version: int, source: str) -> None:
    """Refuse a file of another kind or a newer version; files without a header (written before
    headers existed) pass."""
    found = document.get("format")
    if found is None:
        return
    name, _, number = str(found).rpartition("/")
    if name != f"narrows.{kind}":
        raise UserError(f"{source} holds a {found} result, not narrows.{kind}",
                        "pass a file of the right kind")
    if not number.isdigit() or int(number) > version:
        raise UserError(f"{source} was written by a newer narrows ({found})",
                        "upgrade narrows to read it")


def read_result_json(path: str | Path, kind: str, version: int, what: str, fix: str, *,
                     file_name: str | None = None,
                     required_keys: tuple[str, ...] = ()) -> dict[str, Any]:
    """A saved JSON result: ``path`` (or ``path/file_name`` when ``path`` is a directory),
    checked for ``required_keys`` and its header (:func:`check_header`), without the header.
    A missing or damaged file is one line naming it (``what``, ``fix``)."""
    from narrows.runs.files import read_json_file

    file = Path(path)
    if file_name is not None and file.is_dir():
        file = file / file_name
    if not file.is_file():
        raise UserError(f"no {what} {file}", fix)
    document = read_json_file(file, what, fix, required_keys=required_keys, kind=dict)
    check_header(document, kind, version, str(file))
    return without_header(document)


def without_header(document: Mapping[str, Any]) -> dict[str, Any]:
    """``document`` without the ``format`` and ``provenance`` keys of its :func:`header`."""
    return {k: v for k, v in document.items() if k not in ("format", "provenance")}


def json_value(value: Any) -> Any:
    """A headline value as plain JSON: numpy and torch scalars as Python numbers, NaN and ±inf
    as None (JSON has no NaN); anything else unchanged."""
    import math

    if hasattr(value, "item") and callable(value.item):
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


def flat_summary(result: Any, *, command: str) -> dict[str, Any]:
    """A run directory's ``results.json`` for ``result``: the command, its summary line and
    the numbers of its ``headline()`` (flat ``name -> number``, see :func:`json_value`), when
    it has one."""
    headline = getattr(result, "headline", None)
    numbers = {k: json_value(v) for k, v in headline().items()} if callable(headline) else {}
    return {"command": command, "summary": result.summary(), **numbers}


class JsonResult:
    """``save``/``load`` of a dataclass result as one JSON file that starts with the narrows
    header. A subclass names its ``KIND`` (``"ssl.linear"``), ``VERSION``, the fields it
    writes (``SAVED``; ``provenance`` goes into the header) and, for errors, ``WHAT`` the file
    holds and ``FIX`` (what to point at instead)."""

    KIND: ClassVar[str] = ""
    VERSION: ClassVar[int] = 1
    SAVED: ClassVar[tuple[str, ...]] = ()
    WHAT: ClassVar[str] = "result"
    FIX: ClassVar[str] = "point at a result file a narrows command wrote"

    def save(self, path: str | Path) -> Path:
        """Write the header and the ``SAVED`` fields to ``path`` (atomically); returns it."""
        from narrows.runs.files import atomic_write_json

        return atomic_write_json(path, {**header(self.KIND, self.VERSION,
                                                 getattr(self, "provenance", None)),
                                        **{name: getattr(self, name) for name in self.SAVED}})

    @classmethod
    def load(cls, path: str | Path) -> Any:
        """The result :meth:`save` wrote to ``path``."""
        from narrows.runs.files import read_json_file

        if not Path(path).is_file():
            raise UserError(f"no {cls.WHAT} {path}", cls.FIX)
        document = read_json_file(path, cls.WHAT, cls.FIX, required_keys=cls.SAVED, kind=dict)
        check_header(document, cls.KIND, cls.VERSION, str(path))
        return cls(**{name: document[name] for name in cls.SAVED},  # type: ignore[call-arg]
                   provenance=document.get("provenance", {}))
