"""The outcome of one model on one stream: the accuracy matrix, final accuracy, forgetting.

``per_class[t][c]`` is the test accuracy of class ``c`` after phase ``t``. The accuracy matrix
``A[t, s]`` is the mean of ``per_class[t]`` over the classes of task ``s`` (class-balanced
within the task). With T tasks:

* final average accuracy = mean over s of ``A[T-1, s]``;
* forgetting of task s < T-1 = ``max_{t < T-1} A[t, s] - A[T-1, s]`` (its best accuracy before
  the last phase minus its accuracy at the end); the forgetting is the mean over those tasks.

The i.i.d. control is scored the same way: its phases see all classes, the columns are still the
class groups of the incremental tasks.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

FORMAT_KIND, FORMAT_VERSION = "kvb.continual", 1  # the "format" of a saved result file


@dataclass
class ContinualResult:
    """Per-class test accuracy after every phase of a stream, and what follows from it."""

    model: str
    protocol: str
    tasks: list[list[int]]
    per_class: list[list[float]]  # (phases, classes); NaN for a class absent from the test set
    visits: list[int]  # sample visits per phase
    meta: dict[str, Any] = field(default_factory=dict)

    @property
    def num_phases(self) -> int:
        return len(self.per_class)

    def matrix(self) -> np.ndarray:
        """``A[t, s]``: accuracy on task s's classes after phase t, shape (phases, tasks)."""
        acc = np.asarray(self.per_class, dtype=float).reshape(self.num_phases, -1)
        out = np.full((self.num_phases, len(self.tasks)), np.nan)
        for s, classes in enumerate(self.tasks):
            with np.errstate(all="ignore"):
                cols = acc[:, classes]
                seen = ~np.isnan(cols)
                out[:, s] = np.where(seen.any(1), np.nansum(cols, 1) / np.maximum(seen.sum(1), 1),
                                     np.nan)
        return out

    @property
    def final_accuracy(self) -> float:
        """Mean over tasks of the last row of the accuracy matrix."""
        return float(np.nanmean(self.matrix()[-1]))

    @property
    def balanced_accuracy(self) -> float:
        """Mean over classes of the per-class accuracy at the end."""
        return float(np.nanmean(self.per_class[-1]))

    def task_forgetting(self) -> list[float]:
        """Per task s < T-1: best accuracy before the last phase minus the final one."""
        a = self.matrix()
        if len(a) < 2:
            return [math.nan] * max(a.shape[1] - 1, 0)
        return [float(np.nanmax(a[:-1, s]) - a[-1, s]) for s in range(a.shape[1] - 1)]

    @property
    def forgetting(self) -> float:
        values = [v for v in self.task_forgetting() if not math.isnan(v)]
        return float(np.mean(values)) if values else math.nan

    def summary(self) -> str:
        """One line: the model, protocol, final accuracy and forgetting."""
        return (f"{self.model}, {self.protocol}: final accuracy {self.final_accuracy:.3f}, "
                f"forgetting {self.forgetting:.3f}, {int(sum(self.visits))} sample visits")

    def scores(self) -> dict[str, Any]:
        """The numbers of the result as a flat dict (final accuracy, forgetting, first task at
        the end, visits and the scalar ``meta`` entries)."""
        a = self.matrix()
        return {"model": self.model, "protocol": self.protocol,
                "final_accuracy": self.final_accuracy, "balanced_accuracy": self.balanced_accuracy,
                "forgetting": self.forgetting, "first_task_final": float(a[-1, 0]),
                "visits": int(sum(self.visits)), **{k: v for k, v in self.meta.items()
                                                     if isinstance(v, (int, float, str))}}

    def class_names(self) -> list[str]:
        """The classes' names (``meta["class_names"]``), else their ids as text."""
        names = self.meta.get("class_names")
        count = len(self.per_class[0]) if self.per_class else 0
        if isinstance(names, (list, tuple)) and len(names) == count:
            return [str(n) for n in names]
        return [str(c) for c in range(count)]

    def task_label(self, s: int) -> str:
        """Task ``s``'s classes by name, e.g. ``cat dog``."""
        names = self.class_names()
        return " ".join(names[c] if c < len(names) else str(c) for c in self.tasks[s])

    def task_labels(self) -> list[str]:
        """Every task's :meth:`task_label`."""
        return [self.task_label(s) for s in range(len(self.tasks))]

    def to_rows(self) -> list[dict[str, Any]]:
        """Long format: one row per (phase, task) with its accuracy; classes by name."""
        a = self.matrix()
        return [{"model": self.model, "protocol": self.protocol, "after_phase": t + 1,
                 "task": s + 1, "classes": self.task_label(s),
                 "accuracy": float(a[t, s])}
                for t in range(a.shape[0]) for s in range(a.shape[1])]

    # -- files -----------------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        out = asdict(self)
        out["per_class"] = [[None if math.isnan(v) else v for v in row] for row in self.per_class]
        out["matrix"] = [[None if math.isnan(v) else float(v) for v in row]
                         for row in self.matrix()]
        out["summary"] = {k: (None if isinstance(v, float) and math.isnan(v) else v)
                          for k, v in self.scores().items()}
        return out

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> ContinualResult:
        return cls(model=data["model"], protocol=data["protocol"],
                   tasks=[list(map(int, t)) for t in data["tasks"]],
                   per_class=[[math.nan if v is None else float(v) for v in row]
                              for row in data["per_class"]],
                   visits=[int(v) for v in data["visits"]], meta=dict(data.get("meta", {})))

    def document(self) -> dict[str, Any]:
        """What :meth:`save` writes: the header, then :meth:`to_dict`."""
        from narrows.runs.results import header, provenance

        seed = self.meta.get("seed")
        origin = provenance(model=self.model, seed=seed if isinstance(seed, int) else None,
                            options={"protocol": self.protocol})
        return {**header(FORMAT_KIND, FORMAT_VERSION, origin), **self.to_dict()}

    def save(self, path: str | Path) -> Path:
        """Write the result as JSON (with its header) to ``path``."""
        from narrows.runs import atomic_write_json

        return atomic_write_json(path, self.document())

    @classmethod
    def load(cls, path: str | Path) -> ContinualResult:
        from narrows.runs.files import read_json_file, reading

        fix = "delete it and run 'narrows kvb train' again (or pass --overwrite)"
        from narrows.runs.results import check_header

        data = read_json_file(path, "continual-learning result file", fix, kind=dict)
        check_header(data, FORMAT_KIND, FORMAT_VERSION, str(path))
        with reading(path, "continual-learning result file", fix):
            return cls.from_dict(data)

    # -- figures ---------------------------------------------------------------------------
    def plot(self, ax: Any = None, *, axes: Any = None) -> tuple[Any, Any]:
        """The accuracy matrix (heat map) and each task's accuracy over the phases, on two new
        axes, or on ``ax`` (two axes; one axes gets only the accuracy curves). ``axes`` is the
        older name of ``ax``. Returns ``(fig, ax)``."""
        from narrows.plotting import pyplot

        plt = pyplot()
        ax = axes if ax is None else ax
        if ax is None:
            fig, ax = plt.subplots(1, 2, figsize=(9, 3.6))
        a = self.matrix()
        if not isinstance(ax, (list, tuple)) and not hasattr(ax, "__len__"):
            self._plot_curves(ax, a)
            return ax.figure, ax
        axes = ax
        fig = axes[0].figure
        draw_matrix(axes[0], a, f"{self.model}, {self.protocol}", self.task_labels())
        self._plot_curves(axes[1], a)
        fig.tight_layout()
        return fig, axes

    def _plot_curves(self, ax: Any, a: np.ndarray) -> None:
        phases = np.arange(1, a.shape[0] + 1)
        for s in range(a.shape[1]):
            ax.plot(phases, a[:, s], marker="o", label=f"task {s + 1}: {self.task_label(s)}")
        ax.plot(phases, np.nanmean(a, 1), color="black", lw=2, label="mean")
        ax.set_xlabel("after phase")
        ax.set_ylabel("test accuracy")
        ax.set_ylim(-0.02, 1.02)
        ax.set_xticks(phases)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7, loc="best")
        ax.set_title(f"forgetting {self.forgetting:.3f}" if not math.isnan(self.forgetting)
                          else "accuracy per task")


