"""Per-class influential channel indices and their JSON file (the upstream form and ours).

The upstream file is one object ``{"0": [7, 23, ...], "1": [...], ...}``: class ids as decimal
strings, each mapped to distinct channel ids. narrows writes a wrapped form
``{"format": "narrows.decompose.indices/1", <provenance>..., "indices": {<the same object>}}``
and reads both.
"""

from __future__ import annotations

import json
import operator
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from narrows.errors import UserError
from narrows.runs.files import atomic_write_json

FORMAT = "narrows.decompose.indices/1"


@dataclass
class ClassIndices:
    """``indices[c]``: the channel ids of class ``c``, most influential first.

    ``num_channels`` is the feature width ``D`` the ids index into; ``meta`` is provenance
    (model, layer, k, k_img, data, counts, ...), JSON-serialisable.
    """

    indices: list[list[int]]
    num_channels: int
    meta: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        try:
            self.indices = [[operator.index(j) for j in row] for row in self.indices]
        except TypeError as exc:
            raise UserError(f"indices must be integers: {exc}", "use int channel ids") from exc
        _check(self.indices, self.num_channels, "indices")

    @property
    def num_classes(self) -> int:
        return len(self.indices)

    @property
    def k(self) -> int | None:
        """The per-class length when every class has the same one, else ``None``."""
        lengths = {len(row) for row in self.indices}
        return lengths.pop() if len(lengths) == 1 else None

    def top(self, k: int) -> ClassIndices:
        """The first ``k`` ids of each class (all of them where a class has fewer)."""
        if k < 1:
            raise UserError(f"k must be at least 1, got {k}", "pass a positive --k")
        meta = dict(self.meta, k=k)
        return ClassIndices([row[:k] for row in self.indices], self.num_channels, meta)

    def mask(self, k: int | None = None) -> torch.Tensor:
        """A ``(C, D)`` boolean mask, true at each class's (first ``k``) ids."""
        rows = self.indices if k is None else [row[:k] for row in self.indices]
        out = torch.zeros(len(rows), self.num_channels, dtype=torch.bool)
        for c, row in enumerate(rows):
            out[c, row] = True
        return out

    def union(self) -> set[int]:
        """Every channel id used by at least one class."""
        return {j for row in self.indices for j in row}

    def to_json(self) -> dict[str, Any]:
        """The wrapped narrows form (see the module docstring)."""
        return {
            "format": FORMAT,
            **{k: v for k, v in self.meta.items() if k not in ("format", "indices")},
            "num_channels": self.num_channels,
            "indices": {str(c): list(row) for c, row in enumerate(self.indices)},
        }

    def save(self, path: str | Path) -> Path:
        """Write the wrapped form atomically, after the header (format and provenance)."""
        from narrows.decompose.saving import decompose_header

        return atomic_write_json(path, {**decompose_header("indices", self.meta),
                                        **self.to_json()})

    # -- the result contract -------------------------------------------------------------------
    def to_rows(self) -> list[dict[str, Any]]:
        """One row per class and rank: ``class``, ``rank`` (0: most influential), ``channel``."""
        return [{"class": c, "rank": r, "channel": j}
                for c, row in enumerate(self.indices) for r, j in enumerate(row)]

    def summary(self) -> str:
        """One line: classes, ids per class, channels and their union."""
        per = self.k if self.k is not None else f"{min(map(len, self.indices))}-" \
            f"{max(map(len, self.indices))}"
        return (f"{self.num_classes} classes × {per} ids of {self.num_channels} channels; "
                f"union {len(self.union())}")

    def plot(self, ax: Any = None) -> tuple[Any, Any]:
        """The ``(C, D)`` mask (a dark cell: the class uses the channel); returns ``(fig, ax)``."""
        from narrows.plotting import pyplot

        plt = pyplot()
        c, d = self.num_classes, self.num_channels
        if ax is None:
            fig, ax = plt.subplots(figsize=(min(2 + d * 0.14, 16), 1.2 + c * 0.32))
        else:
            fig = ax.figure
        ax.imshow(self.mask().numpy(), aspect="auto", cmap="Greys", vmin=0, vmax=1,
                  interpolation="nearest")
        ax.set_xlabel("channel")
        ax.set_ylabel("class")
        ax.set_title(self.summary(), fontsize=9)
        fig.tight_layout()
        return fig, ax

    def save_upstream(self, path: str | Path) -> Path:
        """Write the bare upstream form ``{"0": [...], ...}`` atomically."""
        return atomic_write_json(path, {str(c): list(r) for c, r in enumerate(self.indices)})

    @classmethod
    def from_json(
        cls,
        data: Any,
        *,
        num_classes: int | None = None,
        num_channels: int | None = None,
        source: str = "indices",
    ) -> ClassIndices:
        """Parse the wrapped or the bare form; see :meth:`load`."""
        if not isinstance(data, Mapping):
            raise UserError(
                f"{source} holds a {type(data).__name__}, not an object of class ids",
                'write {"0": [ids...], "1": [...], ...}',
            )
        meta: dict[str, Any] = {}
        if "indices" in data and "format" in data:
            if data["format"] != FORMAT:
                raise UserError(
                    f"{source} has format {data['format']!r}, not {FORMAT!r}",
                    "write it with narrows decompose extract",
                )
            meta = {k: v for k, v in data.items()
                    if k not in ("format", "indices", "provenance")}
            table = data["indices"]
            if not isinstance(table, Mapping):
                raise UserError(f"{source}: 'indices' is not an object", "re-extract the file")
        else:
            table = data
        rows = _rows(table, source, num_classes)
        saved_d = meta.pop("num_channels", None)
        if saved_d is not None and (isinstance(saved_d, bool) or not isinstance(saved_d, int)
                                    or saved_d < 1):
            raise UserError(f"{source}: num_channels is {saved_d!r}, not a positive integer",
                            "re-extract the file with 'narrows decompose extract'")
        if num_channels is not None and saved_d is not None and int(saved_d) != num_channels:
            raise UserError(
                f"{source} was extracted for {saved_d} channels, but the model has {num_channels}",
                "extract indices for this model's last feature layer",
            )
        width = num_channels if num_channels is not None else saved_d
        if width is None:
            width = max((j for row in rows for j in row if isinstance(j, int)), default=-1) + 1
        _check(rows, int(width), source)
        return cls(rows, int(width), meta)

    @classmethod
    def load(
        cls,
        path: str | Path,
        num_classes: int | None = None,
        num_channels: int | None = None,
    ) -> ClassIndices:
        """Read an indices JSON file (wrapped or bare upstream form).

        Every class key ``"0"..."C-1"`` must be present with a non-empty list of distinct ints in
        ``[0, D)``. Given ``num_classes``/``num_channels`` (the model's ``C`` and ``D``), a file
        for another number of classes or channels is a :class:`UserError`. Without
        ``num_channels`` and without a recorded one, ``D`` is taken as the largest id plus one.
        """
        path = Path(path)
        if not path.is_file():
            raise UserError(f"indices file {path} does not exist", "check the --indices path")
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise UserError(f"indices file {path} is not JSON: {exc}", "check the file") from exc
        return cls.from_json(
            data, num_classes=num_classes, num_channels=num_channels, source=f"indices file {path}"
        )

    @classmethod
    def random(cls, num_classes: int, num_channels: int, k: int, seed: int = 0) -> ClassIndices:
        """``k`` distinct channels per class drawn uniformly, from a generator seeded by ``seed``."""
        _check_k(k, num_channels)
        gen = torch.Generator().manual_seed(int(seed))
        rows = [
            torch.randperm(num_channels, generator=gen)[:k].tolist() for _ in range(num_classes)
        ]
        return cls(rows, num_channels, {"source": "random", "k": k, "seed": int(seed)})

    @classmethod
    def top_weights(cls, linear: nn.Linear, k: int) -> ClassIndices:
        """Each class's ``k`` channels with the largest ``|W[c, j]|`` (ties: lower id first)."""
        weight = linear.weight.detach().abs().cpu().double()
        num_classes, num_channels = weight.shape
        _check_k(k, num_channels)
        rows = [rank_desc(weight[c])[:k] for c in range(num_classes)]
        return cls(rows, num_channels, {"source": "top_weights", "k": k})


