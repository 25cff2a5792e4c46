"""Degradation (MoRF / LeRF) of a model's output as heatmap tiles are replaced by a baseline.

The image is cut into a grid of ``tile × tile`` tiles (when the size is not divisible by the tile,
the last row and column absorb the remainder). Each tile is scored by the mean (or sum) of the
heatmap inside it. MoRF replaces tiles from the most to the least relevant, LeRF from the least
to the most, and the model's score of one class is recorded along the way.

Fixes of the upstream evaluation code (``eval_degradation.py`` of the IBA paper code):

* **Off-by-one steps.** Upstream evaluates the clean image and then ``1 + round(j·N/99)`` removed
  tiles for ``j = 0…98``, so the first step skips a tile and the fully replaced image is never
  evaluated. Here point ``j`` of ``P`` (default 100) removes ``k_j = round(j·N/(P−1))`` tiles for
  ``j = 0…P−1``: ``k_0 = 0`` (the clean image) and ``k_{P−1} = N`` (every tile replaced). The
  rounding is half-up, done in integers, so it is the same on every platform.
* **Arbitrary ties.** Upstream sorts with numpy's non-stable argsort. Here tiles are first
  shuffled with a seeded generator and then stably sorted, so equal scores are ordered at random
  but reproducibly (the seed is stored in the result).
* **Broken ``percentage`` field.** Upstream returns it as ``[0]``; the result here stores the
  number of removed tiles of every point (``steps``) and its fraction (``fractions``).

Normalisation (the paper's, unreleased upstream): each curve is rescaled per image to
``(s − b) / (t₁ − b)`` with ``t₁`` the score of the clean image and ``b`` the score of the fully
replaced image, for the class being tracked (for the default top-1 class, ``t₁`` is the top-1
probability as in the paper). Both curves share these endpoints, so both run from 1 to 0. Images
where ``|t₁ − b| < 1e-8`` cannot be normalised: their normalised curves are NaN and they are left
out of the means (``n_degenerate`` counts them). When the fully replaced image scores *above* the
clean one (``b > t₁``) the normalisation flips the sign of that image's score. The score is the
mean over the ``P`` points of ``LeRF' − MoRF'``, averaged over images: higher is better and a
random heatmap gives ≈ 0.

The baseline defaults to the per-channel mean colour of each image in the model's input space
(upstream's ``Mean`` baseline).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

import torch
from torch import Tensor, nn

from narrows.attribution.result_files import SavedAsTorch
from narrows.errors import UserError

Output = Literal["softmax", "logit"]
Baseline = str | float | Tensor
DEGENERATE_EPS = 1e-8
FORMAT_KIND = "degradation"  # saved files: "format": narrows.degradation/1


# --- shared helpers (also used by sensitivity-n) ------------------------------------------------


def tile_grid(height: int, width: int, tile: int) -> Tensor:
    """An ``H×W`` long tensor of row-major tile ids; the last row/column absorb any remainder."""
    if tile < 1:
        raise UserError(f"tile size must be a positive integer, got {tile}", "use e.g. 8 or 14")
    rows, cols = max(height // tile, 1), max(width // tile, 1)
    row = (torch.arange(height) // tile).clamp_(max=rows - 1)
    col = (torch.arange(width) // tile).clamp_(max=cols - 1)
    return row[:, None] * cols + col[None, :]


def tile_reduce(heatmaps: Tensor, grid: Tensor, reduce: Literal["mean", "sum"] = "mean") -> Tensor:
    """Per-tile mean or sum of ``N×H×W`` heatmaps: an ``N×T`` tensor (float64)."""
    n_tiles = int(grid.max()) + 1
    flat = heatmaps.reshape(heatmaps.shape[0], -1).double()
    index = grid.reshape(1, -1).to(flat.device).expand_as(flat)
    sums = torch.zeros(flat.shape[0], n_tiles, dtype=flat.dtype, device=flat.device)
    sums.scatter_add_(1, index, flat)
    if reduce == "sum":
        return sums
    if reduce != "mean":
        raise UserError(f"unknown tile reduction {reduce!r}", "use 'mean' or 'sum'")
    counts = torch.bincount(grid.reshape(-1), minlength=n_tiles).to(sums)
    return sums / counts


def resolve_baseline(images: Tensor, baseline: Baseline) -> Tensor:
    """The ``N×C×H×W`` replacement image: ``"mean"`` (per-image channel mean), a number, or a
    tensor of shape ``C``, ``C×H×W`` or ``N×C×H×W`` in the model's input space."""
    if isinstance(baseline, str):
        if baseline != "mean":
            raise UserError(f"unknown baseline {baseline!r}", "use 'mean', a number or a tensor")
        return images.mean(dim=(2, 3), keepdim=True).expand_as(images)
    if not isinstance(baseline, Tensor):
        return torch.full_like(images, float(baseline))
    base = baseline.to(images)
    if base.ndim == 1:
        base = base.view(1, -1, 1, 1)
    try:
        return base.expand_as(images)
    except RuntimeError as exc:
        raise UserError(
            f"baseline of shape {tuple(baseline.shape)} does not fit images {tuple(images.shape)}",
            "give C, C×H×W or N×C×H×W values",
        ) from exc


