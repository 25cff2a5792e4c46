"""Checks of a parsed command line that need no torch: a mistake is refused in well under a
second, before the heavy imports (torch, timm) that the command itself needs.

Each check looks at options by name, so every command gets them: files named by
``--checkpoint``-like options must exist, ``--data`` specs must parse and name an existing path,
and ``--out`` must be a place this process can write: a directory (or, for a figure, a file of
a known format) under a writable directory.
"""

from __future__ import annotations

from dataclasses import fields
from pathlib import Path
from typing import Any

from narrows.errors import UserError

FILE_OPTIONS = ("checkpoint", "csg_checkpoint", "indices", "readout")
DATA_OPTIONS = ("data", "key_data")


def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def check(cfg: Any) -> None:
    """Raise :class:`UserError` for the first option of ``cfg`` that cannot be right."""
    from narrows.data.specs import LAYOUTS, NEEDS_PATH, parse_spec

    names = {f.name for f in fields(cfg)}
    for name in FILE_OPTIONS:
        value = getattr(cfg, name, None) if name in names else None
        if isinstance(value, str) and value and not Path(value).expanduser().is_file():
            where = Path(value).expanduser()
            what = "is a directory, not a file" if where.is_dir() else "does not exist"
            raise UserError(f"{_flag(name)} {value} {what}", "check the path")
    for name in DATA_OPTIONS:
        value = getattr(cfg, name, None) if name in names else None
        if not isinstance(value, str) or not value:
            continue
        parsed = parse_spec(value)
        if parsed.kind in NEEDS_PATH and not getattr(cfg, "download", False):
            root = Path(parsed.argument).expanduser()
            if not root.exists():
                raise UserError(f"{_flag(name)} {value}: no such directory {root}",
                                "expected " + LAYOUTS[parsed.kind].format(root=root))
    if "out" not in names:
        return
    out = getattr(cfg, "out", None)
    field = next(f for f in fields(cfg) if f.name == "out")
    if not out:  # the default place: runs/... under the working directory
        _check_writable_ancestor(Path("runs"), "the default output place runs/",
                                 fix="pass --out DIR in a writable place")
    elif (field.metadata.get("metavar") or "").startswith("FILE"):  # FILE: a figure; FILE.x
        check_out_file(Path(out).expanduser(), field.metadata["metavar"].partition(".")[2])
    else:
        check_out_dir(Path(out).expanduser())


FIGURE_FORMATS = ("png", "pdf", "svg", "svgz", "jpg", "jpeg", "eps", "ps", "tif", "tiff", "webp")


def check_out_dir(out: Path) -> None:
    """``--out DIR`` can become a directory: it is none of a file, and its first existing
    ancestor is a directory this process can create entries in."""
    if out.exists() and not out.is_dir():
        raise UserError(f"--out {out} is a file", "pass a directory (new or a run directory)")
    _check_writable_ancestor(out, f"--out {out}")


def check_out_file(out: Path, kind: str = "") -> None:
    """``--out FILE``: not a directory, a writable place, and a known figure format (or, with
    ``kind``, that suffix or none)."""
    if out.is_dir():
        raise UserError(f"--out {out} is a directory", f"pass a file name, e.g. out.{kind or 'png'}")
    suffix = out.suffix.lower().lstrip(".")
    formats = (kind,) if kind else FIGURE_FORMATS
    if suffix and suffix not in formats:
        raise UserError(f"--out {out}: unknown {'file' if kind else 'figure'} format '.{suffix}'",
                        f"use one of: {', '.join('.' + f for f in formats)}")
    _check_writable_ancestor(out.parent, f"--out {out}")


def _check_writable_ancestor(path: Path, what: str, fix: str = "choose a writable place") -> None:
    """The first existing ancestor of ``path`` (itself included) is a directory in which an
    entry can be created: tried with a temporary directory, removed at once (``os.access``
    says yes to root on read-only mounts, immutable directories and /proc)."""
    import os
    import tempfile

    ancestor = path.absolute()
    while not ancestor.exists() and ancestor != ancestor.parent:
        ancestor = ancestor.parent
    if not ancestor.is_dir():
        raise UserError(f"{what}: {ancestor} is a file, not a directory",
                        "choose a place under a directory")
    try:
        os.rmdir(tempfile.mkdtemp(prefix=".narrows-check-", dir=ancestor))
    except OSError as exc:
        reason = exc.strerror or type(exc).__name__
        raise UserError(f"{what}: cannot write under {ancestor} ({reason})", fix) from None
