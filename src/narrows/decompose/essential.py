"""Are a class's influential channels essential to it? Gaussian noise on the pooled features.

For every image of class ``c`` (``eval()`` mode, no augmentation), with ``h`` its pooled
features and ``I_c`` the class's ids, three noisy copies of ``h`` are scored by the model's
**original full** linear layer, and the images still predicted as ``c`` are counted:

* ``inf``: the ``|I_c|`` influential entries get noise (upstream ``noise_at_inf``);
* ``noninf``: all the ``D − |I_c|`` other entries get noise (upstream ``noise_at_noninf``);
* ``random``: ``|I_c|`` entries drawn uniformly among the non-influential ones, a control of
  the same size as ``inf``. Upstream compares ``k`` noised channels with ``D − k``; only this
  control says whether the influential ``k`` matter more than any ``k``.

``mode="replace"`` (upstream) replaces the entries by ``σ·z``, ``z ~ N(0, 1)``, so σ = 0 sets
them to zero (ablation); ``mode="add"`` adds ``σ·z``, so σ = 0 leaves the features unchanged.
Upstream uses one level, replace with σ = 1, unseeded. Here ``z`` and the random control set
of an image come from a generator seeded by ``(seed, position of the image in the data set)``:
the counts do not depend on the batch size, and every σ rescales the same draw, so the curves
over σ are not blurred by fresh noise.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
from torch import Tensor, nn
from torch.utils.data import DataLoader, Dataset, Subset

from narrows.decompose.indices import ClassIndices
from narrows.decompose.parts import split_head
from narrows.errors import UserError
from narrows.runs.files import atomic_write_json
from narrows.runtime import derive_seed

Mode = Literal["replace", "add"]
CONDITIONS = ("inf", "noninf", "random")
UPSTREAM_KEYS = {"inf": "noise_at_inf", "noninf": "noise_at_noninf", "random": "noise_at_random"}
FORMAT = "narrows.decompose.essential/1"


@dataclass
class EssentialResult:
    """Counts of images still classified correctly, per noise level, class and condition.

    ``counts[l, c, i]`` is the count for ``sigmas[l]``, class ``c`` and ``CONDITIONS[i]``;
    ``clean[c]`` without noise; ``images[c]`` the images of class ``c`` seen.
    """

    sigmas: list[float]
    mode: str
    counts: np.ndarray
    clean: np.ndarray
    images: np.ndarray
    meta: dict[str, Any] = field(default_factory=dict)

    @property
    def num_classes(self) -> int:
        return int(self.images.shape[0])

    def level(self, sigma: float | None = None) -> int:
        """The position of ``sigma`` in :attr:`sigmas` (default: σ = 1 if measured, else the
        first level)."""
        if sigma is None:
            sigma = 1.0 if 1.0 in self.sigmas else self.sigmas[0]
        for i, s in enumerate(self.sigmas):
            if abs(s - sigma) <= 1e-12:
                return i
        raise UserError(f"noise level {sigma} was not measured ({self.sigmas})",
                        "choose one of the measured levels")

    def to_upstream(self, sigma: float | None = None) -> dict[str, dict[str, int]]:
        """Upstream's per-class object at one level: ``{"0": {"noise_at_inf": n, "noise_at_noninf":
        n, ...}}`` plus the extra keys ``noise_at_random``, ``clean`` and ``images``."""
        lv = self.level(sigma)
        return {str(c): {**{UPSTREAM_KEYS[name]: int(self.counts[lv, c, i])
                            for i, name in enumerate(CONDITIONS)},
                         "clean": int(self.clean[c]), "images": int(self.images[c])}
                for c in range(self.num_classes)}

    def class_names(self) -> list[str]:
        """The classes' names (``meta["class_names"]``), else their ids as text."""
        names = self.meta.get("class_names")
        if isinstance(names, (list, tuple)) and len(names) == self.num_classes:
            return [str(n) for n in names]
        return [str(c) for c in range(self.num_classes)]

    def to_rows(self, per_class: bool = True) -> list[dict[str, Any]]:
        """Rows per noise level: every class (``per_class``, by name where the names are
        known) then ``all``; counts and rates."""
        rows = []
        for lv, sigma in enumerate(self.sigmas):
            names = self.class_names()
            groups = [(names[c], [c]) for c in range(self.num_classes)] if per_class else []
            groups.append(("all", list(range(self.num_classes))))
            for name, classes in groups:
                n = int(self.images[classes].sum())
                row: dict[str, Any] = {"sigma": sigma, "class": name, "images": n,
                                       "clean": int(self.clean[classes].sum())}
                for i, cond in enumerate(CONDITIONS):
                    row[UPSTREAM_KEYS[cond]] = int(self.counts[lv, classes, i].sum())
                for key in ("clean", *UPSTREAM_KEYS.values()):
                    row[f"{key}_rate"] = row[key] / n if n else float("nan")
                rows.append(row)
        return rows

    def rates(self) -> dict[str, list[float]]:
        """Fractions correct over all classes: ``clean`` and each condition per level."""
        n = max(int(self.images.sum()), 1)
        out = {"clean": [float(self.clean.sum()) / n] * len(self.sigmas)}
        for i, cond in enumerate(CONDITIONS):
            out[cond] = [float(self.counts[lv, :, i].sum()) / n for lv in range(len(self.sigmas))]
        return out

    def to_json(self) -> dict[str, Any]:
        return {"format": FORMAT, "sigmas": self.sigmas, "mode": self.mode, "meta": self.meta,
                "images": self.images.tolist(), "clean": self.clean.tolist(),
                "counts": {str(s): self.to_upstream(s) for s in self.sigmas}}

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> EssentialResult:
        if data.get("format") != FORMAT:
            raise UserError(f"not an essential-features result (format {data.get('format')!r})",
                            "re-run narrows decompose essential")
        sigmas = [float(s) for s in data["sigmas"]]
        images = np.asarray(data["images"], dtype=np.int64)
        counts = np.zeros((len(sigmas), len(images), len(CONDITIONS)), dtype=np.int64)
        for lv, s in enumerate(data["counts"].values()):
            for c in range(len(images)):
                for i, cond in enumerate(CONDITIONS):
                    counts[lv, c, i] = s[str(c)][UPSTREAM_KEYS[cond]]
        return cls(sigmas, str(data["mode"]), counts, np.asarray(data["clean"], dtype=np.int64),
                   images, dict(data.get("meta", {})))

    def save(self, path: str | Path) -> Path:
        """The JSON of :meth:`to_json`, its ``format`` followed by the provenance."""
        from narrows.decompose.saving import decompose_header

        return atomic_write_json(path, {**decompose_header("essential", self.meta),
                                        **self.to_json()})

    @classmethod
    def load(cls, path: str | Path) -> EssentialResult:
        data = json.loads(Path(path).read_text(encoding="utf-8"))
        if isinstance(data, Mapping) and data.get("format") != FORMAT:
            from narrows.runs.results import check_header

            check_header(data, "decompose.essential", 1, str(path))  # a newer version: says so
        return cls.from_json(data)

    def summary(self) -> str:
        """One line: the fractions still correct at the default level (:meth:`level`)."""
        lv = self.level()
        rates = self.rates()
        return (f"σ = {self.sigmas[lv]:g} ({self.mode}), {int(self.images.sum())} images: "
                f"clean {100 * rates['clean'][lv]:.1f}%, noise on I_c "
                f"{100 * rates['inf'][lv]:.1f}%, on the others {100 * rates['noninf'][lv]:.1f}%, "
                f"on |I_c| random others {100 * rates['random'][lv]:.1f}% still correct")

    def plot(self, ax: Any = None, title: str | None = None):
        """Fraction still correct against σ for each condition, clean as a dashed line."""
        from narrows.plotting import axes

        fig, ax = axes(ax, (4.5, 3.4))
        rates = self.rates()
        labels = {"inf": "noise on I_c", "noninf": "noise on the others",
                  "random": "noise on |I_c| random others"}
        for cond in CONDITIONS:
            ax.plot(self.sigmas, rates[cond], marker="o", label=labels[cond])
        ax.axhline(rates["clean"][0], color="grey", linestyle="--", label="clean")
        ax.set_xlabel(f"σ ({self.mode})")
        ax.set_ylabel("fraction still correct")
        ax.set_ylim(0, 1.02)
        ax.grid(alpha=0.3)
        if title:
            ax.set_title(title, fontsize=9)
        ax.legend(fontsize=7, loc="best")
        fig.tight_layout()
        return fig, ax