def check_inputs(images: Tensor, heatmaps: Tensor, targets: Tensor | None) -> None:
    """Raise :class:`UserError` when shapes do not match."""
    if images.ndim != 4:
        raise UserError(f"images must be N×C×H×W, got shape {tuple(images.shape)}",
                        "pass a batch of images (add a batch dimension to a single image)")
    n, _, h, w = images.shape
    if tuple(heatmaps.shape) != (n, h, w):
        raise UserError(
            f"heatmaps must be N×H×W = {(n, h, w)}, got {tuple(heatmaps.shape)}",
            "sum attribution maps over channels first",
        )
    if targets is not None and tuple(targets.shape) != (n,):
        raise UserError(f"targets must have shape ({n},), got {tuple(targets.shape)}",
                        "pass one class index per image")


@torch.no_grad()
def class_scores(model: nn.Module, inputs: Tensor, classes: Tensor, output: Output) -> Tensor:
    """The model's softmax probability or logit of ``classes[i]`` for each input (float64)."""
    logits = model(inputs)
    if output == "softmax":
        logits = logits.double().softmax(dim=-1)
    elif output != "logit":
        raise UserError(f"unknown output {output!r}", "use 'softmax' or 'logit'")
    return logits.gather(1, classes.view(-1, 1).to(logits.device)).squeeze(1).double()


def shuffled_stable_order(scores: Tensor, descending: bool, generator: torch.Generator) -> Tensor:
    """Row-wise argsort of ``N×T`` scores with ties broken by a seeded random shuffle."""
    perm = torch.rand(scores.shape, generator=generator).argsort(dim=1).to(scores.device)
    keys = scores.gather(1, perm)
    idx = torch.argsort(-keys if descending else keys, dim=1, stable=True)
    return perm.gather(1, idx)


def removal_steps(n_tiles: int, n_points: int) -> Tensor:
    """``k_j = round(j·N/(P−1))`` (half-up) for ``j = 0…P−1``: from 0 to ``N`` inclusive."""
    if n_points < 2:
        raise UserError(f"n_points must be at least 2, got {n_points}",
                        "a curve needs its two ends: pass n_points >= 2 (--points)")
    j = torch.arange(n_points, dtype=torch.long)
    return (2 * j * n_tiles + (n_points - 1)) // (2 * (n_points - 1))


# --- result -------------------------------------------------------------------------------------


