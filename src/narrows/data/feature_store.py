"""Features of a whole data set on disk, filled batch by batch, in bounded memory.

A :class:`FeatureStore` is a directory: ``meta.json`` (what the features are of — a key the
caller builds with :func:`cache_key` — their shapes, dtype and how many rows are done),
one ``.npy`` per part (``numpy.lib.format.open_memmap``, so only the rows being written or
read are in memory) and ``labels.npy``. It is the state of a
:func:`narrows.data.streaming.stream_dataset` pass: ``state_dict()`` flushes the files and
returns ``{"rows": done}``; a killed pass resumes from the last saved state, rows past it are
simply written again. A finished store (``complete``) is a cache: opening it with the same key
reuses it; any other key is stored in another directory, or, if given the same directory,
starts afresh.
"""

from __future__ import annotations

import hashlib
import json
import shutil
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from narrows.errors import UserError
from narrows.runs.files import atomic_write_json

CACHE_VERSION = 1
META = "meta.json"
DTYPES = ("float32", "float16")


def cache_key(**facts: Any) -> str:
    """A short name (16 hex digits of SHA-256) of ``facts``, everything that decides the
    features (backbone id, data spec, split, transform, image size, normalisation, blocks
    kept ...), given as JSON-able keyword values."""
    text = json.dumps({"version": CACHE_VERSION, **facts}, sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def _safe(text: str) -> str:
    return "".join(c if c.isalnum() or c in "._@=+-" else "_" for c in text).strip("_") or "x"


def store_directory(cache: str | Path, backbone_id: str, data_key: str, split: str,
                    key: str) -> Path:
    """``<cache>/<backbone_id>/<data_key>-<split>-<key>``, file-name-safe."""
    return Path(cache) / _safe(backbone_id) / f"{_safe(data_key)}-{_safe(split)}-{key}"


class FeatureStore:
    """Features of ``total`` rows, one array per part with the shape per row in ``shapes``;
    rows ``[0, done)`` are valid. Open one with :meth:`open`."""

    def __init__(self, directory: Path, meta: dict[str, Any]) -> None:
        self.directory = directory
        self.meta = meta
        self._maps: dict[str, np.memmap] = {}
        self._next = 0  # the row the next batch of the pass goes to
        self._on_disk = int(meta["rows"])  # rows valid when the store was opened

    # -- opening -------------------------------------------------------------------------------
    @classmethod
    def open(cls, directory: str | Path, *, key: str, total: int,
             shapes: Mapping[str, Sequence[int]], dtype: str = "float32",
             facts: Mapping[str, Any] | None = None) -> FeatureStore:
        """The store in ``directory`` for ``key`` (``facts``: the JSON behind it, kept in
        ``meta.json`` for people): reused when ``meta.json`` names the same key, rows, shapes
        and dtype (complete or not); otherwise the directory is emptied and a new store begun."""
        if dtype not in DTYPES:
            raise UserError(f"feature dtype {dtype!r} is not supported",
                            f"use one of {', '.join(DTYPES)}")
        directory = Path(directory)
        wanted = {"format": "narrows.feature_store", "version": CACHE_VERSION, "key": key,
                  "total": int(total), "dtype": dtype,
                  "shapes": {str(k): [int(s) for s in v] for k, v in shapes.items()}}
        found = cls._read_meta(directory)
        if found is not None and all(found.get(k) == v for k, v in wanted.items()):
            store = cls(directory, found)
            if store._files_ok():
                return store
        if directory.exists():
            shutil.rmtree(directory)
        directory.mkdir(parents=True)
        meta = {**wanted, "facts": dict(facts or {}), "rows": 0, "complete": False}
        for part, shape in wanted["shapes"].items():
            np.lib.format.open_memmap(directory / f"{part}.npy", mode="w+", dtype=dtype,
                                      shape=(int(total), *shape))
        np.lib.format.open_memmap(directory / "labels.npy", mode="w+", dtype=np.int64,
                                  shape=(int(total),))
        store = cls(directory, meta)
        store._write_meta()
        return store

    @staticmethod
    def _read_meta(directory: Path) -> dict[str, Any] | None:
        try:
            meta = json.loads((directory / META).read_text())
        except (OSError, ValueError):
            return None
        return meta if isinstance(meta, dict) else None

    def _files_ok(self) -> bool:
        for part in [*self.parts, "labels"]:
            try:
                array = np.load(self.directory / f"{part}.npy", mmap_mode="r")
            except (OSError, ValueError):
                return False
            if array.shape[0] != self.total:
                return False
        return True

    def _write_meta(self) -> None:
        atomic_write_json(self.directory / META, self.meta)

    # -- facts ---------------------------------------------------------------------------------
    @property
    def total(self) -> int:
        """Rows the store holds when complete."""
        return int(self.meta["total"])

    @property
    def done(self) -> int:
        """Rows ``[0, done)`` written and flushed (the resume point)."""
        return int(self.meta["rows"])

    @property
    def complete(self) -> bool:
        """Whether every row was written (:meth:`finish`)."""
        return bool(self.meta["complete"])

    @property
    def parts(self) -> list[str]:
        """The names of the stored parts."""
        return list(self.meta["shapes"])

    # -- writing -------------------------------------------------------------------------------
    def _map(self, part: str) -> np.memmap:
        if part not in self._maps:
            self._maps[part] = np.load(self.directory / f"{part}.npy", mmap_mode="r+")
        return self._maps[part]

    def write(self, start: int, parts: Mapping[str, Tensor], labels: Tensor) -> None:
        """Put rows ``[start, start + B)``: every part (shape [B, *shape]) and the labels."""
        missing = set(self.parts) - set(parts)
        if missing:
            raise ValueError(f"the batch lacks the parts {sorted(missing)}")
        stop = start + len(labels)
        if not 0 <= start <= stop <= self.total:
            raise ValueError(f"rows {start}..{stop} outside the store's {self.total}")
        for part in self.parts:
            value = parts[part].detach().to("cpu", torch.float32).numpy()
            self._map(part)[start:stop] = value
        self._map("labels")[start:stop] = labels.detach().to("cpu", torch.int64).numpy()
        self._next = stop

    def append(self, parts: Mapping[str, Tensor], labels: Tensor) -> None:
        """:meth:`write` at the row after the last batch (a pass's step)."""
        self.write(self._next, parts, labels)

    def flush(self, rows: int) -> None:
        """Make rows ``[0, rows)`` durable and record them as done."""
        for array in self._maps.values():
            array.flush()
        self.meta["rows"] = int(rows)
        self._write_meta()

    def state_dict(self) -> dict[str, int]:
        """``{"rows": done}`` after flushing what was written (the stream's saved state)."""
        if self._maps:
            self.flush(self._next)
        return {"rows": self._next}

    def load_state_dict(self, state: Mapping[str, int]) -> None:
        """Continue after ``state["rows"]`` rows; refused (``ValueError``) when the files hold
        fewer."""
        rows = int(state["rows"])
        if not 0 <= rows <= max(self._on_disk, self.done):
            raise ValueError(f"the store holds {self._on_disk} rows, the saved pass {rows}")
        self._next = rows

    def finish(self) -> None:
        """Mark every row written (the store becomes a cache)."""
        self.flush(self.total)
        self.meta["complete"] = True
        self._write_meta()
        self._maps.clear()

    # -- reading -------------------------------------------------------------------------------
    def read(self, part: str, rows: slice | None = None) -> Tensor:
        """Part ``part`` (rows ``rows``, default all) as float32: memory-mapped (nothing is
        read until used) when stored as float32 and all rows are asked for, else a copy."""
        if part not in self.parts:
            raise UserError(f"the feature store {self.directory} has no part {part!r}",
                            f"ask for one of {', '.join(self.parts)}")
        array = np.load(self.directory / f"{part}.npy", mmap_mode="c")
        if rows is not None:
            array = array[rows]
        if array.dtype != np.float32:
            array = array.astype(np.float32)
        return torch.from_numpy(array)

    @property
    def labels(self) -> Tensor:
        """The labels of all rows (int64)."""
        return torch.from_numpy(np.array(np.load(self.directory / "labels.npy", mmap_mode="r")))