def plot_results(results: Mapping[str, EssentialResult]):
    """One panel per named result (e.g. ``ours`` and ``csg``); returns ``(fig, axes)``."""
    from narrows.plotting import pyplot

    plt = pyplot()
    fig, axes = plt.subplots(1, len(results), figsize=(4.5 * len(results), 3.4), squeeze=False,
                             sharey=True)
    for ax, (name, result) in zip(axes[0], results.items(), strict=True):
        result.plot(ax=ax, title=name)
    fig.tight_layout()
    return fig, axes[0]


def noise_draw(seed: int, position: int, influential: Tensor) -> tuple[Tensor, Tensor]:
    """``(z, control)`` of one image: ``z ~ N(0, 1)^D`` and the boolean random control set, the
    first ``|I_c|`` non-influential channels of a random permutation, from a generator seeded by
    ``(seed, position)``. ``influential`` is the class's boolean ``(D,)`` mask."""
    gen = torch.Generator().manual_seed(derive_seed(seed, position))
    dim = influential.shape[0]
    z = torch.randn(dim, generator=gen)
    order = torch.randperm(dim, generator=gen)
    others = order[~influential[order]]
    control = torch.zeros(dim, dtype=torch.bool)
    control[others[: int(influential.sum())]] = True
    return z, control


def noised(h: Tensor, where: Tensor, noise: Tensor, mode: Mode) -> Tensor:
    """``h`` with ``noise`` replacing (``replace``) or added to (``add``) the entries ``where``."""
    if mode == "replace":
        return torch.where(where, noise, h)
    if mode == "add":
        return h + where * noise
    raise UserError(f"unknown noise mode '{mode}'", "use replace or add")