@dataclass
class DegradationResult(SavedAsTorch):
    """Per-image MoRF/LeRF curves (``N×P`` float64 on the CPU, raw and normalised), the number of
    removed tiles at each point (``steps``) and per-image scores (NaN where degenerate)."""

    FORMAT_KIND = FORMAT_KIND
    WHAT = "degradation result file"
    FIX = "delete it and compute the degradation again"

    tile: int
    n_tiles: int
    steps: Tensor
    targets: Tensor
    morf: Tensor
    lerf: Tensor
    morf_normalised: Tensor
    lerf_normalised: Tensor
    scores: Tensor
    output: str
    seed: int

    @property
    def fractions(self) -> Tensor:
        """Fraction of tiles removed at each point."""
        return self.steps.double() / self.n_tiles

    @property
    def valid(self) -> Tensor:
        """Images whose curves could be normalised."""
        return ~torch.isnan(self.scores)

    @property
    def n_degenerate(self) -> int:
        return int((~self.valid).sum())

    @property
    def mean_morf(self) -> Tensor:
        """Mean normalised MoRF curve over the valid images."""
        return self.morf_normalised[self.valid].mean(dim=0)

    @property
    def mean_lerf(self) -> Tensor:
        return self.lerf_normalised[self.valid].mean(dim=0)

    @property
    def score(self) -> float:
        """Mean over valid images of ``mean_x(LeRF' − MoRF')``; NaN if none is valid."""
        valid = self.scores[self.valid]
        return float(valid.mean()) if valid.numel() else float("nan")

    @property
    def raw_score(self) -> float:
        """``mean_x(mean LeRF − mean MoRF)`` of the un-normalised curves over all images.

        Upstream's ``GraphDrawer.integrals``: bounded by ±1 for probabilities and not dominated
        by images whose clean and fully replaced scores are close (where the per-image
        normalisation of :attr:`score` divides by a small number).
        """
        return float((self.lerf.mean(dim=0) - self.morf.mean(dim=0)).mean())

    @property
    def median_score(self) -> float:
        """Median over valid images of the per-image normalised score."""
        valid = self.scores[self.valid]
        return float(valid.median()) if valid.numel() else float("nan")

    def to_rows(self) -> list[dict[str, Any]]:
        """One summary row for CSV/Markdown tables."""
        return [
            {
                "metric": "degradation",
                "tile": self.tile,
                "n_tiles": self.n_tiles,
                "output": self.output,
                "n_images": int(self.scores.numel()),
                "n_degenerate": self.n_degenerate,
                "score": self.score,
                "median_score": self.median_score,
                "raw_score": self.raw_score,
                "morf_area": float(self.mean_morf.mean()) if self.valid.any() else float("nan"),
                "lerf_area": float(self.mean_lerf.mean()) if self.valid.any() else float("nan"),
                "seed": self.seed,
            }
        ]

    def summary(self) -> str:
        """One line: the score (normalised, median, raw) and the images used."""
        return (f"degradation {self.tile}×{self.tile} ({self.output}): score {self.score:.3f} "
                f"(median {self.median_score:.3f}, raw {self.raw_score:.3f}) over "
                f"{int(self.scores.numel())} images, {self.n_degenerate} degenerate")

    def header_options(self) -> dict[str, Any]:
        """The options recorded in the header: tile, output and the number of points."""
        return {"tile": self.tile, "output": self.output, "points": int(self.steps.numel())}

    def plot(self, ax: Any = None, label: str = "") -> Any:
        """Mean normalised MoRF and LeRF curves against the fraction of tiles removed; returns
        ``(fig, ax)``."""
        if ax is None:
            from narrows.plotting import pyplot

            _, ax = pyplot().subplots(figsize=(5, 3.5))
        x = self.fractions.numpy()
        prefix = f"{label} " if label else ""
        ax.plot(x, self.mean_morf.numpy(), label=f"{prefix}MoRF")
        ax.plot(x, self.mean_lerf.numpy(), label=f"{prefix}LeRF", linestyle="--")
        ax.set_xlabel("fraction of tiles replaced")
        ax.set_ylabel(f"normalised {self.output}")
        ax.set_title(f"degradation {self.tile}×{self.tile}: score {self.score:.3f}")
        ax.legend()
        return ax.figure, ax


# --- metric -------------------------------------------------------------------------------------


def _perturbed(images: Tensor, base: Tensor, ranks: Tensor, jobs: Tensor, steps: Tensor) -> Tensor:
    """Inputs for jobs ``(image, order, point)``: pixels whose tile rank < k take the baseline."""
    image, order, point = jobs.unbind(dim=1)
    removed = ranks[order, image] < steps[point].view(-1, 1).to(ranks.device)
    removed = removed.view(-1, 1, *images.shape[2:])
    return torch.where(removed, base[image], images[image])