def draw_matrix(ax: Any, a: np.ndarray, title: str, tasks: list[str] | None = None) -> None:
    """A (phases × tasks) accuracy heat map with the values written in; ``tasks`` labels the
    columns (e.g. the tasks' class names)."""
    ax.imshow(a, vmin=0, vmax=1, cmap="viridis")
    for t in range(a.shape[0]):
        for s in range(a.shape[1]):
            if not math.isnan(a[t, s]):
                ax.text(s, t, f"{a[t, s]:.2f}", ha="center", va="center", fontsize=7,
                        color="white" if a[t, s] < 0.6 else "black")
    labels = [str(s + 1) for s in range(a.shape[1])]
    if tasks is not None and len(tasks) == a.shape[1] and a.shape[1] <= 12:
        labels = [f"{s + 1}\n{name}" for s, name in enumerate(tasks)]
    ax.set_xticks(range(a.shape[1]), labels, fontsize=7 if tasks else None)
    ax.set_yticks(range(a.shape[0]), [str(t + 1) for t in range(a.shape[0])])
    ax.set_xlabel("task")
    ax.set_ylabel("after phase")
    ax.set_title(title, fontsize=9)


def plot_matrices(results: list[ContinualResult]) -> Any:
    """One accuracy-matrix heat map per result: models in rows, protocols in columns."""
    from narrows.plotting import pyplot

    plt = pyplot()
    models = list(dict.fromkeys(r.model for r in results))
    protocols = list(dict.fromkeys(r.protocol for r in results))
    fig, axes = plt.subplots(len(models), len(protocols), squeeze=False,
                             figsize=(2.8 * len(protocols) + 0.5, 2.6 * len(models)))
    for ax in axes.flat:
        ax.set_visible(False)
    for r in results:
        ax = axes[models.index(r.model), protocols.index(r.protocol)]
        ax.set_visible(True)
        draw_matrix(ax, r.matrix(), f"{r.model}, {r.protocol}", r.task_labels())
    fig.tight_layout()
    return fig