def rank_desc(values: torch.Tensor) -> list[int]:
    """Positions of a 1-D tensor sorted by (−value, position): a deterministic descending order."""
    order = torch.argsort(values, descending=True, stable=True)
    return [int(j) for j in order]


def _check_k(k: int, num_channels: int) -> None:
    if not 1 <= k <= num_channels:
        raise UserError(
            f"k must be between 1 and the {num_channels} channels, got {k}", "pass a valid --k"
        )


def _rows(table: Mapping[Any, Any], source: str, num_classes: int | None) -> list[list[Any]]:
    keys = list(table)
    if not keys:
        raise UserError(f"{source} lists no classes", 'write {"0": [ids...], ...}')
    try:
        ids = sorted(int(k) for k in keys)
    except (TypeError, ValueError) as exc:
        raise UserError(
            f"{source} has a class key that is not an integer ({keys[:5]})",
            'use class ids "0".."C-1" as keys',
        ) from exc
    expected = num_classes if num_classes is not None else len(keys)
    if ids != list(range(expected)) or len(keys) != expected:
        if num_classes is not None and len(keys) != num_classes:
            raise UserError(
                f"{source} has indices for {len(keys)} classes, but the model has {num_classes}",
                "extract indices for this model and data set",
            )
        missing = sorted(set(range(expected)) - set(ids))
        raise UserError(
            f"{source} must list every class 0..{expected - 1}"
            + (f"; missing {missing[:10]}" if missing else "; it has others or duplicates"),
            "write one entry per class",
        )
    by_id = {int(k): v for k, v in table.items()}
    rows = []
    for c in range(expected):
        row = by_id[c]
        if isinstance(row, (str, bytes)) or not isinstance(row, Sequence):
            raise UserError(f"{source}: class {c} maps to {row!r}, not a list", "write id lists")
        rows.append(list(row))
    return rows


def _check(rows: list[list[Any]], num_channels: int, source: str) -> None:
    if num_channels < 1:
        raise UserError(f"{source}: the number of channels must be positive", "")
    for c, row in enumerate(rows):
        if not row:
            raise UserError(f"{source}: class {c} has no indices", "give each class at least one")
        if any(isinstance(j, bool) or not isinstance(j, int) for j in row):
            raise UserError(f"{source}: class {c} has a non-integer id in {row}", "use int ids")
        if len(set(row)) != len(row):
            raise UserError(f"{source}: class {c} repeats an id in {row}", "make ids distinct")
        bad = [j for j in row if not 0 <= j < num_channels]
        if bad:
            raise UserError(
                f"{source}: class {c} has ids {bad[:5]} outside [0, {num_channels}) "
                f"(the model has {num_channels} channels)",
                "extract indices for this model's last feature layer",
            )