def degradation(
    model: nn.Module,
    images: Tensor,
    heatmaps: Tensor,
    targets: Tensor | None = None,
    *,
    tile: int = 8,
    baseline: Baseline = "mean",
    n_points: int = 100,
    output: Output = "softmax",
    reduce: Literal["mean", "sum"] = "mean",
    batch_size: int = 64,
    seed: int = 0,
    normalizer: Any = None,
) -> DegradationResult:
    """The :class:`DegradationResult` (MoRF/LeRF curves and scores) of ``model`` on ``images``
    (``N×C×H×W``) as the tiles of ``tile×tile`` pixels are replaced by ``baseline`` in the
    order of ``heatmaps`` (``N×H×W``), at ``n_points`` steps.

    With ``normalizer`` (a :class:`~narrows.training.Normalizer`, callable or ``Subject``)
    ``images`` are [0, 1] images, normalised first; without it they are model inputs.
    ``targets`` are the tracked classes (``None``: the top-1 class of each clean image).
    ``output`` is ``"softmax"`` (probability, the paper's) or ``"logit"``; ``reduce`` scores a
    tile by the mean or sum of its heatmap; ``seed`` breaks ties. All ``N·2·P`` perturbed
    inputs are built and run in chunks of ``batch_size``; ``model`` should be in eval mode.
    """
    from narrows.attribution.inputs import as_normalizer, model_inputs

    images = model_inputs(images, as_normalizer(normalizer))
    check_inputs(images, heatmaps, targets)
    if batch_size < 1:
        raise UserError(f"batch_size must be positive, got {batch_size}", "pass batch_size >= 1")
    n, _, h, w = images.shape
    grid = tile_grid(h, w, tile)
    n_tiles = int(grid.max()) + 1
    if targets is None:
        with torch.no_grad():
            targets = torch.cat([model(x).argmax(dim=1) for x in images.split(batch_size)])
    targets = targets.long()
    generator = torch.Generator().manual_seed(seed)
    tile_scores = tile_reduce(heatmaps, grid, reduce)
    orders = [shuffled_stable_order(tile_scores, d, generator) for d in (True, False)]
    ranks = torch.stack([_tile_ranks(order) for order in orders])  # 2×N×T
    ranks = ranks[:, :, grid.reshape(-1).to(ranks.device)].to(images.device)  # 2×N×HW
    steps = removal_steps(n_tiles, n_points)
    base = resolve_baseline(images, baseline)
    jobs = torch.cartesian_prod(torch.arange(n), torch.arange(2), torch.arange(n_points))
    curves = (
        torch.cat(
            [
                class_scores(
                    model,
                    _perturbed(images, base, ranks, chunk, steps),
                    targets[chunk[:, 0]],
                    output,
                )
                for chunk in jobs.split(batch_size)
            ]
        )
        .view(n, 2, n_points)
        .cpu()
    )
    return _result(curves, steps, targets, tile, n_tiles, output, seed)


def _tile_ranks(order: Tensor) -> Tensor:
    """Inverse permutation: the position of every tile in ``order`` (``N×T``)."""
    ranks = torch.empty_like(order)
    positions = torch.arange(order.shape[1], device=order.device).expand_as(order)
    return ranks.scatter_(1, order, positions)


def _result(
    curves: Tensor, steps: Tensor, targets: Tensor, tile: int, n_tiles: int, output: str, seed: int
) -> DegradationResult:
    top, bottom = curves[:, 0, :1], curves[:, 0, -1:]
    span = top - bottom
    span = torch.where(span.abs() < DEGENERATE_EPS, torch.nan, span)
    normalised = (curves - bottom[:, None]) / span[:, None]
    scores = (normalised[:, 1] - normalised[:, 0]).mean(dim=1)
    return DegradationResult(
        tile=tile,
        n_tiles=n_tiles,
        steps=steps,
        targets=targets.cpu(),
        morf=curves[:, 0],
        lerf=curves[:, 1],
        morf_normalised=normalised[:, 0],
        lerf_normalised=normalised[:, 1],
        scores=scores,
        output=output,
        seed=seed,
    )