def plot_comparison(results: list[ContinualResult]) -> Any:
    """Mean accuracy over the phases per model (solid: incremental, dashed: i.i.d.) and each
    model's forgetting."""
    from narrows.plotting import pyplot

    plt = pyplot()
    fig, (left, right) = plt.subplots(1, 2, figsize=(10, 3.8))
    models = list(dict.fromkeys(r.model for r in results))
    colours = {m: f"C{i}" for i, m in enumerate(models)}
    for r in results:
        a = r.matrix()
        phases = np.arange(1, a.shape[0] + 1)
        left.plot(phases, np.nanmean(a, 1), marker="o", color=colours[r.model],
                  ls="-" if r.protocol == "incremental" else "--", label=f"{r.model}, {r.protocol}")
    left.set_xticks(np.arange(1, max((r.num_phases for r in results), default=1) + 1))
    left.set_xlabel("after phase (equal sample visits)")
    left.set_ylabel("mean test accuracy over tasks")
    left.set_ylim(-0.02, 1.02)
    left.grid(alpha=0.3)
    left.legend(fontsize=7)
    protocols = list(dict.fromkeys(r.protocol for r in results))
    width = 0.8 / max(len(protocols), 1)
    for j, protocol in enumerate(protocols):
        values = [next((r.forgetting for r in results
                        if r.model == m and r.protocol == protocol), math.nan) for m in models]
        right.bar(np.arange(len(models)) + j * width, values, width, label=protocol,
                  color=[colours[m] for m in models], alpha=1.0 if j == 0 else 0.5,
                  hatch=None if j == 0 else "//")
    right.set_xticks(np.arange(len(models)) + width * (len(protocols) - 1) / 2, models)
    right.set_ylabel("forgetting (best − final, mean over tasks)")
    right.axhline(0, color="black", lw=0.8)
    right.grid(alpha=0.3, axis="y")
    right.legend(fontsize=7)
    fig.tight_layout()
    return fig


def summary_table(results: list[ContinualResult]) -> tuple[str, str]:
    """``(csv, markdown)`` with one row per result: final accuracy, forgetting, first task."""
    header = ["model", "protocol", "final_accuracy", "forgetting", "first_task_final", "visits"]
    lines = [",".join(header)]
    md = ["| model | protocol | final avg. accuracy | forgetting | task 1 at the end | visits |",
          "|---|---|---|---|---|---|"]
    for r in results:
        s = r.scores()
        lines.append(",".join([s["model"], s["protocol"], _num(s["final_accuracy"]),
                               _num(s["forgetting"]), _num(s["first_task_final"]),
                               str(s["visits"])]))
        md.append(f"| {s['model']} | {s['protocol']} | {_num(s['final_accuracy'])} | "
                  f"{_num(s['forgetting'])} | {_num(s['first_task_final'])} | {s['visits']} |")
    return "\n".join(lines) + "\n", "\n".join(md) + "\n"


def _num(value: float) -> str:
    return "" if value is None or math.isnan(value) else f"{value:.3f}"


def comparison_table(results: list[ContinualResult]) -> str:
    """Markdown, one row per model: final accuracy and forgetting under each protocol."""
    models = list(dict.fromkeys(r.model for r in results))
    protocols = list(dict.fromkeys(r.protocol for r in results))
    head = ["model"] + [f"{p}: {what}" for p in protocols for what in ("final acc.", "forgetting")]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for m in models:
        cells = [m]
        for p in protocols:
            r = next((x for x in results if x.model == m and x.protocol == p), None)
            cells += ["", ""] if r is None else [_num(r.final_accuracy), _num(r.forgetting)]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"
