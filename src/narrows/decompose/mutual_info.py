"""Mutual-information scores of class index sets (upstream ``mutual_info.py``) and CSG's MIS.

**Pairwise MI of index sets.** Each class ``c`` becomes the indicator ``a_c ∈ {0,1}^D``
(``a_c[j] = 1`` iff channel ``j`` is one of the class's ids). The MI of two classes is the
plug-in MI, in nats, of the 2×2 contingency table of ``(a_p[j], a_q[j])`` over the ``D``
positions (what ``sklearn.metrics.mutual_info_score`` computes); here it is computed in closed
form from the overlap ``|I_p ∩ I_q|`` and the two sizes, for all pairs at once.

* ``upstream``: the mean over **all** ordered pairs ``(p, q)``, the diagonal included, as the
  original script does. Kept for parity with its published numbers.
* ``no_diagonal`` (the corrected score): the mean over ``p ≠ q``. The diagonal term of a class
  is its own entropy ``H(k/D)``, a constant of ``k`` and ``D`` that says nothing about how
  classes share channels, yet it makes up most of the upstream score (0.0274 of ≈ 0.035 at
  k = 5, D = 64), so that score mostly measures ``k``.
* ``jaccard``: the mean over ``p ≠ q`` of ``|I_p ∩ I_q| / |I_p ∪ I_q|``. MI measures
  *dependence*, not overlap, and is not monotone in it: two disjoint sets are dependent (one
  being on predicts the other off) and score higher than two sets sharing one channel. The
  overlap itself is what "less shared, better decomposed" means, so it is reported beside MI.
* ``union``: how many distinct channels the classes use together.

Lower scores mean less sharing, which upstream reads as a better decomposition.

**MIS** (Liang et al.): ``M[c, j] = I(h_j ; 1[y = c])`` by scikit-learn's kNN estimator
(``mutual_info_classif``, 3 neighbours, ``random_state=0``) on the pooled features of test
images, and ``MIS = mean_j max_c M[c, j]``; higher means more class-specific channels.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from narrows.decompose.indices import ClassIndices
from narrows.errors import UserError

SCORES = ("upstream", "no_diagonal", "jaccard", "union")
LABELS = {"upstream": "MI (with diagonal, upstream)", "no_diagonal": "MI (no diagonal)",
          "jaccard": "Jaccard overlap", "union": "union size"}


def pairwise_mi(mask: Tensor) -> Tensor:
    """``(C, C)`` float64: the plug-in MI (nats) between the rows of a boolean ``(C, D)`` mask."""
    if mask.ndim != 2 or mask.shape[1] < 1:
        raise ValueError(f"expected a (classes, channels) mask, got shape {tuple(mask.shape)}")
    a = mask.to(torch.float64)
    n = float(a.shape[1])
    both = a @ a.T
    size = a.sum(dim=1)
    ka, kb = size[:, None], size[None, :]
    cells = (  # (joint count, row marginal, column marginal) of the 4 cells of the 2×2 table
        (both, ka, kb),
        (ka - both, ka, n - kb),
        (kb - both, n - ka, kb),
        (n - ka - kb + both, n - ka, n - kb),
    )
    total = torch.zeros_like(both)
    for joint, row, col in cells:
        safe = joint > 0
        ratio = torch.where(safe, n * joint / (row * col).clamp_min(1e-300), torch.ones_like(joint))
        total = total + torch.where(safe, joint / n * torch.log(ratio), torch.zeros_like(joint))
    return total.clamp_min(0.0)


def overlap_scores(indices: ClassIndices, k: int | None = None) -> dict[str, float]:
    """The scores of the module docstring for ``indices`` (its first ``k`` ids per class)."""
    mask = indices.mask(k)
    mi = pairwise_mi(mask)
    classes = mask.shape[0]
    off = ~torch.eye(classes, dtype=torch.bool)
    a = mask.to(torch.float64)
    both = a @ a.T
    size = a.sum(dim=1)
    union = size[:, None] + size[None, :] - both
    jaccard = both / union.clamp_min(1.0)
    pairs = classes > 1
    return {
        "upstream": float(mi.mean()),
        "no_diagonal": float(mi[off].mean()) if pairs else math.nan,
        "jaccard": float(jaccard[off].mean()) if pairs else math.nan,
        "union": float(mask.any(dim=0).sum()),
    }


def random_scores(num_classes: int, num_channels: int, k: int, draws: int = 10,
                  seed: int = 0) -> dict[str, float]:
    """The scores averaged over ``draws`` random index sets (``k`` ids per class), seeded."""
    if draws < 1:
        raise UserError(f"random draws must be at least 1, got {draws}", "pass --random-draws 1+")
    rows = [overlap_scores(ClassIndices.random(num_classes, num_channels, k, seed=seed + d))
            for d in range(draws)]
    return {name: float(np.mean([r[name] for r in rows])) for name in SCORES}


Source = Callable[[int], ClassIndices]


@dataclass
class MITable:
    """Scores per ``k`` (rows) and per source (``ours``, ``csg``, ``random``, ...)."""

    ks: list[int]
    scores: dict[str, dict[int, dict[str, float]]] = field(default_factory=dict)
    meta: dict[str, Any] = field(default_factory=dict)

    def to_rows(self) -> list[dict[str, Any]]:
        """One row per ``(k, source)``: ``k, source, upstream, no_diagonal, jaccard, union``."""
        return [{"k": k, "source": source, **by_k[k]}
                for k in self.ks for source, by_k in self.scores.items() if k in by_k]

    def to_markdown(self, score: str = "upstream") -> str:
        """A ``k × source`` table of one score (the upstream script's table shape)."""
        sources = list(self.scores)
        lines = [f"| k | {' | '.join(sources)} |", "|---|" + "---|" * len(sources)]
        for k in self.ks:
            cells = [_cell(self.scores[s].get(k, {}).get(score), score) for s in sources]
            lines.append(f"| {k} | {' | '.join(cells)} |")
        return "\n".join(lines) + "\n"

    def to_json(self) -> dict[str, Any]:
        return {"ks": self.ks, "meta": self.meta,
                "scores": {s: {str(k): v for k, v in by_k.items()}
                           for s, by_k in self.scores.items()}}

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> MITable:
        """The table of a :meth:`to_json` document (its header, if any, ignored)."""
        return cls([int(k) for k in data["ks"]],
                   {s: {int(k): dict(v) for k, v in by_k.items()}
                    for s, by_k in data["scores"].items()},
                   dict(data.get("meta", {})))

    def save(self, path: str | Path) -> Path:
        """The JSON of :meth:`to_json` after the header, atomically."""
        from narrows.decompose.saving import decompose_header
        from narrows.runs.files import atomic_write_json

        return atomic_write_json(path, {**decompose_header("mi_table", self.meta),
                                        **self.to_json()})

    @classmethod
    def load(cls, path: str | Path) -> MITable:
        """Read what :meth:`save` wrote (a ``mutual_info.json`` reads too)."""
        from narrows.runs.files import read_json_file, reading
        from narrows.runs.results import check_header

        fix = "run 'narrows decompose mutual-info' again"
        data = read_json_file(path, "mutual-information table", fix,
                              required_keys=("ks", "scores"))
        if data.get("format") != "narrows.decompose.mutual_info/1":
            check_header(data, "decompose.mi_table", 1, str(path))
        with reading(path, "mutual-information table", fix):
            return cls.from_json(data)

    def summary(self) -> str:
        """One line: the corrected MI (no diagonal) of each source at the first k."""
        if not self.ks:
            return "no k scored"
        k = self.ks[0]
        parts = [f"{s} {_cell(by_k[k].get('no_diagonal'), 'no_diagonal') or 'n/a'}"
                 for s, by_k in self.scores.items() if k in by_k]
        return f"MI without diagonal at k = {k}: " + (", ".join(parts) or "no source")

    def plot(self, score: str = "upstream", ax: Any = None):
        """``score`` against ``k``, one line per source; returns ``(fig, ax)``."""
        from narrows.plotting import axes

        fig, ax = axes(ax, (5, 3.6))
        for source, by_k in self.scores.items():
            ks = [k for k in self.ks if k in by_k]
            ax.plot(ks, [by_k[k][score] for k in ks], marker="o", label=source)
        ax.set_xlabel("k (ids per class)")
        ax.set_ylabel(LABELS.get(score, score) + (" (nats)" if score != "jaccard" else ""))
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
        fig.tight_layout()
        return fig, ax


def _cell(value: float | None, score: str) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return ""
    if score == "union":
        return f"{value:.0f}"
    return f"{value:.4f}" if score == "jaccard" else f"{value:.7f}"


def mi_table(sources: Mapping[str, Source], ks: Sequence[int], *, random_draws: int = 0,
             num_classes: int | None = None, num_channels: int | None = None,
             seed: int = 0) -> MITable:
    """Score each source's index sets at each ``k``; ``random_draws > 0`` adds a ``random``
    column (the mean over that many seeded random sets of the same ``C``, ``D`` and ``k``)."""
    table = MITable(list(ks), meta={"random_draws": random_draws, "seed": seed})
    for name, source in sources.items():
        table.scores[name] = {}
        for k in ks:
            chosen = source(k)
            table.scores[name][k] = overlap_scores(chosen)
            num_classes, num_channels = chosen.num_classes, chosen.num_channels
    if random_draws > 0:
        if num_classes is None or num_channels is None:
            raise ValueError("random scores need num_classes and num_channels")
        table.scores["random"] = {k: random_scores(num_classes, num_channels, k, random_draws,
                                                   seed) for k in ks if k <= num_channels}
    return table


# -- MIS ---------------------------------------------------------------------------------------

@dataclass
class MISResult:
    """``matrix[c, j]``: MI (nats) of channel ``j`` with "class is c"; ``score`` = MIS."""

    matrix: np.ndarray
    score: float
    images: int
    meta: dict[str, Any] = field(default_factory=dict)

    def to_rows(self) -> list[dict[str, Any]]:
        """One row per class and channel: ``class``, ``channel``, ``mi`` (nats)."""
        return [{"class": c, "channel": j, "mi": float(v)}
                for c, row in enumerate(self.matrix.tolist()) for j, v in enumerate(row)]

    def summary(self) -> str:
        """One line: MIS, images, classes and channels."""
        classes, channels = self.matrix.shape
        return (f"MIS {self.score:.4f} on {self.images} images "
                f"({classes} classes × {channels} channels)")

    def to_json(self) -> dict[str, Any]:
        return {"mis": self.score, "images": self.images, "matrix": self.matrix.tolist(),
                "meta": self.meta}

    def save(self, path: str | Path) -> Path:
        """The JSON of :meth:`to_json` after the header, atomically (the shape of the
        ``mis_<name>.json`` files of ``narrows decompose mutual-info``)."""
        from narrows.decompose.saving import decompose_header
        from narrows.runs.files import atomic_write_json

        return atomic_write_json(path, {**decompose_header("mis", self.meta), **self.to_json()})

    @classmethod
    def load(cls, path: str | Path) -> MISResult:
        """Read what :meth:`save` wrote, or a ``mis_<name>.json`` file."""
        from narrows.runs.files import read_json_file, reading
        from narrows.runs.results import check_header

        fix = "run 'narrows decompose mutual-info --mis' again"
        data = read_json_file(path, "MIS file", fix, required_keys=("mis", "images", "matrix"))
        check_header(data, "decompose.mis", 1, str(path))
        with reading(path, "MIS file", fix):
            matrix = np.asarray(data["matrix"], dtype=np.float64)
            if matrix.ndim != 2:
                raise ValueError(f"the matrix has shape {matrix.shape}, not (classes, channels)")
            return cls(matrix, float(data["mis"]), int(data["images"]),
                       dict(data.get("meta", {})))

    def plot(self, ax: Any = None) -> tuple[Any, Any]:
        """Heat map of ``matrix`` (class × channel); returns ``(fig, ax)``."""
        from narrows.plotting import pyplot

        plt = pyplot()
        classes, channels = self.matrix.shape
        if ax is None:
            fig, ax = plt.subplots(figsize=(min(2 + channels * 0.14, 16), 1.2 + classes * 0.32))
        else:
            fig = ax.figure
        image = ax.imshow(self.matrix, aspect="auto", cmap="viridis", interpolation="nearest")
        ax.set_xlabel("channel")
        ax.set_ylabel("class")
        ax.set_title(f"I(h_j ; y = c) in nats; {self.summary()}", fontsize=9)
        fig.colorbar(image, ax=ax, fraction=0.03, pad=0.01)
        fig.tight_layout()
        return fig, ax


def mis(features: Tensor | np.ndarray, labels: Tensor | np.ndarray, num_classes: int | None = None,
        n_neighbors: int = 3, random_state: int = 0) -> MISResult:
    """MIS of ``features`` ``(N, D)`` with class ``labels`` ``(N,)`` (module docstring)."""
    from sklearn.feature_selection import mutual_info_classif

    x = np.asarray(features.detach().cpu() if isinstance(features, Tensor) else features,
                   dtype=np.float64)
    y = np.asarray(labels.detach().cpu() if isinstance(labels, Tensor) else labels).astype(int)
    if x.ndim != 2 or y.shape != (x.shape[0],):
        raise ValueError(f"features (N, D) and labels (N,) expected, got {x.shape}, {y.shape}")
    if x.shape[0] <= n_neighbors:
        raise UserError(f"MIS needs more than {n_neighbors} images, got {x.shape[0]}",
                        "use more test images")
    classes = int(num_classes if num_classes is not None else y.max() + 1)
    matrix = np.stack([
        mutual_info_classif(x, (y == c).astype(int), discrete_features=False,
                            n_neighbors=n_neighbors, random_state=random_state)
        for c in range(classes)
    ])
    return MISResult(matrix, float(matrix.max(axis=0).mean()), int(x.shape[0]))


@torch.no_grad()
def pooled_features(model: torch.nn.Module, dataset: Any, *, normalizer: Any = None,
                    device: torch.device | str = "cpu", batch_size: int = 128,
                    limit: int | None = None, progress: bool = False) -> tuple[Tensor, Tensor]:
    """``(h, labels)``: the pooled pre-head features ``(N, D)`` (CPU, float32) of the first
    ``limit`` images of ``dataset`` in ``eval()`` mode, and their labels."""
    from torch.utils.data import DataLoader, Subset
    from tqdm.auto import tqdm

    from narrows.models.heads import pooled_features as features_of

    features = features_of(model)
    model.eval().to(device)
    count = len(dataset) if limit is None else min(limit, len(dataset))
    loader = DataLoader(Subset(dataset, range(count)), batch_size=batch_size, shuffle=False)
    out, labels = [], []
    for x, y in tqdm(loader, desc="features", leave=False, disable=None if progress else True):
        x = x.to(device)
        out.append(features(normalizer(x) if normalizer is not None else x).float().cpu())
        labels.append(torch.as_tensor(y).long())
    if not out:
        raise UserError("no images to compute features on", "use a split with images")
    return torch.cat(out), torch.cat(labels)
