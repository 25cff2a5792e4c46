"""Figures shared by commands. matplotlib is imported here only, on first use, headless."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any


def pyplot():
    """matplotlib's pyplot with the non-interactive Agg backend (no display needed)."""
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    return plt


def axes(ax: Any = None, figsize: tuple[float, float] = (6, 3.6)) -> tuple[Any, Any]:
    """``(fig, ax)``: ``ax`` and its figure when given (a result drawn into a user's figure),
    else a new figure of ``figsize`` inches with one axes."""
    if ax is not None:
        return ax.figure, ax
    return pyplot().subplots(figsize=figsize)


def plot_training_curves(rows: Sequence[dict[str, Any]], ax: Any = None, title: str | None = None):
    """Loss (left) and top-1 accuracy (right) per epoch; returns ``(fig, axes)``.

    Epochs are integer ticks; the loss axis is logarithmic only when the loss spans more than a
    factor of ten, with plain decimal labels. ``title`` (e.g. model and data) heads the figure.
    """
    from matplotlib.ticker import FuncFormatter, MaxNLocator, NullFormatter

    plt = pyplot()
    if ax is None:
        fig, axes = plt.subplots(1, 2, figsize=(9, 3.6 if title else 3.4))
    else:
        axes = ax
        fig = axes[0].figure
    epochs = [r["epoch"] for r in rows]
    losses = [r[k] for r in rows for k in ("train_loss", "test_loss")]
    axes[0].plot(epochs, [r["train_loss"] for r in rows], marker="o", label="train")
    axes[0].plot(epochs, [r["test_loss"] for r in rows], marker="o", label="test")
    axes[0].set_xlabel("epoch")
    axes[0].set_ylabel("cross-entropy")
    finite = [v for v in losses if v == v and 0 < v < float("inf")]
    if finite and max(finite) > 10 * min(finite):
        axes[0].set_yscale("log")  # the first epochs' loss would flatten everything else
        axes[0].yaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}"))
        axes[0].yaxis.set_minor_formatter(NullFormatter())
    axes[0].legend()
    axes[1].plot(epochs, [100 * r["train_top1"] for r in rows], marker="o", label="train")
    axes[1].plot(epochs, [100 * r["test_top1"] for r in rows], marker="o", label="test")
    axes[1].set_xlabel("epoch")
    axes[1].set_ylabel("top-1 accuracy (%)")
    axes[1].legend()
    for a in axes:
        a.grid(alpha=0.3)
        a.xaxis.set_major_locator(MaxNLocator(integer=True))
        if len(set(epochs)) == 1:  # one point: the locator would fall back to fractions
            a.set_xticks(epochs)
            a.set_xlim(epochs[0] - 0.5, epochs[0] + 0.5)
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    return fig, axes
