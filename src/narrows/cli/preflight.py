"""Checks of a parsed command line that need no torch: a mistake is refused in well under a
second, before the heavy imports (torch, timm) that the command itself needs.

Each check looks at options by name, so every command gets them: files named by
``--checkpoint``-like options must exist, ``--data`` specs must parse and name an existing path,
and ``--out`` must not be a regular file.
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
    out = getattr(cfg, "out", None) if "out" in names else None
    if isinstance(out, str) and out and Path(out).expanduser().is_file():
        raise UserError(f"--out {out} is a file", "pass a directory (new or a run directory)")
