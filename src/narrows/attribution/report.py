"""What :func:`~narrows.attribution.evaluation.evaluate_methods` writes besides the heatmaps:
the results table (CSV and Markdown), degradation.png, examples.png and sensitivity_n.png.

Each writer takes ``run``, a :class:`~narrows.runs.RunDir` (or anything with its
``write_text``, ``save_figure``, ``read_json`` and ``exists``)."""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import torch


EXAMPLES = 6


def draw_examples(run, maps: dict[str, Any], images: torch.Tensor, dataset,
                  indices: list[int], class_names=None, subject: str | None = None) -> None:
    """examples.png: the first images (rows) with each method's heatmap (columns), box drawn.

    ``maps``: method → its heatmaps of these images (N, H, W), in column order. Each heatmap
    has its own colour range: non-negative maps from their 1st to 99.5th percentile
    (``inferno``), signed maps on ``RdBu_r`` symmetric about 0; all-zero maps say so. Rows are
    labelled with the test index and class name."""
    import numpy as np

    from narrows.attribution.baselines import method_units
    from narrows.attribution.heatmap import _greyscale, target_name
    from narrows.data import dataset_boxes, dataset_labels
    from narrows.plotting import pyplot

    plt = pyplot()
    methods = list(maps)
    rows, cols = len(indices), len(methods) + 1
    fig, axes = plt.subplots(rows, cols, figsize=(1.6 * cols, 1.6 * rows + 0.4), squeeze=False)
    labels = dataset_labels(dataset)
    for r, index in enumerate(indices):
        image = images[r].cpu().numpy()
        axes[r, 0].imshow(np.clip(image.transpose(1, 2, 0), 0, 1))
        axes[r, 0].text(-0.08, 0.5, f"#{index} {target_name(labels[index], class_names)}",
                        transform=axes[r, 0].transAxes, rotation=90, ha="right", va="center",
                        fontsize=7)
        for c, method in enumerate(methods, 1):
            heat = np.nan_to_num(maps[method][r].astype(np.float64))
            axes[r, c].imshow(_greyscale(image), cmap="gray", vmin=0, vmax=1)
            if method_units(method)[1]:
                limit = np.percentile(np.abs(heat), 99.5)
                limit = limit if limit > 0 else 1.0
                axes[r, c].imshow(np.clip(heat / limit, -1, 1), cmap="RdBu_r", vmin=-1, vmax=1,
                                  alpha=0.75)
            else:
                low, high = np.percentile(heat, 1), np.percentile(heat, 99.5)
                axes[r, c].imshow(np.clip((heat - low) / (high - low + 1e-12), 0, 1),
                                  cmap="inferno", alpha=0.75)
            if not heat.any():
                axes[r, c].text(0.5, 0.5, "all zero", transform=axes[r, c].transAxes,
                                ha="center", va="center", fontsize=7,
                                bbox={"facecolor": "white", "alpha": 0.8, "edgecolor": "none"})
            if r == 0:
                axes[r, c].set_title(method, fontsize=8)
        for c in range(cols):
            for x0, y0, x1, y1 in dataset_boxes(dataset, index).tolist():
                axes[r, c].add_patch(plt.Rectangle((x0 - 0.5, y0 - 0.5), x1 - x0, y1 - y0,
                                                   fill=False, color="cyan", linewidth=0.8))
        for c in range(cols):
            axes[r, c].set_xticks([])
            axes[r, c].set_yticks([])
            for spine in axes[r, c].spines.values():
                spine.set_visible(False)
    axes[0, 0].set_title("image", fontsize=8)
    if subject:
        fig.suptitle(subject, fontsize=8)
    fig.tight_layout()
    run.save_figure("examples.png", fig)
    plt.close(fig)


def nanmean(values: torch.Tensor) -> float:
    """The mean of the non-NaN entries (NaN when there are none)."""
    import torch

    finite = values[~torch.isnan(values)]
    return float(finite.mean()) if finite.numel() else float("nan")


