"""The result of an extraction: histograms, influential indices and diagnostics.

Indices are read from the histogram ``n_c`` at a per-image ``k_img``: the first ``k`` channels
in the order (−n_c[j], j). Upstream reversed a numpy argsort, so on equal counts the higher id
came first; narrows puts the lower id first, so the result is deterministic.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from narrows.decompose.indices import ClassIndices
from narrows.errors import UserError
from narrows.runs.files import atomic_torch_save

STATE_FILE = "histogram.pt"


def rank_by_count(counts: Tensor) -> Tensor:
    """Per row, the channel ids ordered by (−count, id): ``(C, D)`` int64."""
    return torch.sort(counts, dim=-1, descending=True, stable=True).indices


@dataclass
class Extraction:
    """What :func:`narrows.decompose.extract` counted (see :mod:`narrows.decompose.histogram`).

    ``buckets`` is ``(C, D, len(ks))``; ``below`` is ``(C, T, D+1)`` for the ``thresholds``;
    ``mass`` the per-class sum of each image's top-``k_mass`` share of its positive response; ``dead`` the per-class
    number of images with no positive response (left out of the mass and Ψ); ``k`` and
    ``k_img`` the defaults of :meth:`indices`; ``meta`` provenance (model, layer, data, split,
    ``class_names`` for the figures).
    """

    buckets: Tensor
    ks: list[int]
    images: Tensor
    dead: Tensor
    mass: Tensor
    k_mass: int
    thresholds: list[float]
    below: Tensor
    k: int
    k_img: int
    meta: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def from_state(
        cls, state: dict[str, Any], k: int, k_img: int, meta: dict[str, Any] | None = None
    ) -> Extraction:
        """Wrap a :meth:`TopKHistogram.state_dict` result."""
        return cls(
            buckets=state["buckets"],
            ks=list(state["ks"]),
            images=state["images"],
            dead=state["dead"],
            mass=state["mass"],
            k_mass=int(state["k_mass"]),
            thresholds=[float(t) for t in state["thresholds"]],
            below=state["below"],
            k=int(k),
            k_img=int(k_img),
            meta=dict(meta or {}),
        )

    # -- shapes ------------------------------------------------------------------------------
    @property
    def num_classes(self) -> int:
        return int(self.buckets.shape[0])

    @property
    def num_channels(self) -> int:
        return int(self.buckets.shape[1])

    # -- histograms and indices --------------------------------------------------------------
    def counts(self, k_img: int | None = None) -> Tensor:
        """``(C, D)``: how many images of each class have channel j among their top ``k_img``."""
        k_img = self.k_img if k_img is None else int(k_img)
        if k_img not in self.ks:
            raise UserError(
                f"the histogram was counted for per-image k in {self.ks}, not {k_img}",
                "extract again with this k among --ks (or as --k-img)",
            )
        return self.buckets[:, :, : self.ks.index(k_img) + 1].sum(dim=2)

    def ranking(self, k_img: int | None = None) -> ClassIndices:
        """All ``D`` channels of each class, by (−count, id) at ``k_img``."""
        k_img = self.k_img if k_img is None else int(k_img)
        order = rank_by_count(self.counts(k_img))
        meta = {**self.meta, "k": self.num_channels, "k_img": k_img, "ranking": True}
        return ClassIndices(order.tolist(), self.num_channels, meta)

    def indices(self, k: int | None = None, k_img: int | None = None) -> ClassIndices:
        """Each class's ``k`` most frequent channels at per-image ``k_img`` (default: ``k``'s own).

        With the defaults (``k_img`` = ``k``), the spec's choice: the histogram of each image's
        top-k gives the k most frequent channels.
        """
        k = self.k if k is None else int(k)
        if k_img is None:
            k_img = self.k_img if k == self.k else k
        if not 1 <= k <= self.num_channels:
            raise UserError(f"k must lie in [1, {self.num_channels}], got {k}", "pass a valid k")
        ranked = self.ranking(k_img)
        out = ranked.top(k)
        out.meta = {**self.meta, "k": k, "k_img": int(k_img), "counts": self._counts_of(out, k_img)}
        return out

    def chosen(self) -> ClassIndices:
        """The extraction's own result: :meth:`fractional_indices` when it was made with a
        fraction (variant A, ``meta["fraction"]``), else :meth:`indices` at ``k``/``k_img``."""
        fraction = self.meta.get("fraction")
        return self.fractional_indices(float(fraction)) if fraction else self.indices()

    def _counts_of(self, indices: ClassIndices, k_img: int) -> list[list[int]]:
        counts = self.counts(k_img)
        return [[int(counts[c, j]) for j in row] for c, row in enumerate(indices.indices)]

    def fractional_indices(self, fraction: float) -> ClassIndices:
        """Variant A (upstream's fractional k): a different number of channels per class.

        For class c, ``k_c`` is the mean over its images of the number of ranked channels whose
        running normalised mass is still below ``fraction``, truncated. With ``q`` the histogram
        at per-image ``k_c`` normalised to sum 1, the channels kept are those whose running sum
        of ``q``, taken in ascending order (the reverse of (−count, id)), exceeds ``fraction``:
        about the channels holding the top ``1 − fraction`` of the histogram's mass. Needs the
        histogram counted at every ``k_c`` (:func:`narrows.decompose.extract_fractional`).
        """
        per_class = self.fractional_k(fraction)
        rows = []
        for c, k_c in enumerate(per_class):
            counts = self.counts(k_c)[c].double()
            order = rank_by_count(counts[None])[0].flip(0)  # ascending, reverse of (−n, j)
            q = counts[order] / counts.sum().clamp(min=1)
            kept = order[q.cumsum(0) > fraction].flip(0).tolist()
            rows.append(kept or [int(order[-1])])
        meta = {**self.meta, "fraction": fraction, "k_per_class": per_class}
        return ClassIndices(rows, self.num_channels, meta)

    def fractional_k(self, fraction: float) -> list[int]:
        """Per class, ``int(mean_i #{j : running mass_j < fraction})``, at least 1."""
        mean = self._below_mean(fraction)
        return [max(1, min(self.num_channels, int(m))) for m in mean.tolist()]

    # -- diagnostics -------------------------------------------------------------------------
    def mean_mass(self) -> Tensor:
        """``(C,)``: the mean over a class's images of the share of their positive response in their top ``k_mass``."""
        alive = (self.images - self.dead).double()
        return self.mass.double() / alive.clamp(min=1)

    def psi(self, threshold: float) -> tuple[Tensor, Tensor]:
        """Selectivity ``Ψ_c(t) = (D − median_i n_i(t)) / D`` per class, and its mean-based form.

        ``n_i(t)`` is the number of image i's ranked channels whose running normalised mass is
        still below ``t`` (upstream's ``(cumsum < t).sum()``); the median of an even number of
        images is the mean of the two middle values, as in numpy.
        """
        hist = self._below(threshold)
        d = self.num_channels
        median = torch.tensor([_median_of_histogram(row) for row in hist], dtype=torch.float64)
        mean = self._below_mean(threshold)
        return (d - median) / d, (d - mean) / d

    def _below(self, threshold: float) -> Tensor:
        matches = [i for i, t in enumerate(self.thresholds) if math.isclose(t, threshold)]
        if not matches:
            raise UserError(
                f"the running mass was counted for thresholds {self.thresholds}, not {threshold}",
                "extract again with this value among --thresholds",
            )
        return self.below[:, matches[0]]

    def _below_mean(self, threshold: float) -> Tensor:
        hist = self._below(threshold).double()
        values = torch.arange(self.num_channels + 1, dtype=torch.float64)
        return (hist * values).sum(dim=1) / hist.sum(dim=1).clamp(min=1)

    def summary(self) -> str:
        """One line for the terminal (the numbers behind it: :meth:`diagnostics`)."""
        found = self.diagnostics()
        chosen = found["indices"]
        lengths = sorted({len(row) for row in chosen})
        per = str(lengths[0]) if len(lengths) == 1 else f"{lengths[0]}-{lengths[-1]}"
        line = (f"{self.num_classes} classes × {self.num_channels} channels: k = {per} "
                f"(per image {self.k_img}), union {found['union_size']}, mean top-{self.k_mass} "
                f"mass {found['mean_mass_overall']:.3f}")
        for t, psi in found.get("psi", {}).items():
            line += f", Ψ({t}) = {psi['overall_median']:.3f}"
        return line

    def to_rows(self) -> list[dict[str, Any]]:
        """One row per class: name, images, images without positive response, mean mass and
        the chosen ids (space-separated)."""
        names = class_labels(self.meta.get("class_names"), self.num_classes)
        chosen = self.chosen().indices
        mass = self.mean_mass().tolist()
        return [{"class": c, "name": names[c], "images": int(self.images[c]),
                 "images_without_positive_response": int(self.dead[c]),
                 "mean_mass": float(mass[c]), "k": len(chosen[c]),
                 "indices": " ".join(map(str, chosen[c]))} for c in range(self.num_classes)]

    def diagnostics(self) -> dict[str, Any]:
        """JSON-ready diagnostics: images, mean mass, Ψ per threshold, union size."""
        chosen = self.chosen()
        out: dict[str, Any] = {
            "k": self.k,
            "k_img": self.k_img,
            "num_classes": self.num_classes,
            "num_channels": self.num_channels,
            "images": self.images.tolist(),
            "images_without_positive_response": self.dead.tolist(),
            "k_mass": self.k_mass,
            "mean_mass": self.mean_mass().tolist(),
            "mean_mass_overall": float(
                self.mass.double().sum() / (self.images - self.dead).sum().clamp(min=1)
            ),
            "union_size": len(chosen.union()),
            "indices": chosen.indices,
        }
        if self.thresholds:
            out["psi"] = {}
            for t in self.thresholds:
                median, mean = self.psi(t)
                out["psi"][f"{t:g}"] = {
                    "median": median.tolist(),
                    "mean": mean.tolist(),
                    "overall_median": float(median.mean()),
                    "overall_mean": float(mean.mean()),
                }
        return out

    # -- files -------------------------------------------------------------------------------
    def state(self) -> dict[str, Any]:
        from narrows.decompose.saving import decompose_header

        return {
            **decompose_header("extraction", self.meta),
            "buckets": self.buckets.cpu(),
            "ks": list(self.ks),
            "images": self.images.cpu(),
            "dead": self.dead.cpu(),
            "mass": self.mass.cpu().double(),
            "k_mass": self.k_mass,
            "thresholds": list(self.thresholds),
            "below": self.below.cpu(),
            "k": self.k,
            "k_img": self.k_img,
            "meta": dict(self.meta),
        }

    def save(self, directory: str | Path) -> Path:
        """Write ``histogram.pt`` (everything), ``indices.json`` (:meth:`chosen`, wrapped form) and
        ``ranking.json`` (all ``D`` channels per class) into ``directory``, atomically."""
        directory = Path(directory)
        atomic_torch_save(directory / STATE_FILE, self.state())
        self.chosen().save(directory / "indices.json")
        self.ranking().save(directory / "ranking.json")
        return directory

    @classmethod
    def load(cls, path: str | Path) -> Extraction:
        """Read what :meth:`save` wrote (``path``: the directory or its ``histogram.pt``)."""
        path = Path(path)
        file = path / STATE_FILE if path.is_dir() else path
        if not file.is_file():
            raise UserError(
                f"{file} does not exist", "pass the --out directory of 'narrows decompose extract'"
            )
        from narrows.runs.files import read_torch_file, reading

        fix = "delete it and run 'narrows decompose extract' again (or pass --overwrite)"
        state = read_torch_file(file, "extraction file", fix)
        from narrows.runs.results import check_header

        with reading(file, "extraction file", fix):
            if not isinstance(state, dict):
                raise ValueError(f"it holds a {type(state).__name__}, not a dict")
            check_header(state, "decompose.extraction", 1, str(file))
            return cls.from_state(state, state["k"], state["k_img"], state.get("meta"))

    # -- figures -----------------------------------------------------------------------------
    def plot(self, k_img: int | None = None, ax: Any = None) -> tuple[Any, Any]:
        """Heat map of the histogram: one row per class, the share of its images per channel,
        the chosen ``k`` channels outlined. Returns ``(fig, ax)``."""
        from narrows.plotting import pyplot

        plt = pyplot()
        k_img = self.k_img if k_img is None else k_img
        counts = self.counts(k_img).double()
        share = counts / self.images.double().clamp(min=1)[:, None]
        c, d = share.shape
        if ax is None:
            fig, ax = plt.subplots(figsize=(min(2 + d * 0.14, 16), 1.2 + c * 0.32))
        else:
            fig = ax.figure
        image = ax.imshow(share.numpy(), aspect="auto", cmap="viridis", vmin=0, vmax=1,
                          interpolation="nearest")
        chosen = self.indices(self.k, k_img)
        for cls_id, row in enumerate(chosen.indices):
            for j in row:
                ax.add_patch(plt.Rectangle((j - 0.5, cls_id - 0.5), 1, 1, fill=False,
                                           edgecolor="white", linewidth=0.8))
        ax.set_xlabel("channel")
        ax.set_ylabel("class")
        names = class_labels(self.meta.get("class_names"), c)
        if c <= 40:
            ax.set_yticks(range(c), names, fontsize=8 if c <= 20 else 6)
        ax.set_title(f"share of each class's images with the channel in their top {k_img} "
                     f"(outlined: the chosen {chosen.k or 'k'})", fontsize=9)
        fig.colorbar(image, ax=ax, fraction=0.03, pad=0.01)
        fig.tight_layout()
        return fig, ax


def class_labels(names: Any, count: int) -> list[str]:
    """The ``count`` class names when ``names`` has them all, else the class ids as text."""
    if isinstance(names, (list, tuple)) and len(names) == count:
        return [str(n) for n in names]
    return [str(c) for c in range(count)]


def _median_of_histogram(counts: Tensor) -> float:
    """The median of the values ``0..len-1`` taken ``counts[v]`` times (numpy's convention)."""
    total = int(counts.sum())
    if total == 0:
        return float("nan")
    cumulative = counts.cumsum(0)
    lower = int(torch.searchsorted(cumulative, torch.tensor((total - 1) // 2 + 1), right=False))
    upper = int(torch.searchsorted(cumulative, torch.tensor(total // 2 + 1), right=False))
    return (lower + upper) / 2
