"""Sensitivity-n: does the attribution of a tile set predict the output drop when it is removed?

The image is cut into ``tile × tile`` tiles (``tile = 1``: single pixels) as for degradation.
For each ``n`` and each of ``n_sets`` random tile subsets ``T`` of size ``n``:

* ``x_T`` is the input with the pixels of ``T`` replaced by the baseline (default 0 in the model's
  input space, i.e. the data set's mean colour after normalisation, as upstream);
* ``Δ = f_y(x) − f_y(x_T)`` with pre-softmax logits by default;
* ``A_T`` is the sum of the heatmap over the pixels of ``T``.

The subsets are drawn from a generator re-seeded with ``seed`` for every ``n``, so every image uses
the same subsets (as upstream). The correlation of ``(A_T, Δ)`` is reported two ways: ``pooled``
(Pearson over all images × sets, upstream's and the default) and ``per_image`` (mean of per-image
Pearson correlations, as Ancona et al.; images with a constant ``A`` or ``Δ`` are left out).

The default ``ns`` are ``round(exp(linspace(ln 1, ln(0.8·N), 16)))`` with duplicates removed (for
small ``N`` the log-spaced values repeat).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Literal

import torch
from torch import Tensor, nn

from narrows.attribution.metrics.degradation import (
    Baseline,
    Output,
    check_inputs,
    class_scores,
    resolve_baseline,
    tile_grid,
    tile_reduce,
)
from narrows.attribution.result_files import SavedAsTorch
from narrows.errors import UserError

Aggregate = Literal["pooled", "per_image"]
FORMAT_KIND = "sensitivity_n"  # saved files: "format": narrows.sensitivity_n/1


def default_ns(n_tiles: int, count: int = 16, max_fraction: float = 0.8) -> list[int]:
    """Log-spaced subset sizes from 1 to ``max_fraction·N`` (unique, ascending)."""
    top = max(max_fraction * n_tiles, 1.0)
    values = torch.exp(torch.linspace(0.0, float(torch.log(torch.tensor(top))), count))
    return sorted({max(int(v), 1) for v in torch.round(values).tolist()})


def pearson(a: Tensor, b: Tensor, dim: int = -1) -> Tensor:
    """Pearson correlation along ``dim``; NaN where either input is constant."""
    a = a.double() - a.double().mean(dim=dim, keepdim=True)
    b = b.double() - b.double().mean(dim=dim, keepdim=True)
    denominator = (a.square().sum(dim=dim) * b.square().sum(dim=dim)).sqrt()
    denominator = torch.where(denominator > 0, denominator, torch.nan)
    return (a * b).sum(dim=dim) / denominator


@dataclass
class SensitivityNResult(SavedAsTorch):
    """``attributions`` and ``deltas`` are ``len(ns)×N×n_sets``; correlations are per ``n``."""

    FORMAT_KIND = FORMAT_KIND
    WHAT = "sensitivity-n result file"
    FIX = "delete it and compute sensitivity-n again"
    OPTIONS = ("tile", "n_sets", "aggregate", "output")

    ns: list[int]
    tile: int
    n_tiles: int
    n_sets: int
    attributions: Tensor
    deltas: Tensor
    pooled: Tensor
    per_image: Tensor
    aggregate: str
    output: str
    seed: int

    @property
    def correlation(self) -> Tensor:
        """The correlation per ``n`` under the chosen aggregation."""
        return self.pooled if self.aggregate == "pooled" else self.per_image

    def to_rows(self) -> list[dict[str, Any]]:
        """One row per ``n`` for CSV/Markdown tables."""
        return [
            {
                "metric": "sensitivity-n",
                "tile": self.tile,
                "n": n,
                "fraction": n / self.n_tiles,
                "pooled": float(self.pooled[i]),
                "per_image": float(self.per_image[i]),
                "n_sets": self.n_sets,
                "n_images": int(self.deltas.shape[1]),
                "output": self.output,
                "seed": self.seed,
            }
            for i, n in enumerate(self.ns)
        ]

    def summary(self) -> str:
        """One line: the mean correlation over the ``n`` values, both aggregations."""
        from narrows.attribution.report import nanmean

        return (f"sensitivity-n (tiles {self.tile}×{self.tile}, {len(self.ns)} n from "
                f"{min(self.ns)} to {max(self.ns)}, {self.n_sets} sets, "
                f"{int(self.deltas.shape[1])} images): mean correlation pooled "
                f"{nanmean(self.pooled):.3f}, per image {nanmean(self.per_image):.3f}")

    def plot(self, ax: Any = None, label: str = "") -> Any:
        """Correlation against ``n`` on a log axis; returns ``(fig, ax)``."""
        if ax is None:
            from narrows.plotting import pyplot

            _, ax = pyplot().subplots(figsize=(5, 3.5))
        ax.plot(self.ns, self.correlation.numpy(), marker="o", label=label or self.aggregate)
        ax.set_xscale("log")
        ax.set_xlabel(f"n (tiles of {self.tile}×{self.tile})")
        ax.set_ylabel("Pearson correlation")
        ax.legend()
        return ax.figure, ax


def subset_masks(n_tiles: int, n: int, n_sets: int, seed: int) -> Tensor:
    """``n_sets×T`` bool masks of random size-``n`` tile subsets from a freshly seeded generator."""
    gen = torch.Generator().manual_seed(seed)
    chosen = torch.rand(n_sets, n_tiles, generator=gen).argsort(dim=1)[:, :n]
    return torch.zeros(n_sets, n_tiles, dtype=torch.bool).scatter_(1, chosen, True)


def _deltas(
    model: nn.Module,
    images: Tensor,
    base: Tensor,
    pixel_sets: Tensor,
    targets: Tensor,
    clean: Tensor,
    output: Output,
    batch_size: int,
) -> Tensor:
    """``N×S`` output drops for the ``S×HW`` pixel masks, in chunks of ``batch_size`` inputs."""
    n, n_sets = images.shape[0], pixel_sets.shape[0]
    jobs = torch.cartesian_prod(torch.arange(n), torch.arange(n_sets)).view(-1, 2)
    out = []
    for chunk in jobs.split(batch_size):
        image, subset = chunk[:, 0], chunk[:, 1]
        removed = pixel_sets[subset].view(-1, 1, *images.shape[2:])
        inputs = torch.where(removed, base[image], images[image])
        out.append(clean[image] - class_scores(model, inputs, targets[image], output).cpu())
    return torch.cat(out).view(n, n_sets)


def sensitivity_n(
    model: nn.Module,
    images: Tensor,
    heatmaps: Tensor,
    targets: Tensor,
    *,
    tile: int = 1,
    ns: Sequence[int] | None = None,
    n_sets: int = 100,
    baseline: Baseline = 0.0,
    output: Output = "logit",
    aggregate: Aggregate = "pooled",
    batch_size: int = 64,
    seed: int = 0,
    normalizer: Any = None,
) -> SensitivityNResult:
    """The :class:`SensitivityNResult` of ``heatmaps`` (``N×H×W``) for ``model`` on ``images``
    (``N×C×H×W``) and ``targets``: for each ``n`` of ``ns`` (default :func:`default_ns`),
    ``n_sets`` random sets of ``n`` tiles (``tile×tile`` pixels) set to ``baseline``.

    With ``normalizer`` (a :class:`~narrows.training.Normalizer`, callable or ``Subject``)
    ``images`` are [0, 1] images, normalised first; without it they are model inputs.
    ``output`` is ``"logit"`` or ``"softmax"``, ``aggregate`` the reported correlation.
    Runs ``N·n_sets`` perturbed forwards per ``n`` in chunks of ``batch_size``.
    """
    from narrows.attribution.inputs import as_normalizer, model_inputs

    images = model_inputs(images, as_normalizer(normalizer))
    check_inputs(images, heatmaps, targets)
    if aggregate not in ("pooled", "per_image"):
        raise UserError(f"unknown aggregate {aggregate!r}", "use 'pooled' or 'per_image'")
    if batch_size < 1 or n_sets < 1:
        raise UserError("batch_size and n_sets must be positive", "pass values >= 1")
    _, _, h, w = images.shape
    grid = tile_grid(h, w, tile)
    n_tiles = int(grid.max()) + 1
    ns = list(ns) if ns is not None else default_ns(n_tiles)
    if not ns or min(ns) < 1 or max(ns) > n_tiles:
        raise UserError(f"every n must be in 1…{n_tiles} (the number of tiles), got {ns}",
                        "choose n within the tiles, or use a smaller tile size")
    targets = targets.long()
    base = resolve_baseline(images, baseline)
    tile_sums = tile_reduce(heatmaps.detach().cpu(), grid, "sum")  # N×T
    clean = torch.cat(
        [
            class_scores(model, x, t, output).cpu()
            for x, t in zip(images.split(batch_size), targets.split(batch_size), strict=True)
        ]
    )
    attributions, deltas = [], []
    for n in ns:
        sets = subset_masks(n_tiles, n, n_sets, seed)
        attributions.append(tile_sums @ sets.double().T)
        pixel_sets = sets[:, grid.reshape(-1)].to(images.device)
        deltas.append(_deltas(model, images, base, pixel_sets, targets, clean, output, batch_size))
    a, d = torch.stack(attributions), torch.stack(deltas)
    return SensitivityNResult(
        ns=ns,
        tile=tile,
        n_tiles=n_tiles,
        n_sets=n_sets,
        attributions=a,
        deltas=d,
        pooled=pearson(a.flatten(1), d.flatten(1)),
        per_image=pearson(a, d).nanmean(dim=1),
        aggregate=aggregate,
        output=output,
        seed=seed,
    )