def draw_sensitivity(run, methods: list[str], subject: str | None = None) -> bool:
    """sensitivity_n.png: pooled and per-image correlation against n, one line per method."""
    from narrows.plotting import pyplot

    curves = {m: run.read_json(f"metric_{m}_sensitivity-n.json").get("sensitivity")
              for m in methods if run.exists(f"metric_{m}_sensitivity-n.json")}
    curves = {m: c for m, c in curves.items() if c}
    if not curves:
        return False
    plt = pyplot()
    fig, axes = plt.subplots(1, 2, figsize=(9, 3.6), sharey=True)
    for index, (method, c) in enumerate(curves.items()):
        for ax, key in zip(axes, ("pooled", "per_image"), strict=True):
            ax.plot(c["n"], c[key], marker="o", markersize=3, color=f"C{index % 10}",
                    label=method)
    for ax, title in zip(axes, ("pooled over images (upstream)", "mean per image (Ancona et al.)"),
                         strict=True):
        ax.set_xscale("log")
        ax.axhline(0, color="grey", linewidth=0.6)
        ax.set_xlabel("n (tiles removed)")
        ax.set_title(title, fontsize=9)
    axes[0].set_ylabel("Pearson r (attribution sum, logit drop)")
    axes[1].legend(fontsize=7)
    if subject:
        fig.suptitle(f"sensitivity-n · {subject}", fontsize=9)
        fig.tight_layout()
    run.save_figure("sensitivity_n.png", fig)
    plt.close(fig)
    return True


LABELS = {"degradation_tile": "degradation {t}×{t} (LeRF − MoRF)",
          "degradation_normalised": "normalised: mean", "degradation_median": "normalised: median",
          "morf_area": "MoRF area", "lerf_area": "LeRF area", "bbox_ratio": "bbox ratio",
          "bbox_images": "bbox images", "sensitivity_n": "sensitivity-n (pooled r)",
          "sensitivity_n_per_image": "sensitivity-n (per-image r)"}


def write_results(run, rows: list[dict[str, Any]], curves: dict[str, dict], tile: int,
                  subject: str | None = None) -> None:
    """results.csv and results.md (one row per method) and, given ``curves`` (method → its
    mean MoRF/LeRF curves), degradation.png."""
    import csv
    import io

    from narrows.plotting import pyplot

    columns = list(dict.fromkeys(k for row in rows for k in row))
    text = io.StringIO()
    writer = csv.DictWriter(text, fieldnames=columns, lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows)
    run.write_text("results.csv", text.getvalue())

    def label(key: str) -> str:
        if key.startswith("degradation_tile"):
            return LABELS["degradation_tile"].format(t=tile)
        return LABELS.get(key, key)

    def cell(value: Any) -> str:
        if isinstance(value, float):
            return "nan" if math.isnan(value) else f"{value:.3f}"
        return str(value)

    lines = ["| " + " | ".join(label(c) for c in columns) + " |",
             "|" + "|".join("---" for _ in columns) + "|"]
    lines += ["| " + " | ".join(cell(row.get(c, "")) for c in columns) + " |" for row in rows]
    run.write_text("results.md", "\n".join(lines) + "\n")
    if curves:
        plt = pyplot()
        fig, ax = plt.subplots(figsize=(5.5, 3.8))
        draw_degradation(ax, curves, tile, subject)
        run.save_figure("degradation.png", fig)
        plt.close(fig)


def draw_degradation(ax: Any, curves: dict[str, dict], tile: int | None,
                     subject: str | None = None) -> None:
    """Each method's mean MoRF (solid) and LeRF (dashed) curve on ``ax``."""
    for index, (method, curve) in enumerate(curves.items()):
        if not curve["morf"]:
            continue
        colour = f"C{index % 10}"
        ax.plot(curve["x"], curve["morf"], color=colour, label=f"{method} MoRF")
        ax.plot(curve["x"], curve["lerf"], color=colour, linestyle="--",
                label=f"{method} LeRF")
    ax.set_xlabel("fraction of tiles replaced")
    ax.set_ylabel("target-class probability (mean)")
    tiles = f", {tile}×{tile} tiles" if tile is not None else ""
    ax.set_title(f"degradation{tiles}" + (f"\n{subject}" if subject else ""), fontsize=9)
    ax.legend(fontsize=7)
