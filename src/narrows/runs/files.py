"""Atomic file writes: a reader never sees a half-written result file."""

from __future__ import annotations

import json
import os
import tempfile
import weakref
from collections.abc import Callable
from pathlib import Path
from typing import IO, Any

# Run directories opened but not yet written to (see ``RunDir.open``): the first file written
# anywhere inside one creates it and writes its config first. Weak values: a run that is
# dropped (its command was refused) leaves nothing to do.
_unclaimed: weakref.WeakValueDictionary[Path, Any] = weakref.WeakValueDictionary()


def claim_on_first_write(directory: Path, owner: Any) -> None:
    """Call ``owner.claim()`` before the first file is written inside ``directory``."""
    _unclaimed[directory.resolve()] = owner


def forget_claim(directory: Path) -> None:
    """Stop watching ``directory`` (it has been claimed)."""
    _unclaimed.pop(directory.resolve(), None)


def _claim_before_writing(path: Path) -> None:
    if not len(_unclaimed):
        return
    target = path.resolve()
    owners = sorted(((d, o) for d, o in list(_unclaimed.items())
                     if d == target or d in target.parents), key=lambda item: len(item[0].parts))
    for _, owner in owners:  # outer runs first (a compare run before its models' runs)
        owner.claim()


def atomic_write(path: str | Path, write: Callable[[IO[bytes]], None]) -> Path:
    """Call ``write(fh)`` on a temporary file beside ``path``, then rename it into place.

    Inside a run directory that is open but still unwritten, its config is written first.
    """
    path = Path(path)
    _claim_before_writing(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        os.chmod(tmp, 0o666 & ~_umask())  # mkstemp makes 0600; give the usual permissions
        with os.fdopen(fd, "wb") as fh:
            write(fh)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        raise
    return path


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def atomic_write_bytes(path: str | Path, data: bytes) -> Path:
    return atomic_write(path, lambda fh: fh.write(data))


def atomic_write_text(path: str | Path, text: str) -> Path:
    return atomic_write_bytes(path, text.encode("utf-8"))


def atomic_write_json(path: str | Path, obj: Any) -> Path:
    return atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=False) + "\n")


def atomic_torch_save(path: str | Path, obj: Any) -> Path:
    """``torch.save`` through a temporary file."""
    import torch

    return atomic_write(path, lambda fh: torch.save(obj, fh))


def atomic_savefig(path: str | Path, fig: Any, **kwargs: Any) -> Path:
    """``fig.savefig`` through a temporary file; the format follows ``path``'s suffix."""
    fmt = Path(path).suffix.lstrip(".") or "png"
    return atomic_write(path, lambda fh: fig.savefig(fh, format=fmt, **kwargs))
