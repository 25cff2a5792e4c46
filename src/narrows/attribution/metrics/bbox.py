"""Bounding-box ratio: the share of a heatmap's top-``n`` pixels that fall inside the object box.

For each image the mask is the union of its boxes (or a given pixel mask); with ``n`` the number
of pixels in the mask, the ratio is the fraction of the ``n`` highest heatmap pixels that lie in
the mask. A random heatmap gives ≈ the mask's area fraction; a perfect one gives 1.

Images whose mask covers more than ``max_box_fraction`` (default 0.33) of the image, or nothing,
are skipped as upstream. Upstream's config key for this limit is called ``min_bbox_ratio`` although
it is an upper bound on the box area. Upstream also feeds un-normalised [0, 1] images to the model
when computing the heatmaps: this metric only reads heatmaps, so make them on normalised inputs.

Boxes are ``(x0, y0, x1, y1)`` in continuous pixel coordinates (pixel ``j`` covers ``[j, j+1)``);
a pixel is inside when its centre is, so integer boxes cover columns ``x0 … x1−1`` exactly.

Ties at the ``n``-th score are broken deterministically, in one of two ways:

* ``ties="random"`` (default): a seeded random shuffle, then a stable sort (reproducible, unbiased);
* ``ties="average"``: the expectation over all tie orders; pixels strictly above the ``n``-th score
  count fully and the tied ones count by the share of tied pixels inside the mask. A constant
  heatmap then scores exactly the mask's area fraction.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Literal

import torch
from torch import Tensor

from narrows.attribution.result_files import SavedAsTorch
from narrows.errors import UserError

Ties = Literal["random", "average"]
FORMAT_KIND = "bbox"  # saved files: "format": narrows.bbox/1


def boxes_to_mask(boxes: Tensor, height: int, width: int) -> Tensor:
    """``H×W`` bool mask of the union of ``K×4`` xyxy pixel boxes (pixel-centre rule)."""
    boxes = boxes.reshape(-1, 4).double()
    ys = torch.arange(height, dtype=torch.float64) + 0.5
    xs = torch.arange(width, dtype=torch.float64) + 0.5
    mask = torch.zeros(height, width, dtype=torch.bool)
    for x0, y0, x1, y1 in boxes.tolist():
        inside_y = (ys > y0) & (ys < y1)
        inside_x = (xs > x0) & (xs < x1)
        mask |= inside_y[:, None] & inside_x[None, :]
    return mask


@dataclass
class BBoxResult(SavedAsTorch):
    """Per-image ratios (NaN where skipped), box fractions and in-box heatmap mass."""

    FORMAT_KIND = FORMAT_KIND
    WHAT = "bbox result file"
    FIX = "delete it and compute the bbox ratio again"
    OPTIONS = ("max_box_fraction", "ties")

    ratios: Tensor
    used: Tensor
    box_fractions: Tensor
    mass_in_box: Tensor
    max_box_fraction: float
    ties: str
    seed: int

    @property
    def n_used(self) -> int:
        return int(self.used.sum())

    @property
    def n_skipped(self) -> int:
        return int((~self.used).sum())

    @property
    def mean(self) -> float:
        """Mean ratio over the used images; NaN when none is used."""
        return float(self.ratios[self.used].mean()) if self.n_used else float("nan")

    @property
    def mean_box_fraction(self) -> float:
        """Mean mask area fraction of the used images: what a random heatmap scores."""
        return float(self.box_fractions[self.used].mean()) if self.n_used else float("nan")

    def to_rows(self) -> list[dict[str, Any]]:
        """One summary row for CSV/Markdown tables."""
        mass = self.mass_in_box[self.used]
        return [
            {
                "metric": "bbox",
                "ratio": self.mean,
                "mean_box_fraction": self.mean_box_fraction,
                "mass_in_box": float(mass.nanmean()) if mass.numel() else float("nan"),
                "n_used": self.n_used,
                "n_skipped": self.n_skipped,
                "max_box_fraction": self.max_box_fraction,
                "ties": self.ties,
                "seed": self.seed,
            }
        ]

    def summary(self) -> str:
        """One line: the mean ratio against what a random heatmap scores."""
        return (f"bbox ratio {self.mean:.3f} (random ≈ {self.mean_box_fraction:.3f}) over "
                f"{self.n_used} images, {self.n_skipped} skipped")

    def plot(self, ax: Any = None, label: str = "") -> tuple[Any, Any]:
        """Each used image's ratio against its box's area fraction (what a random heatmap
        scores: the diagonal); returns ``(fig, ax)``."""
        if ax is None:
            from narrows.plotting import pyplot

            _, ax = pyplot().subplots(figsize=(4.2, 3.8))
        used = self.used
        ax.scatter(self.box_fractions[used].numpy(), self.ratios[used].numpy(), s=14,
                   label=f"{label + ' ' if label else ''}mean {self.mean:.3f}")
        ax.plot([0, 1], [0, 1], color="0.5", linestyle="--", linewidth=1, label="random heatmap")
        ax.set_xlim(0, max(self.max_box_fraction, 0.05) * 1.05)
        ax.set_ylim(0, 1.02)
        ax.set_xlabel("box area fraction")
        ax.set_ylabel("top-n pixels inside the box")
        ax.set_title(f"bbox ratio: {self.n_used} images ({self.n_skipped} skipped)")
        ax.legend(fontsize=8)
        return ax.figure, ax


def _masks(heatmaps: Tensor, boxes: Sequence[Tensor | None] | None, masks: Tensor | None) -> Tensor:
    n, h, w = heatmaps.shape
    if (boxes is None) == (masks is None):
        raise UserError("bbox_ratio needs exactly one of boxes= or masks=",
                        "pass the boxes (x0, y0, x1, y1 per image) or the masks, not both")
    if masks is not None:
        if tuple(masks.shape) != (n, h, w):
            raise UserError(f"masks must have shape {(n, h, w)}, got {tuple(masks.shape)}",
                            "give one H×W mask per heatmap, at the heatmaps' size")
        return masks.bool().cpu()
    if len(boxes) != n:
        raise UserError(f"need one box tensor per heatmap: {len(boxes)} boxes for {n} heatmaps",
                        "pass a list with one (K, 4) box tensor per image")
    empty = torch.zeros(h, w, dtype=torch.bool)
    return torch.stack([empty if b is None else boxes_to_mask(b.cpu(), h, w) for b in boxes])


def _top_n_inside(scores: Tensor, mask: Tensor, n: int, ties: Ties, gen: torch.Generator) -> float:
    """Share of the ``n`` highest of flat ``scores`` inside flat ``mask``."""
    if ties == "random":
        perm = torch.randperm(scores.numel(), generator=gen)
        top = perm[torch.argsort(-scores[perm], stable=True)[:n]]
        return float(mask[top].double().mean())
    if ties != "average":
        raise UserError(f"unknown tie rule {ties!r}", "use 'random' or 'average'")
    threshold = torch.sort(scores, descending=True).values[n - 1]
    above, tied = scores > threshold, scores == threshold
    inside_tied = float((tied & mask).sum()) / float(tied.sum())
    hits = float((above & mask).sum()) + (n - float(above.sum())) * inside_tied
    return hits / n


def bbox_ratio(
    heatmaps: Tensor,
    boxes: Sequence[Tensor | None] | None = None,
    *,
    masks: Tensor | None = None,
    max_box_fraction: float = 0.33,
    ties: Ties = "random",
    seed: int = 0,
) -> BBoxResult:
    """Top-``n``-in-box ratio of ``N×H×W`` heatmaps (model-free; only the maps are read).

    Give ``boxes`` (one ``K×4`` xyxy pixel tensor per image, as ``TensorImageDataset.boxes``;
    ``None`` or ``K = 0`` means no box) or boolean ``masks`` (``N×H×W``). NaN heatmap values rank
    lowest. Images whose mask covers more than ``max_box_fraction`` or nothing are skipped;
    ``ties`` and ``seed`` break ties (module docstring). Returns a :class:`BBoxResult`. It takes
    no images, so heatmaps made from [0, 1] images with a normaliser are scored as any others.
    """
    if heatmaps.ndim != 3:
        raise UserError(f"heatmaps must be N×H×W, got shape {tuple(heatmaps.shape)}",
                        "reduce channels first (e.g. the absolute maximum over them)")
    mask = _masks(heatmaps, boxes, masks).reshape(heatmaps.shape[0], -1)
    flat = heatmaps.detach().reshape(mask.shape).double().cpu().nan_to_num(nan=-torch.inf)
    fractions = mask.double().mean(dim=1)
    used = (fractions > 0) & (fractions <= max_box_fraction)
    gen = torch.Generator().manual_seed(seed)
    ratios = torch.full((mask.shape[0],), torch.nan, dtype=torch.float64)
    for i in torch.nonzero(used).flatten().tolist():
        ratios[i] = _top_n_inside(flat[i], mask[i], int(mask[i].sum()), ties, gen)
    finite = flat.masked_fill(~torch.isfinite(flat), 0.0)
    mass = (finite * mask).sum(dim=1) / finite.sum(dim=1)
    return BBoxResult(
        ratios=ratios,
        used=used,
        box_fractions=fractions,
        mass_in_box=mass,
        max_box_fraction=max_box_fraction,
        ties=ties,
        seed=seed,
    )
