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
    """Write ``data`` to ``path`` atomically (see :func:`atomic_write`); returns ``path``."""
    return atomic_write(path, lambda fh: fh.write(data))


def atomic_write_text(path: str | Path, text: str) -> Path:
    """Write ``text`` as UTF-8 to ``path`` atomically; returns ``path``."""
    return atomic_write_bytes(path, text.encode("utf-8"))


def atomic_write_json(path: str | Path, obj: Any) -> Path:
    """Write ``obj`` as indented JSON to ``path`` atomically; returns ``path``."""
    return atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=False) + "\n")


def atomic_torch_save(path: str | Path, obj: Any) -> Path:
    """``torch.save(obj)`` to ``path`` through a temporary file; returns ``path``."""
    import torch

    return atomic_write(path, lambda fh: torch.save(obj, fh))


def atomic_savefig(path: str | Path, fig: Any, **kwargs: Any) -> Path:
    """``fig.savefig`` through a temporary file; the format follows ``path``'s suffix."""
    fmt = Path(path).suffix.lstrip(".") or "png"
    return atomic_write(path, lambda fh: fig.savefig(fh, format=fmt, **kwargs))


# -- reading back what narrows wrote ---------------------------------------------------------
REWRITE_FIX = "delete it, or rerun with --overwrite"


def unreadable(path: str | Path, what: str, exc: BaseException | None = None,
               fix: str = REWRITE_FIX) -> Exception:
    """The one-line :class:`~narrows.errors.UserError` for a damaged file (first line of ``exc``)."""
    from narrows.errors import UserError

    if isinstance(exc, UserError):
        return exc
    detail = f" ({failure_reason(exc)})" if exc is not None else ""
    return UserError(f"{path} is not a readable {what}{detail}", fix)


def failure_reason(exc: BaseException) -> str:
    """A short reason for a failed read: torch's long weights-only and zip messages are said in
    a few words, anything else is its type and the first line of its text."""
    import re

    text = str(exc).strip()
    if "Weights only load failed" in text:
        found = re.search(r"GLOBAL (\S+)", text)
        if found:
            return (f"it holds a pickled Python object ({found.group(1)}) besides tensors and "
                    "plain data, refused because loading it could run code")
        return "not a torch file, or damaged"
    if "PytorchStreamReader" in text or "zip archive" in text:
        return "truncated or not a torch file"
    first = text.splitlines()[0][:160] if text else ""
    return f"{type(exc).__name__}{': ' + first if first else ''}"


class reading:
    """``with reading(path, what):`` turns any error inside into one line naming ``path``.

    Use it around the code that interprets a file's contents (keys, types, shapes), so that a
    damaged cache is refused with the file's name instead of a traceback later.
    """

    def __init__(self, path: str | Path, what: str, fix: str = REWRITE_FIX) -> None:
        self.path, self.what, self.fix = path, what, fix

    def __enter__(self) -> reading:
        return self

    def __exit__(self, kind: Any, exc: BaseException | None, tb: Any) -> bool:
        if exc is None or not isinstance(exc, Exception):
            return False
        raise unreadable(self.path, self.what, exc, self.fix) from exc


def read_json_file(path: str | Path, what: str, fix: str = REWRITE_FIX, *,
                   required_keys: tuple[str, ...] = (), kind: type | None = None) -> Any:
    """Parse a JSON file narrows wrote; a damaged one (or one lacking ``required_keys``, or not
    of type ``kind``, ``dict`` when keys are required) is a one-line error naming it."""
    path = Path(path)
    with reading(path, what, fix):
        data = json.loads(path.read_text(encoding="utf-8"))
    kind = kind or (dict if required_keys else None)
    if kind is not None and not isinstance(data, kind):
        raise unreadable(path, what, ValueError(f"not a JSON {kind.__name__}"), fix)
    missing = [k for k in required_keys if k not in data]
    if missing:
        raise unreadable(path, what, ValueError(f"no '{missing[0]}' key"), fix)
    return data


def read_npy(path: str | Path, what: str, fix: str = REWRITE_FIX) -> Any:
    """``np.load`` of a ``.npy`` file narrows wrote (never pickles); damaged: one line."""
    import numpy as np

    with reading(path, what, fix):
        array = np.load(path, allow_pickle=False)
        if not isinstance(array, np.ndarray):
            raise ValueError("not a single array")
        return array


def read_npz(path: str | Path, what: str, fix: str = REWRITE_FIX, *,
             required: tuple[str, ...] = ()) -> dict[str, Any]:
    """All arrays of a ``.npz`` file narrows wrote, read now (never pickles); one lacking one of
    ``required`` or damaged: one line naming it."""
    import numpy as np

    with reading(path, what, fix):
        with np.load(path, allow_pickle=False) as data:
            arrays = {k: data[k] for k in data.files}
        missing = [k for k in required if k not in arrays]
        if missing:
            raise ValueError(f"no array '{missing[0]}'")
        return arrays


def read_torch_file(path: str | Path, what: str, fix: str = REWRITE_FIX, *,
                    map_location: Any = "cpu", **kwargs: Any) -> Any:
    """``torch.load(weights_only=True)`` of a file narrows wrote; missing or damaged: one line
    naming it."""
    import torch

    from narrows.errors import UserError

    if not Path(path).is_file():
        raise UserError(f"no {what} {path}", fix)

    with reading(path, what, fix):
        return torch.load(path, map_location=map_location, weights_only=True, **kwargs)


def sha256_file(path: str | Path) -> str:
    """The SHA-256 hex digest of the file at ``path``, read in 1 MiB blocks."""
    import hashlib

    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()