@torch.no_grad()
def essential_features(
    model: nn.Module,
    dataset: Dataset,
    indices: ClassIndices,
    *,
    sigmas: Sequence[float] = (1.0,),
    mode: Mode = "replace",
    seed: int = 0,
    normalizer: Any = None,
    device: torch.device | str = "cpu",
    batch_size: int = 128,
    limit: int | None = None,
    progress: bool = False,
) -> EssentialResult:
    """Count the images still classified correctly under noise (see the module docstring).

    ``dataset`` yields ``(image, label)``; ``normalizer`` (e.g. :class:`narrows.training.
    Normalizer`) maps a batch of images to the model's inputs. ``limit`` keeps the first images
    only. ``indices`` must fit the model's classes and channels, and each class must leave at
    least as many other channels as it has ids (for the random control).
    """
    from tqdm.auto import tqdm

    if mode not in ("replace", "add"):
        raise UserError(f"unknown noise mode '{mode}'", "use replace or add")
    if not sigmas or any(s < 0 for s in sigmas) or len(set(sigmas)) != len(sigmas):
        raise UserError(f"noise levels must be distinct and >= 0, got {list(sigmas)}",
                        "pass --sigma with distinct values >= 0")
    device = torch.device(device)
    features, linear = split_head(model)
    num_classes, dim = linear.out_features, linear.in_features
    if (indices.num_classes, indices.num_channels) != (num_classes, dim):
        raise UserError(f"the indices are for {indices.num_classes} classes and "
                        f"{indices.num_channels} channels, but the model has {num_classes} and "
                        f"{dim}", "use indices extracted from this model")
    mask = indices.mask()
    too_many = [c for c in range(num_classes) if 2 * int(mask[c].sum()) > dim]
    if too_many:
        raise UserError(f"class {too_many[0]} has {int(mask[too_many[0]].sum())} of {dim} "
                        "channels: the random control needs as many other channels",
                        f"use at most {dim // 2} ids per class (--k)")
    model.eval().to(device)
    count = len(dataset) if limit is None else min(limit, len(dataset))  # type: ignore[arg-type]
    loader = DataLoader(Subset(dataset, range(count)), batch_size=batch_size, shuffle=False)
    levels = torch.tensor([float(s) for s in sigmas], dtype=torch.float32, device=device)
    counts = torch.zeros(len(sigmas), num_classes, len(CONDITIONS), dtype=torch.long)
    clean = torch.zeros(num_classes, dtype=torch.long)
    images = torch.zeros(num_classes, dtype=torch.long)
    start = 0
    for batch, labels in tqdm(loader, desc="essential", leave=False,
                              disable=None if progress else True):
        labels = labels.long()
        bad = labels[(labels < 0) | (labels >= num_classes)]
        if bad.numel():
            raise UserError(f"label {int(bad[0])} is outside the model's {num_classes} classes",
                            "use the data set the model was trained on")
        x = batch.to(device)
        h = features(normalizer(x) if normalizer is not None else x)
        inf = mask[labels]
        draws = [noise_draw(seed, start + j, inf[j]) for j in range(len(labels))]
        z = torch.stack([d[0] for d in draws]).to(device)
        where = {"inf": inf.to(device), "noninf": (~inf).to(device),
                 "random": torch.stack([d[1] for d in draws]).to(device)}
        on = labels.to(device)
        clean.index_add_(0, labels, (linear(h).argmax(1) == on).long().cpu())
        images.index_add_(0, labels, torch.ones_like(labels))
        for lv in range(len(sigmas)):
            noise = levels[lv] * z
            for i, cond in enumerate(CONDITIONS):
                hit = (linear(noised(h, where[cond], noise, mode)).argmax(1) == on).long().cpu()
                counts[lv, :, i].index_add_(0, labels, hit)
        start += len(labels)
    meta = {"seed": int(seed), "k": indices.k, "images": int(count),
            "indices": {k: v for k, v in indices.meta.items() if k in ("source", "k", "order")}}
    return EssentialResult([float(s) for s in sigmas], mode, counts.numpy(), clean.numpy(),
                           images.numpy(), meta)


def essential_markdown(results: Mapping[str, EssentialResult]) -> str:
    """The Markdown table of ``essential.md``: images still classified correctly per named
    result, σ and condition (counts and percentages)."""
    from narrows.decompose.tables import markdown

    columns = ["model", "σ", "images", "clean", "noise at I_c", "noise at the others",
               "noise at |I_c| random others"]
    rows = []
    for name, result in results.items():
        for row in result.to_rows(per_class=False):
            n = row["images"]
            rows.append([name, f"{row['sigma']:g}", str(n)] + [
                f"{row[key]} ({100 * row[key] / n:.1f} %)" if n else str(row[key])
                for key in ("clean", "noise_at_inf", "noise_at_noninf", "noise_at_random")])
    mode = next(iter(results.values())).mode
    return (f"Images still classified correctly ({mode} noise on the pooled features, "
            "scored by the full linear layer):\n\n" + markdown(columns, rows))
