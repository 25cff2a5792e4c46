"""A comparison of pretraining methods: one measured value per (method, seed, metric), and its
mean ± sample standard deviation over seeds (``benchmarks/ssl_compare.py`` fills it)."""

from __future__ import annotations

import math
import statistics
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from narrows.runs.results import JsonResult, provenance

FORMAT_KIND = "ssl.comparison"
FORMAT_VERSION = 1


@dataclass
class ComparisonResult(JsonResult):
    """``rows``: ``{"method", "seed", "metric", "value"}`` records (values in [0, 1] for
    accuracies and mIoU); ``data``: the data spec every method was evaluated on; ``notes``:
    what the reader must know (budgets, which features); ``provenance``: versions and options."""

    rows: list[dict[str, Any]]
    data: str = ""
    notes: list[str] = field(default_factory=list)
    provenance: dict[str, Any] = field(default_factory=provenance)

    KIND, VERSION, SAVED = FORMAT_KIND, FORMAT_VERSION, ("rows", "data", "notes")
    WHAT, FIX = "comparison", "point at a comparison.json of benchmarks/ssl_compare.py"

    def add(self, method: str, seed: int, metric: str, value: float) -> None:
        """Record one measured ``value`` of ``metric`` for ``method`` at ``seed``."""
        self.rows.append({"method": method, "seed": int(seed), "metric": metric,
                          "value": float(value)})

    @property
    def methods(self) -> list[str]:
        """Methods in the order they were first recorded."""
        return list(dict.fromkeys(row["method"] for row in self.rows))

    @property
    def metrics(self) -> list[str]:
        """Metrics in the order they were first recorded."""
        return list(dict.fromkeys(row["metric"] for row in self.rows))

    def values(self, method: str, metric: str) -> list[float]:
        """The finite values of ``metric`` for ``method``, one per seed."""
        return [row["value"] for row in self.rows if row["method"] == method
                and row["metric"] == metric and math.isfinite(row["value"])]

    def stats(self, method: str, metric: str) -> tuple[float, float, int]:
        """``(mean, sample std, n)`` over seeds (std 0 with one seed, NaN mean with none)."""
        values = self.values(method, metric)
        if not values:
            return math.nan, math.nan, 0
        spread = statistics.stdev(values) if len(values) > 1 else 0.0
        return statistics.fmean(values), spread, len(values)

    def table(self, metrics: Sequence[str] | None = None) -> list[dict[str, Any]]:
        """One row per method: ``"mean ± std"`` in points for each metric (of ``metrics``)."""
        rows = []
        for method in self.methods:
            row: dict[str, Any] = {"method": method}
            for metric in metrics or self.metrics:
                mean, spread, n = self.stats(method, metric)
                row[metric] = "–" if n == 0 else f"{100 * mean:.1f} ± {100 * spread:.1f}"
            rows.append(row)
        return rows

    def markdown(self, metrics: Sequence[str] | None = None) -> str:
        """:meth:`table` as Markdown."""
        from narrows.runs.tables import markdown_text

        return markdown_text(self.table(metrics))

    def to_rows(self) -> list[dict[str, Any]]:
        """The measured values, one flat record each."""
        return [dict(row, data=self.data) for row in self.rows]

    def summary(self) -> str:
        """One line: the methods, seeds and each method's first metric."""
        first = self.metrics[0] if self.metrics else None
        parts = []
        for method in self.methods:
            mean, spread, n = self.stats(method, first) if first else (math.nan, 0.0, 0)
            parts.append(f"{method} {100 * mean:.1f} ± {100 * spread:.1f}")
        seeds = len({row["seed"] for row in self.rows})
        return (f"comparison on {self.data or 'data'} ({seeds} seeds)"
                + (f", {first}: " + ", ".join(parts) if first else ""))

    def plot(self, ax: Any = None, metrics: Sequence[str] | None = None) -> tuple[Any, Any]:
        """Grouped bars: one group per metric (of ``metrics``), one bar per method, the error
        bar one sample standard deviation over seeds; returns ``(fig, ax)``."""
        from narrows.plotting import axes

        chosen = list(metrics or self.metrics)
        fig, ax = axes(ax, (max(6.0, 1.3 * len(chosen)), 3.6))
        width = 0.8 / max(len(self.methods), 1)
        for i, method in enumerate(self.methods):
            stats = [self.stats(method, metric) for metric in chosen]
            xs = [j + (i - (len(self.methods) - 1) / 2) * width for j in range(len(chosen))]
            ax.bar(xs, [100 * s[0] for s in stats], width, yerr=[100 * s[1] for s in stats],
                   capsize=2, label=method)
        ax.set_xticks(range(len(chosen)))
        ax.set_xticklabels(chosen, rotation=30, ha="right", fontsize=7)
        ax.set_ylabel("%")
        ax.set_title(f"comparison on {self.data}" if self.data else "comparison", fontsize=9)
        ax.legend(fontsize=7)
        fig.tight_layout()
        return fig, ax
